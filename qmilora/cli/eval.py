"""qmilora-eval: mean loss and perplexity of a trained QMiLoRA model on a held-out file, beside the base model's."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

from . import parse_flags, run

log = logging.getLogger("qmilora")


@dataclass
class EvalArgs:
    adapter: str = field(metadata={"help": "A qmilora-train output directory."})
    data: str = field(metadata={"help": "Held-out data file (any format qmilora-train reads)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per forward pass."})
    base: bool = field(default=True, metadata={"help": "Also evaluate the original full-precision base model."})
    merge_on_cpu: bool = field(default=True, metadata={"help": "On a CPU, evaluate the trained model as float32 weights merged once at load (dequantized 4-bit residual + adapter: the same model to float32 rounding, far faster there) when they fit in memory; false keeps the 4-bit layers."})
    model: str | None = field(default=None, metadata={"help": "The original checkpoint, when it is not where qmilora.json says (it is verified by content)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where prepared models are cached. Default: $QMILORA_CACHE or ~/.cache/qmilora."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")


def evaluate(args: EvalArgs) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import inference
    from ..config import QMiLoRAError
    from ..data import DataConfig, build_dataset
    from ..fidelity import diverged, mean_loss  # here, not at the top: --help loads this module and needs no torch

    meta = inference.read_run(args.adapter)
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    # the run's saved tokenizer carries the chat template it trained with (a recorded template file may have moved)
    data_cfg = {**meta["data"], "data": args.data, "val_size": 0.0, "packing": False, "chat_template": "model"}
    if os.path.exists(args.data):  # a file is one split; the run's --data_split named one of its hub dataset's
        data_cfg["data_split"] = "train"
    try:
        rows, _, _ = build_dataset(DataConfig(**data_cfg), tokenizer)
    except QMiLoRAError as err:  # the data module's advice names qmilora-train's flag; eval truncates as the run did
        if not str(err).endswith("; raise --max_seq_length"):
            raise
        raise QMiLoRAError(str(err).removesuffix("raise --max_seq_length") + "qmilora-eval truncates rows as the "
                           "run trained: shorten their prompts, or evaluate a run trained with a larger "
                           "--max_seq_length") from None
    result = {"data": args.data, "examples": len(rows)}
    model, how = inference.load(args.adapter, args.merge_on_cpu, args.cache_dir, args.model)
    log.info("qmilora-eval: trained model: %s; %d rows", how, len(rows))
    loss = mean_loss(model, rows, tokenizer, args.batch_size, desc="qmilora-eval: trained model")
    del model
    if not math.isfinite(loss):
        raise diverged(" on these rows")
    result.update(loss=loss, perplexity=perplexity(loss))
    if args.base:
        source = args.model or meta["source"]["path"]  # load_trained verified it by content above
        log.info("qmilora-eval: the original base model, %s", source)
        base = AutoModelForCausalLM.from_pretrained(source)
        base_loss = mean_loss(base, rows, tokenizer, args.batch_size, desc="qmilora-eval: original base")
        if not math.isfinite(base_loss):
            raise QMiLoRAError(f"the original base model {source} gives non-finite outputs (NaN/Inf) "
                               "on these rows; evaluate without it (--base false)")
        result.update(base_loss=base_loss, base_perplexity=perplexity(base_loss))
    return result


def perplexity(loss: float) -> float | None:
    """exp(loss), or None (JSON null) beyond the largest float: the output stays valid JSON."""
    return math.exp(loss) if loss < math.log(sys.float_info.max) else None


def main(argv: list[str] | None = None) -> int:
    def body():
        (args,) = parse_flags("qmilora-eval", (EvalArgs,), sys.argv[1:] if argv is None else argv, __doc__)
        print(json.dumps(evaluate(args), indent=2, allow_nan=False))

    return run("qmilora-eval", body)


if __name__ == "__main__":
    sys.exit(main())
