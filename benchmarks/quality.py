"""Finetuning quality of QMiLoRA against QLoRA, QPiSSA (PEFT's recipe) and full-precision LoRA / MiLoRA on a real
small model: exact match on a task the base model cannot do (`--task dates`: dates rewritten as ISO 8601; `--task
bundled`: the held-out rows of the bundled instruction data, six templated skills), and forgetting measured as
perplexity on held-out general text, at init (the quantization damage) and after training. Same data, seeds,
steps, schedule, batch and rank for every method; each (method, seed) trains in this process, one after another.

    python benchmarks/quality.py                                        # all methods x 3 seeds, demo SmolLM2-135M (CPU)
    python benchmarks/quality.py --methods qlora,qmilora --seeds 0      # one timing run
    python benchmarks/quality.py --threads 1     # a CPU shared with other jobs: 2 OpenMP threads there run ~3-10x slower
    python benchmarks/quality.py --model DIR --steps 600 --batch 16 --rank 64 --tag 1b-cuda   # a GPU
    python benchmarks/quality.py --methods qlora,qmilora,qpissa --lrs 1e-4,5e-4,2e-3 --seeds 0   # an LR sweep
    python benchmarks/quality.py --degrid ...    # control: the demo's weights moved off their Q4_1 grid (init_gap.py)
    python benchmarks/quality.py --task bundled --test_rows 80 ...   # the second task: 248 distinct bundled prompts

Methods learn at different speeds at one learning rate, so `--lrs` sweeps learning rates x methods x seeds (the base
model is measured once). Prints a markdown table per (method, lr) (mean ± std over seeds; forgetting both as the
perplexity after training and as its change from the method's own init) and writes
benchmarks/results/quality-<tag>.json (per-run rows with method, lr, seed, variant, task; aggregates; the `missing`
(method, lr, seed) cells of the requested grid; machine, versions, command), rewritten after every run, and
quality-<tag>.png: task EM against news perplexity after training, one line per method through its learning rates,
the base model as a star. Up-left is better: more task learned for less forgetting.
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
from collections import namedtuple
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
from qmilora.data import BUNDLED, DataConfig, build_dataset
from qmilora.demo import NAME as DEMO_NAME, demo_model_dir
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


def bundled_rows(train: int, test: int) -> tuple[list[dict], list[dict]]:
    """qmilora's bundled instruction data (templated rows: sums, products, sorting words, spelling backwards, the
    largest number, weekdays) as chat rows, the user turn joined as the CLI's alpaca path joins it. Repeated prompts
    are kept once (248 of 300 rows remain), so no test prompt is trained on. A fixed shuffled order, independent of
    the training seed: the first `test` are the test set, the next `train` the training set."""
    with open(BUNDLED) as f:
        rows = list({(r["instruction"], r["input"]): r for r in map(json.loads, filter(str.strip, f))}.values())
    if train + test > len(rows):
        raise SystemExit(f"--task bundled has {len(rows)} distinct prompts: --train_rows {train} + --test_rows {test} "
                         "is too many")
    random.Random(300).shuffle(rows)
    chat = [{"messages": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}" if r["input"].strip()
                           else r["instruction"]}, {"role": "assistant", "content": r["output"]}]} for r in rows]
    return chat[test:test + train], chat[:test]


# A task: its id in results, its rows (train, test), the plot's y label, and the greedy decoding budget (every test
# answer must fit it, checked before any training).
Task = namedtuple("Task", "id rows label max_new_tokens")
TASKS = {"dates": Task("dates-iso8601", date_rows, "date task exact match", 12),
         "bundled": Task("bundled-heldout", bundled_rows, "bundled instructions, held-out exact match", 16)}
TASK_IDS = {t.id: t for t in TASKS.values()}


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
def exact_match(model, tok, rows: list[dict], max_new_tokens: int, batch: int = 25) -> float:
    """Greedy decoding of left-padded prompts; share of stripped answers equal to the assistant turn."""
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


def run(method: str, seed: int, lr: float, args, train_set, tok, test: list[dict], windows: dict) -> dict:
    t0 = time.perf_counter()
    model = METHODS[method](args.model, args.rank, seed, args.device)
    keep_training_layout(model)  # bitsandbytes' CPU inference repack would stop gradients after the eval below
    base = model.get_base_model()  # no activation checkpointing, the same for all (prepare_model turns it on):
    (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()  # older name before transformers 5
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable), f"{method}: trains {trainable[:3]}"
    bases = [m.get_base_layer() for m in model.modules() if isinstance(m, LoraLayer)]
    row = {"method": method, "lr": lr, "seed": seed, "variant": args.variant, "task": args.task.id,
           "build_s": time.perf_counter() - t0,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "base_4bit_layers": f"{sum(isinstance(b, bnb.nn.Linear4bit) for b in bases)}/{len(bases)}"}
    row.update({f"ppl_{s}_init": texts.perplexity(model, w, tok) for s, w in windows.items()})
    cuda = torch.device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=lr,
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
    row["em"] = exact_match(model, tok, test, args.task.max_new_tokens)
    row.update({f"ppl_{s}_after": texts.perplexity(model, w, tok) for s, w in windows.items()})
    row["seconds"] = time.perf_counter() - t0
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def summarize(rows: list[dict], base: dict, sources: list[str]) -> list[dict]:
    """Per (method, lr), methods in first-seen order, lrs ascending: mean and std over seeds of every number, the
    change of perplexity from the method's own init (after - init, per run, then mean and std), and the perplexity
    after training minus the fp32 base's."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for lr in sorted({r["lr"] for r in rows if r["method"] == method}):
            mine = [r for r in rows if r["method"] == method and r["lr"] == lr]
            mine = [{**r, **{f"ppl_{s}_delta": r[f"ppl_{s}_after"] - r[f"ppl_{s}_init"] for s in sources}} for r in mine]
            keys = ["em", "train_loss", "seconds"] + [f"ppl_{s}_{w}" for s in sources for w in ("init", "after", "delta")]
            agg = {"method": method, "lr": lr, "seeds": len(mine)}
            for k in keys:
                xs = [r[k] for r in mine]
                agg[k], agg[k + "_std"] = statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
            for s in sources:
                agg[f"dppl_{s}"] = agg[f"ppl_{s}_after"] - base[f"ppl_{s}"]
            out.append(agg)
    return out


