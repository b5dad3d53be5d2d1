"""README.md cards for what qmilora writes: each says which model it is, which base it belongs to and, where measured,
how far it is from the trained model. They replace PEFT's blank card, which names a base and says nothing else."""
from __future__ import annotations

import os

_WHAT = {
    "merged": ("The trained model as a plain checkpoint: every NF4 residual weight dequantized plus s·B·A, cast once "
               "to {dtype}. Its logits equal the trained model's (`qmilora.train.load_trained`) to {dtype} rounding. "
               "Use it to serve the trained behaviour (transformers, vLLM, llama.cpp conversion)."),
    "original-lora": ("A rank-{rank} LoRA for the ORIGINAL 16-bit base `{base}`: W + s·(B·A − B₀·A₀). It is not "
                      "the trained model, which ran on NF4(W − s·B₀·A₀) + s·B·A: it lacks the 4-bit rounding of "
                      "the residual that the adapter was trained around (see below). Use it where a LoRA on the "
                      "original base is required (vLLM LoRA serving with --max-lora-rank >= {rank}, adapter "
                      "merging); to serve the trained behaviour use `qmilora-export --to merged`."),
    "original-merged": ("W + s·(B·A − B₀·A₀) merged into the ORIGINAL weights of `{base}` (each tensor in its "
                        "stored dtype): the same model as `--to original-lora` on that base, not the trained model "
                        "(see below). To serve the trained behaviour use `qmilora-export --to merged`."),
    "residual": ("The adapter as trained: (B, A) on the prepared residual base NF4(W − s·B₀·A₀) of `{base}`, which "
                 "only QMiLoRA builds; its adapter_config.json names that base, so PEFT's AutoPeftModel refuses to "
                 "load it. On the original `{base}` these weights give a different, much worse model. Load it with "
                 "`qmilora.train.load_trained(<run folder>)`; take the model away with `qmilora-export`."),
}


def text(kind: str, meta: dict, report: dict | None, **fields) -> str:
    base = meta["source"]["model"]
    lines = []
    if kind == "original-lora":
        hub = [] if base.startswith("demo:") or os.path.isabs(base) else [f"base_model: {base}"]
        lines += ["---", "library_name: peft", *hub, "---", ""]
    lines += [f"# QMiLoRA: {kind}", "", _WHAT[kind].format(base=base, **fields) + fields.get("correction", ""), ""]
    if report is not None:
        lines += ["| model | loss | top-1 agreement with the trained model |", "|---|---|---|",
                  f"| trained (NF4 residual + s·B·A) | {report['trained_loss']:.4f} | 100% |",
                  f"| this ({kind}) | {report['loss']:.4f} | {100 * report['top1_agreement']:.1f}% |", "",
                  f"Measured at export on {report['tokens']} supervised tokens of {report['rows']} of the run's data.",
                  ""]
    elif kind in ("original-lora", "original-merged"):
        lines += ["How far it is was not measured for this file (training writes it without a measurement; "
                  "`qmilora-export --measure_rows 0` skips it): `qmilora-export --to original-lora` prints the loss "
                  "and top-1 agreement with the trained model on the run's own data; docs/export.md has the demo's "
                  "numbers.", ""]
    return "\n".join(lines)


def write(directory: str, kind: str, meta: dict, report: dict | None = None, **fields) -> None:
    fields.setdefault("rank", "2r")
    fields.setdefault("dtype", "the dtype asked for")
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(text(kind, meta, report, **fields))
