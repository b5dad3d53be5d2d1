"""Training cost of QMiLoRA against QLoRA (PEFT get_peft_model on a transformers 4-bit model) in the same run:
same random-weight checkpoint, rank, targets (all-linear), micro-batch, sequence length, optimizer and
gradient checkpointing. Each method runs in its own process, so its peak memory is its own.

    python benchmarks/train.py --shape tiny --seq 256 --steps 10             # CPU
    python benchmarks/train.py --shape llama2-7b --seq 2048 --steps 20       # CUDA, unchanged

Prints a table with QMiLoRA/QLoRA ratios and writes benchmarks/results/train-<shape>-<device>.json.
"""
from __future__ import annotations

import tempfile
import time

import torch

from common import compare, comparison_parser, peak_mb, reset_peak, table, write


def build(method: str, directory: str, rank: int, device: torch.device):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qmilora import QMiLoRAConfig, prepare_model

    cfg = QMiLoRAConfig(rank=rank, lora_dropout=0.05, device=str(device), prepared_cache=False)
    if method == "qmilora":
        return prepare_model(directory, cfg)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=cfg.torch_compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=bnb, dtype=cfg.torch_compute_dtype,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def measure(method: str, directory: str, args) -> dict:
    """Runs in a child process: build the model, then time `steps` optimizer steps after `warmup`."""
    from transformers import Trainer, TrainingArguments

    device = torch.device(args.device)
    model = build(method, directory, args.rank, device)
    model.train()
    optim = "paged_adamw_8bit" if device.type == "cuda" else "adamw_torch"
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), optim=optim, learning_rate=2e-4, report_to="none",
                              use_cpu=device.type == "cpu")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(targs, model)  # the optimizer qmilora-train would use
    optimizer = cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    reset_peak(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "tokens_per_s": args.steps * args.batch * args.seq / seconds,
            "step_s": seconds / args.steps, "peak_mb": peak_mb(device), "trainable_params": trainable,
            "final_loss": losses[-1],
            "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if device.type == "cuda" else None}


def main() -> None:
    p = comparison_parser(__doc__)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    rows, _ = compare(__file__, args, ["qlora", "qmilora"], measure)
    q, m = rows
    ratios = {"method": "qmilora/qlora", "tokens_per_s": m["tokens_per_s"] / q["tokens_per_s"],
              "step_s": m["step_s"] / q["step_s"], "peak_mb": m["peak_mb"] / q["peak_mb"],
              "trainable_params": m["trainable_params"] / q["trainable_params"]}
    cols = ["method", "tokens_per_s", "step_s", "peak_mb", "trainable_params", "final_loss"]
    print(table(rows + [ratios], cols))
    settings = {k: getattr(args, k) for k in ("shape", "device", "rank", "seq", "batch", "steps", "warmup")}
    print("wrote", write(f"train-{args.shape}-{torch.device(args.device).type}", rows + [ratios], {"settings": settings}))


if __name__ == "__main__":
    main()