def missing_cells(rows: list[dict], grid) -> list[dict]:
    """The (method, lr, seed) cells of the requested grid that no row holds, in grid order."""
    done = {(r["method"], r["lr"], r["seed"]) for r in rows}
    return [{"method": m, "lr": lr, "seed": s} for m, lr, s in grid if (m, lr, s) not in done]


def plot(summary: list[dict], base: dict, source: str, path: str, title: str = "", ylabel: str = "exact match") -> None:
    """Task EM against `source` perplexity after training: one line per method through its lrs (each point labelled
    with its lr, error bars over seeds where there are several), the base model as a star. Up-left is better. Left
    panel: every point; right panel: perplexities up to 1.6x the lowest one after training and the task scores there,
    where the methods that did not collapse are told apart (one collapsed run otherwise squeezes them together)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    lowest = min(a[f"ppl_{source}_after"] for a in summary)
    for ax, zoom in zip(axes, (False, True)):
        for method in dict.fromkeys(a["method"] for a in summary):
            mine = [a for a in summary if a["method"] == method]  # lrs ascending (summarize)
            xs, ys = [a[f"ppl_{source}_after"] for a in mine], [a["em"] for a in mine]
            seeds = max(a["seeds"] for a in mine)
            bars = {"xerr": [a[f"ppl_{source}_after_std"] for a in mine], "yerr": [a["em_std"] for a in mine]} \
                if seeds > 1 else {}
            line = ax.errorbar(xs, ys, fmt="o-", capsize=3, label=f"{method} (n={seeds})" if seeds > 1 else method,
                               **bars)
            for a, x, y in zip(mine, xs, ys):
                if not zoom or x <= 1.6 * lowest:
                    ax.annotate(f"{a['lr']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=line[0].get_color())
        ax.scatter([base[f"ppl_{source}"]], [base["em"]], marker="*", s=150, color="black", label=base["method"],
                   zorder=3)
        ax.set(xlabel=f"{source} perplexity after training (lower = less forgetting)", ylabel=ylabel,
               title=f"{title}, zoom" if zoom else title)
        ax.set_xscale("log")  # perplexity is exp(loss): a log axis is the loss axis
        if zoom:  # the base's task score (near 0) would squeeze the rest: its star is in the left panel
            inside = [a["em"] for a in summary if a[f"ppl_{source}_after"] <= 1.6 * lowest]
            ax.set_xlim(0.95 * lowest, 1.6 * lowest)
            ax.set_ylim(min(inside) - 0.05, max(inside) + 0.05)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        subs = (1.2, 1.5, 2, 3, 4, 5, 6, 7, 8, 9) if zoom else (2, 3, 5)  # the zoom spans less than a decade
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=subs))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4, help="one learning rate (the single-value form of --lrs)")
    p.add_argument("--lrs", help="comma-separated learning rates to sweep (overrides --lr), e.g. 1e-4,5e-4,2e-3")
    p.add_argument("--degrid", action="store_true", help="control: move every linear weight uniformly within its "
                   "Q4_1 cell first (init_gap.degrid, generator seed 0), breaking the demo model's Q4_1 grid")
    p.add_argument("--task", default="dates", choices=list(TASKS), help="dates: ISO 8601 rewriting; bundled: the "
                   "held-out rows of qmilora's bundled instruction data")
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
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [args.lr]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    args.variant = "degrid" if args.degrid else "demo" if args.model is None else "model"
    args.model = args.model or demo_model_dir()
    tag = args.tag or f"{os.path.basename(os.path.normpath(args.model)).lower()}-{torch.device(args.device).type}"
    settings = {k: getattr(args, k) for k in ("methods", "seeds", "steps", "rank", "lr", "lrs", "batch", "seq",
                                              "train_rows", "test_rows", "text", "windows", "model", "degrid",
                                              "variant", "device", "threads")}
    settings["lrs"] = ",".join(f"{lr:g}" for lr in lrs)
    settings["lr"] = lrs[0] if len(lrs) == 1 else None
    args.task = TASKS[args.task]
    settings["task"] = args.task.id
    with tempfile.TemporaryDirectory() as tmp:
        if args.degrid:  # every method then loads the de-gridded checkpoint from this directory
            args.model = write_degridded(args.model, os.path.join(tmp, "degrid"))
        sweep(args, methods, lrs, seeds, sources, settings, tag)


def write_degridded(model_dir: str, target: str) -> str:
    """The checkpoint with init_gap.py's de-gridding applied exactly as there (its --degrid): float64 copies of the
    weights of every linear layer qmilora adapts, in linear_layers order, each moved by degrid() with one generator
    seeded 0, written back as float32. Saved with the tokenizer as a checkpoint directory."""
    from init_gap import degrid
    from qmilora.prepare import linear_layers

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in linear_layers(model).values():
            m.weight.data.copy_(degrid(m.weight.detach().double().clone(), g).float())
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    del model
    gc.collect()
    return target


def sweep(args, methods, lrs, seeds, sources, settings, tag) -> None:
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    train, test = args.task.rows(args.train_rows, args.test_rows)
    longest = max(len(tok(r["messages"][1]["content"], add_special_tokens=False)["input_ids"]) for r in test)
    if longest + 1 > args.task.max_new_tokens:  # + 1: a truncated answer must not pass for an exact one
        raise SystemExit(f"task {args.task.id}: a test answer has {longest} tokens, over its decoding budget")
    with tempfile.TemporaryDirectory() as tmp:  # through qmilora's data path: chat template, response-only labels
        path = os.path.join(tmp, "train.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in train)
        train_set, _, _ = build_dataset(DataConfig(data=path, data_format="chat", max_seq_length=args.seq), tok)
    windows = {s: texts.chunks(s, tok, count=args.windows, length=128) for s in sources}

    t0 = time.perf_counter()
    fp32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map={"": args.device})
    base = {"method": "base (fp32)", "em": exact_match(fp32, tok, test, args.task.max_new_tokens),
            **{f"ppl_{s}": texts.perplexity(fp32, w, tok) for s, w in windows.items()}, "seconds": time.perf_counter() - t0}
    del fp32
    base["variant"] = args.variant
    print(f"base: {base}", flush=True)
    grid = [(m, lr, s) for s in seeds for lr in lrs for m in methods]  # a killed sweep leaves whole lr columns
    rows = []
    for method, lr, seed in grid:
        rows.append(run(method, seed, lr, args, train_set, tok, test, windows))
        print(json.dumps(rows[-1]), flush=True)
        save(rows, base, sources, settings, tag, grid)  # after every run: survives a kill
    report(rows, base, sources, settings, tag, grid)


def requested(settings: dict) -> list[tuple]:
    """The (method, lr, seed) grid a result file's settings asked for (files from before --lrs: their one --lr)."""
    lrs = [float(x) for x in settings["lrs"].split(",")] if settings.get("lrs") else [settings["lr"]]
    seeds = [int(s) for s in str(settings["seeds"]).split(",")]
    return [(m, lr, s) for s in seeds for lr in lrs for m in settings["methods"].split(",")]


