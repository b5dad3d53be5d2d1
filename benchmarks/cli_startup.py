"""Wall time of help and argument errors, as a user types them: each command in a fresh process, first with an empty
cache (the verb builds its real parser, importing torch, transformers and peft, and writes its flag table: what every
call cost before the tables) and then with the table there (the median of --repeat calls). Also `qmilora-plan` by
family name, answered from the shipped config.json with no network.

    python benchmarks/cli_startup.py          # writes benchmarks/results/cli-startup-cpu.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import table, write

COMMANDS = [
    ["qmilora", "--help"],
    ["qmilora-train", "--help"],
    ["qmilora", "train", "--help"],
    ["qmilora-train", "--rank", "x"],
    ["qmilora-train", "--no-such-flag"],
    ["qmilora-plan", "--help"],
    ["qmilora-plan"],
    ["qmilora-generate", "--help"],
    ["qmilora-eval", "--adapter", "out"],
    ["qmilora-export", "--help"],
    ["qmilora-inspect", "--help"],
    # real work, no network: the shipped config.json of a family, and an id the Hub would have to answer
    ["qmilora-plan", "--model", "meta-llama/Llama-2-13b-hf"],
    ["qmilora-plan", "--model", "some-org/not-shipped-7b"],
]


def timed(argv: list[str], env: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", nargs="*", help="run only the commands starting with these words")
    args = p.parse_args()
    bin_dir = os.path.dirname(sys.executable)
    rows = []
    for command in COMMANDS:
        if args.only and not any(" ".join(command).startswith(o) for o in args.only):
            continue
        cache = tempfile.mkdtemp(prefix="qmilora-bench-cli-")
        env = {**os.environ, "QMILORA_CACHE": cache, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
        try:
            cold, code = timed(command, env)
            warm = [timed(command, env) for _ in range(args.repeat)]
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        median = statistics.median(t for t, _ in warm)
        rows.append({"command": " ".join(command), "exit": code, "cold_s": round(cold, 2), "warm_s": round(median, 3),
                     "warm_runs_s": [round(t, 3) for t, _ in warm], "speedup": round(cold / median, 1)})
        print(rows[-1], flush=True)
    path = write("cli-startup-cpu", rows, {"note": "cold: empty cache (the real parser, as before the flag tables); "
                                          "warm: the table in the cache; wall seconds of a fresh process"})
    print(table(rows, ["command", "exit", "cold_s", "warm_s", "speedup"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
