"""qmilora-generate: answer a prompt with a trained QMiLoRA model (chat template when the tokenizer has one)."""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field

from . import parse_flags, run

log = logging.getLogger("qmilora")


@dataclass
class GenerateArgs:
    adapter: str = field(metadata={"help": "A qmilora-train output directory."})
    prompt: str = field(metadata={"help": "The user message."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens to generate."})
    temperature: float = field(default=0.0, metadata={"help": "0 for greedy decoding."})
    merge_on_cpu: bool = field(default=True, metadata={"help": "On a CPU, run the trained model as float32 weights merged once at load (dequantized 4-bit residual + adapter: the same model to float32 rounding, about 20x faster per token there) when they fit in memory; false keeps the 4-bit layers."})
    model: str | None = field(default=None, metadata={"help": "The original checkpoint, when it is not where qmilora.json says (it is verified by content)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where prepared models are cached. Default: $QMILORA_CACHE or ~/.cache/qmilora."})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        # a negative or NaN temperature would silently mean greedy decoding, an infinite one uniform noise
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be 0 (greedy) or positive and finite, got {self.temperature}")


def generate(args: GenerateArgs, stream=None) -> str:
    """The answer to `args.prompt`; with `stream` (a file), its text is also written there as it is generated."""
    import torch
    from transformers import AutoTokenizer

    from .. import inference

    inference.read_run(args.adapter)  # a clear error before any loading
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    model, how = inference.load(args.adapter, args.merge_on_cpu, args.cache_dir, args.model)
    log.info("qmilora-generate: %s", how)
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(model.device)
    sample = args.temperature > 0
    streamer = inference.StreamTo(stream, tokenizer) if stream is not None else None
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature if sample else None, pad_token_id=tokenizer.pad_token_id
                             or tokenizer.eos_token_id, streamer=streamer)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    def body():
        (args,) = parse_flags("qmilora-generate", (GenerateArgs,), sys.argv[1:] if argv is None else argv, __doc__)
        if sys.stdout.isatty():  # a person watching: the answer as it is generated
            generate(args, stream=sys.stdout)
        else:
            print(generate(args))

    return run("qmilora-generate", body)


if __name__ == "__main__":
    sys.exit(main())