def combine(args) -> None:
    """Pool the rows of result files run with the same settings apart from methods, seeds and learning rates (and
    the same model variant); the requested grid is every (method, lr) of theirs with every seed of theirs."""
    parts = [json.load(open(f)) for f in args.combine]
    for part in parts:  # files from before --lrs / --degrid: the demo model (or --model) as it is, the date task
        st = part["settings"]
        variant = "demo" if os.path.basename(os.path.normpath(st["model"])) == DEMO_NAME else "model"
        part["settings"] = {"degrid": False, "variant": variant, "task": TASKS["dates"].id, **st}
    free = ("seeds", "lr", "lrs", "methods")
    norm = lambda st: {k: v for k, v in st.items() if k not in free and k != "combined_from"}  # noqa: E731
    settings = norm(parts[0]["settings"])
    for f, part in zip(args.combine, parts):
        if norm(part["settings"]) != settings:
            raise SystemExit(f"{f} was run with other settings: {norm(part['settings'])} != {settings}")
    rows, grid = [], []
    for part in parts:
        st = part["settings"]  # rows written before --lrs / --degrid carry neither: the file's settings say
        defaults = {"lr": st["lr"], "variant": st["variant"], "task": st["task"]}
        rows += [{**defaults, **r} for r in part["rows"]]
        grid += [c for c in requested(st) if c not in grid]
    # every (method, lr) pooled here is owed every seed pooled here: a rate run with fewer seeds shows as missing
    seeds = sorted({c[2] for c in grid})
    grid = [(m, lr, s) for m, lr in dict.fromkeys((c[0], c[1]) for c in grid) for s in seeds]
    settings["methods"] = ",".join(dict.fromkeys(r["method"] for r in rows))
    settings["seeds"] = ",".join(sorted({str(r["seed"]) for r in rows}))
    lrs = sorted({r["lr"] for r in rows})
    settings["lrs"], settings["lr"] = ",".join(f"{lr:g}" for lr in lrs), lrs[0] if len(lrs) == 1 else None
    settings["combined_from"] = [os.path.basename(f) for f in args.combine]
    report(rows, parts[0]["base"], settings["text"].split(","), settings, args.tag or "combined", grid)


