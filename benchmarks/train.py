"""Training cost of QMiLoRA against QLoRA (PEFT get_peft_model on a transformers 4-bit model with
prepare_model_for_kbit_training) in the same run: same random-weight checkpoint, rank, targets (all-linear),
micro-batch, sequence length, optimizer, compute dtype and gradient checkpointing. Each method runs in its own
process, so its peak memory is its own. Methods:

    qlora                 frozen non-4-bit tensors upcast to float32 (PEFT), the model's loss (full logits)
    qmilora-model-loss    frozen tensors in the compute dtype, the model's loss
    qmilora               frozen tensors in the compute dtype, the chunked loss (qmilora-train's default)

    python benchmarks/train.py --shape tiny --seq 256 --steps 10                                   # CPU
    python benchmarks/train.py --shape bigvocab --seq 512 --steps 10 --compute_dtype bfloat16       # CPU, 128k vocab
    python benchmarks/train.py --shape llama2-7b --seq 2048 --steps 20                             # CUDA
    python benchmarks/train.py --shape qwen3-moe-2l --seq 2048 --steps 10                          # CUDA, MoE

On a MoE shape QLoRA is what PEFT makes of it: transformers leaves the expert stacks unquantized (upcast to float32
by PEFT's k-bit preparation) and PEFT's "all-linear" adapts them, and the routers, with its parameter LoRA.

Prints a table with QMiLoRA/QLoRA ratios and writes benchmarks/results/train-<shape>-<device>.json.
"""
from __future__ import annotations

import tempfile
import time

import torch

from common import bench_config, compare, comparison_parser, peak_mb, reset_peak, table, write

METHODS = ["qlora", "qmilora-model-loss", "qmilora"]


def build(method: str, directory: str, rank: int, device: torch.device, compute_dtype: str | None):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qmilora import prepare_model

    cfg = bench_config(rank, device, compute_dtype=compute_dtype)
    if method.startswith("qmilora"):
        return prepare_model(directory, cfg)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=cfg.torch_compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=bnb, dtype=cfg.torch_compute_dtype,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    moe = any(p.dim() == 3 for p in model.parameters())  # PEFT adapts expert stacks only without dropout
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0 if moe else 0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def measure(method: str, directory: str, args) -> dict:
    """Runs in a child process: build the model, then time `steps` optimizer steps after `warmup`."""
    from transformers import Trainer, TrainingArguments

    from qmilora import loss as lm_loss

    device = torch.device(args.device)
    reset_peak(device)
    base_mb = peak_mb(device)  # the process before the model: interpreter and libraries
    model = build(method, directory, args.rank, device, args.compute_dtype)
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
            if method == "qmilora":
                with lm_loss.LastHidden(model) as last:
                    model(**lm_loss.hidden_state_inputs({"input_ids": ids}))
                loss = lm_loss.chunked_causal_lm_loss(model.get_output_embeddings(), last.value, ids, vocab)
            else:
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
            "model_mb": peak_mb(device) - base_mb, "from_cache": getattr(getattr(model, "qmilora_stats", None), "from_cache", None), "losses": [round(v, 4) for v in losses], "final_loss": losses[-1],
            "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if device.type == "cuda" else None}


def main() -> None:
    p = comparison_parser(__doc__)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compute_dtype", choices=("float32", "bfloat16", "float16"),
                   help="for every method; default: bfloat16 on a GPU that supports it, else float32")
    args = p.parse_args()
    rows, _ = compare(__file__, args, METHODS, measure)
    q = rows[0]
    ratios = [{"method": f"{m['method']}/qlora", **{k: m[k] / q[k] for k in ("tokens_per_s", "step_s", "peak_mb",
                                                                              "model_mb", "trainable_params")}}
              for m in rows[1:]]
    cols = ["method", "tokens_per_s", "step_s", "peak_mb", "model_mb", "trainable_params", "final_loss"]
    print(table(rows + ratios, cols))
    settings = {k: getattr(args, k) for k in ("shape", "device", "rank", "seq", "batch", "steps", "warmup",
                                              "compute_dtype")}
    name = f"train-{args.shape}-{torch.device(args.device).type}" + ("-" + args.compute_dtype if args.compute_dtype else "")
    print("wrote", write(name, rows + ratios, {"settings": settings}))


if __name__ == "__main__":
    main()
