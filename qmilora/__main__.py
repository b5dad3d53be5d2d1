import sys

from qmilora.cli.main import main

sys.exit(main())
