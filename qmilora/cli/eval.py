"""qmilora-eval: mean loss and perplexity of a trained QMiLoRA model on a held-out file, beside the base model's."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field

from . import parse_flags, run


@dataclass
class EvalArgs:
    adapter: str = field(metadata={"help": "A qmilora-train output directory."})
    data: str = field(metadata={"help": "Held-out data file (any format qmilora-train reads)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per forward pass."})
    base: bool = field(default=True, metadata={"help": "Also evaluate the original full-precision base model."})


def mean_loss(model, rows, tokenizer, batch_size: int) -> float:
    """Token-weighted mean cross-entropy over the labelled tokens of `rows`."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total, count = total + loss.item(), count + int((labels != -100).sum())
    return total / count


def evaluate(args: EvalArgs) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import DataConfig, build_dataset
    from ..runfolder import RunFolder
    from ..train import load_trained

    meta = RunFolder(args.adapter).read_complete()
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    data_cfg = {**meta["data"], "data": args.data, "val_size": 0.0, "packing": False}
    rows, _, _ = build_dataset(DataConfig(**data_cfg), tokenizer)
    result = {"data": args.data, "examples": len(rows)}
    loss = mean_loss(load_trained(args.adapter, lora_dropout=0.0), rows, tokenizer, args.batch_size)
    result.update(loss=loss, perplexity=math.exp(loss))
    if args.base:
        base = AutoModelForCausalLM.from_pretrained(meta["source"]["path"])
        base_loss = mean_loss(base, rows, tokenizer, args.batch_size)
        result.update(base_loss=base_loss, base_perplexity=math.exp(base_loss))
    return result


def main(argv: list[str] | None = None) -> int:
    def body():
        (args,) = parse_flags("qmilora-eval", (EvalArgs,), sys.argv[1:] if argv is None else argv, __doc__)
        print(json.dumps(evaluate(args), indent=2))

    return run("qmilora-eval", body)


if __name__ == "__main__":
    sys.exit(main())
