"""qmilora-export: take a trained QMiLoRA model away. --to merged: the trained model as a plain checkpoint (what to
serve); --to original-lora / original-merged: the update on the ORIGINAL base (a LoRA for vLLM or merging tools,
or merged weights), which differs from the trained model by the 4-bit rounding it trained around. Each export
prints how far it is from the trained model (loss, top-1 agreement) on rows of the run's own data."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from . import parse_flags, run

# --to: what each export is; the old name, whose meaning was ambiguous, is answered with the new one
KINDS = ("merged", "original-lora", "original-merged")
RENAMED = {"lora": "original-lora"}


@dataclass
class ExportArgs:
    adapter: str = field(metadata={"help": "A qmilora-train output directory."})
    output: str = field(metadata={"help": "Directory to write; must not exist or be empty (see --overwrite)."})
    to: str = field(metadata={"help": "merged: the trained model (dequantized NF4 residual + s·B·A) as a plain "
                                      "checkpoint in --dtype; original-lora: a rank-2r LoRA for the original 16-bit "
                                      "base; original-merged: that update merged into the original weights. The "
                                      "original-base exports are not the trained model (docs/export.md)."})
    dtype: str | None = field(default=None, metadata={"help": "--to merged: dtype of the written weights (default "
                                                              "bfloat16). The original-base exports keep the "
                                                              "checkpoint's dtypes.", "choices": ("bfloat16", "float16", "float32")})
    model: str | None = field(default=None, metadata={"help": "The original checkpoint, when it is not where qmilora.json says."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output directory."})
    correction_rank: int = field(default=0, metadata={"help": "original-lora / original-merged: also carry a rank-k approximation of the residual's 4-bit rounding error, weighted by the run's training inputs (a rank-2r+k LoRA, closer to the trained model; docs/export.md). 0: none."})
    calibration_rows: int = field(default=32, metadata={"help": "--correction_rank: training rows whose layer inputs weight the approximation."})
    measure_rows: int = field(default=8, metadata={"help": "Rows of the run's eval split (else of its training data) on which to measure the export against the trained model; 0 skips."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where prepared models are cached. Default: $QMILORA_CACHE or ~/.cache/qmilora."})

    def __post_init__(self) -> None:
        if self.to in RENAMED:
            raise ValueError(f"--to {self.to} is now --to {RENAMED[self.to]} (a LoRA for the original base, "
                             "not the trained model); --to merged writes the trained model")
        if self.to not in KINDS:
            raise ValueError(f"--to: invalid choice {self.to!r} (choose from {', '.join(KINDS)})")
        if self.dtype is not None and self.to != "merged":
            raise ValueError(f"--dtype applies to --to merged only; --to {self.to} keeps the original checkpoint's "
                             "dtypes")
        if self.correction_rank and self.to == "merged":
            raise ValueError("--correction_rank applies to the original-base exports; --to merged is the trained "
                             "model already")
        if self.correction_rank < 0 or self.calibration_rows < 1:
            raise ValueError(f"--correction_rank must be >= 0 and --calibration_rows >= 1, got "
                             f"{self.correction_rank} and {self.calibration_rows}")
        if self.measure_rows < 0:
            raise ValueError(f"--measure_rows must be >= 0, got {self.measure_rows}")


def main(argv: list[str] | None = None) -> int:
    def body():
        from .. import export

        (args,) = parse_flags("qmilora-export", (ExportArgs,), sys.argv[1:] if argv is None else argv, __doc__)
        if args.to == "merged":
            path, _ = export.to_merged(args.adapter, args.output, args.model, args.overwrite, args.dtype or "bfloat16",
                                       args.measure_rows, args.cache_dir)
        else:
            fn = export.to_original_lora if args.to == "original-lora" else export.to_original_merged
            path, _ = fn(args.adapter, args.output, args.model, args.overwrite, args.measure_rows,
                         args.correction_rank, args.calibration_rows, args.cache_dir)
        print(f"qmilora-export: wrote {path} ({args.to})")

    return run("qmilora-export", body)


if __name__ == "__main__":
    sys.exit(main())
