"""Finetuning quality of QMiLoRA against QLoRA, QPiSSA (PEFT's recipe) and full-precision LoRA / MiLoRA on a real
small model: exact match on a task the base model cannot do (dates rewritten as ISO 8601), and forgetting measured
as perplexity on held-out general text, at init (the quantization damage) and after training. Same data, seeds,
steps, schedule, batch and rank for every method; each (method, seed) trains in this process, one after another.

    python benchmarks/quality.py                                        # all methods x 3 seeds, demo SmolLM2-135M (CPU)
    python benchmarks/quality.py --methods qlora,qmilora --seeds 0      # one timing run
    python benchmarks/quality.py --threads 1     # a CPU shared with other jobs: 2 OpenMP threads there run ~3-10x slower
    python benchmarks/quality.py --model DIR --steps 600 --batch 16 --rank 64 --tag 1b-cuda   # a GPU

Prints a markdown table per method (mean ± std over seeds) and writes benchmarks/results/quality-<tag>.json (per-seed
rows, aggregates, machine, versions, command) and quality-<tag>.png (task EM against news perplexity after training).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time
from functools import partial

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                          TrainingArguments, set_seed)

import texts
from common import RESULTS, table, write
from qmilora import QMiLoRAConfig, prepare_model
from qmilora.data import DataConfig, build_dataset
from qmilora.demo import demo_model_dir
from qmilora.quantize import keep_training_layout

MONTHS = ("January February March April May June July August September October November December").split()
STYLES = (lambda d, m, y: f"{MONTHS[m - 1]} {d}, {y}", lambda d, m, y: f"{d} {MONTHS[m - 1]} {y}",
          lambda d, m, y: f"{MONTHS[m - 1][:3]} {d} {y}", lambda d, m, y: f"the {ordinal(d)} of {MONTHS[m - 1]}, {y}",
          lambda d, m, y: f"{MONTHS[m - 1]} {ordinal(d)}, {y}", lambda d, m, y: f"{d}-{MONTHS[m - 1][:3]}-{y}")
PROMPT = "Rewrite the date in ISO 8601 format (YYYY-MM-DD): {}"


def ordinal(d: int) -> str:
    return f"{d}{'th' if 10 <= d % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')}"


def date_rows(train: int, test: int) -> tuple[list[dict], list[dict]]:
    """Chat rows with distinct dates (1900-2099) in a fixed shuffled order, independent of the training seed: the
    first `test` are the test set (the same whatever `train` is), the next `train` the training set."""
    import datetime

    rng, first = random.Random(8601), datetime.date(1900, 1, 1)
    days = list(range((datetime.date(2099, 12, 31) - first).days + 1))
    rng.shuffle(days)
    rows = []
    for n in days[:test + train]:
        d = first + datetime.timedelta(days=n)
        question = PROMPT.format(rng.choice(STYLES)(d.day, d.month, d.year))
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": d.isoformat()}]})
    return rows[test:], rows[:test]


# ---- methods: builder(model_dir, rank, seed, device) -> trainable PeftModel -------------------------------------
def bnb_config(dtype):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def lora_config(rank: int, alpha: float, init=True):
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM",
                      init_lora_weights=init)


def build_lora(model_dir, rank, seed, device, quantized=False):
    """LoRA (alpha 2r, PEFT's default init) on the fp32 model, or QLoRA on transformers' NF4 double-quant model."""
    set_seed(seed)
    dtype = QMiLoRAConfig(rank=rank).torch_compute_dtype if quantized else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": device},
                                                 quantization_config=bnb_config(dtype) if quantized else None)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(rank, 2 * rank))


def build_qmilora(model_dir, rank, seed, device, **overrides):
    """QMiLoRA (alpha = r); `overrides` are QMiLoRAConfig fields, e.g. quantize=False for full-precision MiLoRA."""
    set_seed(seed)
    return prepare_model(model_dir, QMiLoRAConfig(**{"rank": rank, "lora_dropout": 0.05,
                                                     "device": device, **overrides}))


def build_qpissa(model_dir, rank, seed, device):
    """PEFT's QPiSSA recipe (examples/pissa_finetuning): PiSSA init (alpha = r) on the fp32 model, save the adapter
    and the residual base W - BA, reload the residual as NF4, load the adapter on it trainable."""
    set_seed(seed)
    dtype = QMiLoRAConfig(rank=rank).torch_compute_dtype
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map={"": device})
        pissa = get_peft_model(fp32, lora_config(rank, rank, init="pissa"))
        pissa.peft_config["default"].init_lora_weights = True  # reload as saved, no second SVD of the 4-bit residual
        pissa.save_pretrained(os.path.join(tmp, "adapter"))
        pissa.unload().save_pretrained(os.path.join(tmp, "residual"))
        del fp32, pissa
        base = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "residual"), dtype=dtype, device_map={"": device},
                                                    quantization_config=bnb_config(dtype))
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        model = PeftModel.from_pretrained(base, os.path.join(tmp, "adapter"), is_trainable=True)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]  # the recipe kept its promise: a 4-bit base
    assert layers and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in layers), "QPiSSA base not 4-bit"
    return model  # trainable: run() asserts that exactly the LoRA factors require grad


METHODS = {
    "qlora": partial(build_lora, quantized=True),
    "qmilora": build_qmilora,
    "qmilora-cal": partial(build_qmilora, calibration_data="bundled"),  # issue 9: GPTQ rounding of the residual
    "qpissa": build_qpissa,
    "lora": build_lora,
    "milora": partial(build_qmilora, quantize=False),
}


# ---- measurement ---------------------------------------------------------------------------------------------------
def exact_match(model, tok, rows: list[dict], batch: int = 25, max_new_tokens: int = 12) -> float:
    """Greedy decoding of left-padded prompts; share of stripped answers equal to the ISO date."""
    model.eval()
    device, hits = next(model.parameters()).device, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts = [tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True) for r in chunk]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        answers = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        hits += sum(a.strip() == r["messages"][1]["content"] for a, r in zip(answers, chunk))
    return hits / len(rows)


def run(method: str, seed: int, args, train_set, tok, test: list[dict], windows: dict) -> dict:
    t0 = time.perf_counter()
    model = METHODS[method](args.model, args.rank, seed, args.device)
    keep_training_layout(model)  # bitsandbytes' CPU inference repack would stop gradients after the eval below
    base = model.get_base_model()  # no activation checkpointing, the same for all (prepare_model turns it on):
    (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()  # older name before transformers 5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable), f"{method}: trains {trainable[:3]}"
    bases = [m.get_base_layer() for m in model.modules() if isinstance(m, LoraLayer)]
    row = {"method": method, "seed": seed, "build_s": time.perf_counter() - t0,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "base_4bit_layers": f"{sum(isinstance(b, bnb.nn.Linear4bit) for b in bases)}/{len(bases)}"}
    row.update({f"ppl_{s}_init": texts.perplexity(model, w, tok) for s, w in windows.items()})
    cuda = torch.device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
            lr_scheduler_type="cosine", warmup_steps=0.03, optim="adamw_torch", seed=seed, save_strategy="no",
            logging_steps=max(1, args.steps // 10), report_to="none", disable_tqdm=True, use_cpu=not cuda,
            bf16=cuda and torch.cuda.is_bf16_supported(), remove_unused_columns=False)
        set_seed(seed)
        trainer = Trainer(model=model, args=targs, train_dataset=train_set,
                          data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, pad_to_multiple_of=8))
        t1 = time.perf_counter()
        result = trainer.train()
        row["train_s"] = time.perf_counter() - t1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row.update(train_loss=result.training_loss, final_loss=losses[-1] if losses else None)
    row["em"] = exact_match(model, tok, test)
    row.update({f"ppl_{s}_after": texts.perplexity(model, w, tok) for s, w in windows.items()})
    row["seconds"] = time.perf_counter() - t0
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def summarize(rows: list[dict], base: dict, sources: list[str]) -> list[dict]:
    """Per method: mean and std over seeds of every number, plus ppl after training minus the fp32 base's."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        keys = ["em", "train_loss", "seconds"] + [f"ppl_{s}_{w}" for s in sources for w in ("init", "after")]
        agg = {"method": method, "seeds": len(mine)}
        for k in keys:
            xs = [r[k] for r in mine]
            agg[k], agg[k + "_std"] = statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
        for s in sources:
            agg[f"dppl_{s}"] = agg[f"ppl_{s}_after"] - base[f"ppl_{s}"]
        out.append(agg)
    return out


def plot(summary: list[dict], base: dict, source: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for a in summary:
        ax.errorbar(a[f"ppl_{source}_after"], a["em"], xerr=a[f"ppl_{source}_after_std"], yerr=a["em_std"],
                    fmt="o", capsize=3, label=a["method"])
    ax.scatter([base[f"ppl_{source}"]], [base["em"]], marker="*", s=150, color="black", label="base (fp32)", zorder=3)
    ax.set(xlabel=f"{source} perplexity after training (lower = less forgetting)", ylabel="date task exact match")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="max_seq_length of the training examples")
    p.add_argument("--train_rows", type=int, default=160)
    p.add_argument("--test_rows", type=int, default=100)
    p.add_argument("--text", default="news,pydoc", help=f"perplexity sources, from {', '.join(texts.SOURCES)}")
    p.add_argument("--windows", type=int, default=20, help="perplexity windows (of 128 tokens) per source")
    p.add_argument("--model", help="full-precision checkpoint directory (default: the demo SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", help="results file suffix (default: <model dir name>-<device>)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a CPU shared with other jobs)")
    p.add_argument("--combine", nargs="+", metavar="JSON", help="no training: pool the rows of earlier result files "
                   "(e.g. seeds run in parallel processes or on several GPUs) into one summary, table and plot")
    args = p.parse_args()
    if args.combine:
        return combine(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, seeds, sources = args.methods.split(","), [int(s) for s in args.seeds.split(",")], args.text.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    args.model = args.model or demo_model_dir()
    tag = args.tag or f"{os.path.basename(os.path.normpath(args.model)).lower()}-{torch.device(args.device).type}"
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    train, test = date_rows(args.train_rows, args.test_rows)
    with tempfile.TemporaryDirectory() as tmp:  # through qmilora's data path: chat template, response-only labels
        path = os.path.join(tmp, "dates.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in train)
        train_set, _, _ = build_dataset(DataConfig(data=path, data_format="chat", max_seq_length=args.seq), tok)
    windows = {s: texts.chunks(s, tok, count=args.windows, length=128) for s in sources}

    t0 = time.perf_counter()
    fp32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map={"": args.device})
    base = {"method": "base (fp32)", "em": exact_match(fp32, tok, test),
            **{f"ppl_{s}": texts.perplexity(fp32, w, tok) for s, w in windows.items()}, "seconds": time.perf_counter() - t0}
    del fp32
    print(f"base: {base}", flush=True)
    settings = {k: getattr(args, k) for k in ("methods", "seeds", "steps", "rank", "lr", "batch", "seq", "train_rows",
                                              "test_rows", "text", "windows", "model", "device", "threads")}
    rows = []
    for seed in seeds:
        for method in methods:
            rows.append(run(method, seed, args, train_set, tok, test, windows))
            print(json.dumps(rows[-1]), flush=True)
            write(f"quality-{tag}", rows, {"settings": settings, "base": base, "complete": False})  # survives a kill
    report(rows, base, sources, settings, tag)


def combine(args) -> None:
    parts = [json.load(open(f)) for f in args.combine]
    settings = {k: v for k, v in parts[0]["settings"].items() if k != "seeds"}
    for f, part in zip(args.combine, parts):
        other = {k: v for k, v in part["settings"].items() if k != "seeds"}
        if other != settings:
            raise SystemExit(f"{f} was run with other settings: {other} != {settings}")
    rows = [r for part in parts for r in part["rows"]]
    settings["seeds"] = ",".join(sorted({str(r["seed"]) for r in rows}))
    settings["combined_from"] = [os.path.basename(f) for f in args.combine]
    report(rows, parts[0]["base"], settings["text"].split(","), settings, args.tag or "combined")


def report(rows: list[dict], base: dict, sources: list[str], settings: dict, tag: str) -> None:
    summary = summarize(rows, base, sources)
    pm = lambda a, k: f"{a[k]:.3g} ± {a[k + '_std']:.2g}"  # noqa: E731
    shown = [{"method": a["method"], "task EM": pm(a, "em"),
              **{f"{s} ppl {w}": pm(a, f"ppl_{s}_{w}") for s in sources for w in ("init", "after")},
              **{f"Δ{s} ppl": a[f"dppl_{s}"] for s in sources}, "train loss": pm(a, "train_loss"),
              "seconds": pm(a, "seconds")} for a in summary]
    shown.insert(0, {"method": base["method"], "task EM": base["em"],
                     **{f"{s} ppl init": base[f"ppl_{s}"] for s in sources}})
    print(table(shown, list(shown[1])))  # the base row has no "after" columns
    print("wrote", write(f"quality-{tag}", rows, {"settings": settings, "base": base, "summary": summary,
                                                  "complete": True}))
    plot(summary, base, sources[0], os.path.join(RESULTS, f"quality-{tag}.png"))


if __name__ == "__main__":
    main()
