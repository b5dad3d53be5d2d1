"""qmilora-export: a trained QMiLoRA adapter as a plain rank-2r LoRA for the original model, or merged weights."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from . import parse_flags, run
from .. import export


@dataclass
class ExportArgs:
    adapter: str = field(metadata={"help": "A qmilora-train output directory."})
    output: str = field(metadata={"help": "Directory to write; must not exist or be empty (see --overwrite)."})
    to: str = field(default="lora", metadata={"help": "lora: rank-2r adapter for the original base; merged: full-precision weights.", "choices": ("lora", "merged")})
    model: str | None = field(default=None, metadata={"help": "The original checkpoint, when it is not where qmilora.json says."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output directory."})


def main(argv: list[str] | None = None) -> int:
    def body():
        (args,) = parse_flags("qmilora-export", (ExportArgs,), sys.argv[1:] if argv is None else argv, __doc__)
        fn = export.to_lora if args.to == "lora" else export.to_merged
        print(f"qmilora-export: wrote {fn(args.adapter, args.output, args.model, args.overwrite)}")

    return run("qmilora-export", body)


if __name__ == "__main__":
    sys.exit(main())
