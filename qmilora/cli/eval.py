"""qmilora-eval: mean loss and perplexity of a trained QMiLoRA model on a held-out file, beside the base model's."""
from __future__ import annotations

import json
import logging
import math
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


def evaluate(args: EvalArgs) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import inference
    from ..data import DataConfig, build_dataset
    from ..fidelity import mean_loss  # here, not at the top: --help loads this module and needs no torch
    from ..runfolder import RunFolder

    meta = RunFolder(args.adapter).read_complete()
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    # the run's saved tokenizer carries the chat template it trained with (a recorded template file may have moved)
    data_cfg = {**meta["data"], "data": args.data, "val_size": 0.0, "packing": False, "chat_template": "model"}
    rows, _, _ = build_dataset(DataConfig(**data_cfg), tokenizer)
    result = {"data": args.data, "examples": len(rows)}
    model, how = inference.load(args.adapter, args.merge_on_cpu)
    log.info("qmilora-eval: trained model: %s; %d rows", how, len(rows))
    loss = mean_loss(model, rows, tokenizer, args.batch_size, desc="qmilora-eval: trained model")
    del model
    result.update(loss=loss, perplexity=math.exp(loss))
    if args.base:
        log.info("qmilora-eval: the original base model, %s", meta["source"]["path"])
        base = AutoModelForCausalLM.from_pretrained(meta["source"]["path"])
        base_loss = mean_loss(base, rows, tokenizer, args.batch_size, desc="qmilora-eval: original base")
        result.update(base_loss=base_loss, base_perplexity=math.exp(base_loss))
    return result


def main(argv: list[str] | None = None) -> int:
    def body():
        (args,) = parse_flags("qmilora-eval", (EvalArgs,), sys.argv[1:] if argv is None else argv, __doc__)
        print(json.dumps(evaluate(args), indent=2))

    return run("qmilora-eval", body)


if __name__ == "__main__":
    sys.exit(main())
