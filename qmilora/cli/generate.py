"""qmilora-generate: answer a prompt with a trained QMiLoRA model (chat template when the tokenizer has one)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from . import parse_flags, run


@dataclass
class GenerateArgs:
    adapter: str = field(metadata={"help": "A qmilora-train output directory."})
    prompt: str = field(metadata={"help": "The user message."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens to generate."})
    temperature: float = field(default=0.0, metadata={"help": "0 for greedy decoding."})


def generate(args: GenerateArgs) -> str:
    import torch
    from transformers import AutoTokenizer

    from ..runfolder import RunFolder
    from ..train import load_trained

    RunFolder(args.adapter).read_complete()  # a clear error before any loading
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    model = load_trained(args.adapter, lora_dropout=0.0).eval()
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(model.device)
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature if sample else None, pad_token_id=tokenizer.pad_token_id
                             or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    def body():
        (args,) = parse_flags("qmilora-generate", (GenerateArgs,), sys.argv[1:] if argv is None else argv, __doc__)
        print(generate(args))

    return run("qmilora-generate", body)


if __name__ == "__main__":
    sys.exit(main())