def save(rows: list[dict], base: dict, sources: list[str], settings: dict, tag: str, grid) -> tuple[str, list, list]:
    """Write the JSON (rows, summary so far, missing cells, complete) and the plot; return (path, summary, missing)."""
    summary, missing = summarize(rows, base, sources), missing_cells(rows, grid)
    path = write(f"quality-{tag}", rows, {"settings": settings, "base": base, "summary": summary,
                                          "missing": missing, "complete": not missing})
    title = f"{settings.get('variant', 'demo')}, {settings.get('task', 'dates-iso8601')}, {settings['steps']} steps, " \
        f"r={settings['rank']}" + \
        (f", missing {len(missing)}/{len(grid)} runs" if missing else "")
    task = TASK_IDS.get(settings.get("task"))
    plot(summary, base, sources[0], os.path.join(RESULTS, f"quality-{tag}.png"), title,
         task.label if task else "exact match")
    return path, summary, missing


def report(rows: list[dict], base: dict, sources: list[str], settings: dict, tag: str, grid) -> None:
    path, summary, missing = save(rows, base, sources, settings, tag, grid)
    pm = lambda a, k: f"{a[k]:.3g} ± {a[k + '_std']:.2g}"  # noqa: E731
    shown = [{"method": a["method"], "lr": f"{a['lr']:g}", "seeds": a["seeds"], "task EM": pm(a, "em"),
              **{f"{s} ppl {w}": pm(a, f"ppl_{s}_{w}") for s in sources for w in ("init", "after")},
              **{f"Δ{s} vs own init": pm(a, f"ppl_{s}_delta") for s in sources},
              **{f"Δ{s} vs base": a[f"dppl_{s}"] for s in sources}, "train loss": pm(a, "train_loss"),
              "seconds": pm(a, "seconds")} for a in summary]
    shown.insert(0, {"method": base["method"], "task EM": base["em"],
                     **{f"{s} ppl init": base[f"ppl_{s}"] for s in sources}})
    print(table(shown, list(shown[1])))  # the base row has no "after" columns
    if missing:
        print("missing (method, lr, seed):", ", ".join(f"({c['method']}, {c['lr']:g}, {c['seed']})" for c in missing))
    print("wrote", path)


if __name__ == "__main__":
    main()
