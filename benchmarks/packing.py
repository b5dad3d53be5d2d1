"""Padding-free packing against padded batches, through `qmilora-train` itself: the same model, data, steps and batch
size, `--packing false` against `--packing true`, alternating, each in a fresh process (the prepared model comes from
one shared cache). Reported from each run's own summary: supervised tokens/s (labelled tokens only: what both runs
learn from), wall time and the final training loss.

    python benchmarks/packing.py                      # the demo model on the bundled data, CPU
    python benchmarks/packing.py --steps 8 --repeat 2 --batch 4

Writes benchmarks/results/packing-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from common import run_qmilora, table, write


def run(packing: bool, out: str, args, cache: str) -> dict:
    argv = ["--output_dir", out, "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch),
            "--rank", str(args.rank), "--packing", str(packing).lower(), "--save_strategy", "no", "--logging_steps", "1",
            "--disable_tqdm", "true", "--seed", "0"]
    if args.model:
        argv += ["--model", args.model]
    proc = run_qmilora("train", argv, {"QMILORA_CACHE": cache})
    if proc.returncode:
        raise SystemExit(f"{' '.join(proc.args)} failed: {proc.stderr.strip().splitlines()[-1]}")
    summary = json.load(open(os.path.join(out, "qmilora.json")))["summary"]
    return {"packing": packing, "supervised_tokens_per_s": summary["tokens_per_second"],
            "supervised_tokens": summary["supervised_tokens"], "wall_s": summary["wall_seconds"],
            "train_loss": round(summary["train_loss"], 4), "command": " ".join(argv)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a checkpoint directory (default: the demo model)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        run(False, os.path.join(tmp, "warm"), args, cache)  # prepares the model once, into the shared cache
        for i in range(args.repeat):
            for packing in (False, True):
                rows.append({"repeat": i, **run(packing, os.path.join(tmp, f"r{i}-{packing}"), args, cache)})
    speed = {flag: statistics.median(r["supervised_tokens_per_s"] for r in rows if r["packing"] == flag)
             for flag in (False, True)}
    ratio = speed[True] / speed[False]
    print(table(rows, ["repeat", "packing", "supervised_tokens_per_s", "supervised_tokens", "wall_s", "train_loss"]))
    print(f"packed / padded supervised tokens/s (median): {ratio:.2f}x")
    path = write("packing-cpu", rows, {"ratio_packed_over_padded": round(ratio, 3), "args": vars(args),
                                       "command": "python benchmarks/packing.py " + " ".join(sys.argv[1:])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
