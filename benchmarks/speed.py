"""Speed and memory of each training option, on and off, through `qmilora-train` itself, against QLoRA in the same run.

Rows (each a fresh process; the prepared model comes from one shared cache, filled by a warm-up run first):
    default                  qmilora-train with every default
    <option>=<value>         one option flipped from its default (OPTIONS below; an option this qmilora-train lacks,
                             or one whose requirement is missing, is skipped and listed as such)
    qlora                    PEFT get_peft_model on a transformers 4-bit load (nf4, double quant,
                             prepare_model_for_kbit_training, all-linear, qmilora's rank/alpha/dropout), trained by
                             transformers' Trainer with the TrainingArguments qmilora-train builds from the same flags,
                             on the same tokenized rows batched as the default row batches them (packed or padded)

Every row reports what qmilora-train's run summary reports: supervised tokens/s (labelled positions over the wall
time of Trainer.train, first step included), peak memory (CUDA: max allocated; CPU: peak RSS of the process) and the
final training loss. Rows alternate order between repeats; the table shows medians and ratios against qlora and
against the qmilora default.

    python benchmarks/speed.py --steps 6 --repeat 1                                  # the demo, bundled data, CPU
    python benchmarks/speed.py --shape tiny --seq 256 --steps 4 --options packing    # random weights, CPU
    python benchmarks/speed.py --shape llama2-7b --seq 2048 --steps 4 --repeat 1     # CUDA
    python benchmarks/speed.py --shape llama3-8b --seq 131072 --batch 1 --steps 2 --options none --no_qlora \
        --flags="--offload_activations true --tiled_mlp true" --tag 128k                # long context, CUDA

--flags go to every row (QLoRA's too, which ignores QMiLoRA's own). Each row also shows qmilora-plan's peak for its
settings (`plan_gb`), so a GPU run checks the plan where it measures.

A random checkpoint (--shape, or --checkpoint without a tokenizer) gets a word-level tokenizer over the bundled
data's words; the synthetic data (--data synthetic, the default except for the demo) are plain-text rows whose
lengths run from seq/2 to seq tokens, every token supervised.

Writes benchmarks/results/speed-<shape|demo|model name>-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile

import torch
from transformers import Trainer

from common import SHAPES, run_qmilora, table, write, write_random_checkpoint

# one row per option: (name, qmilora-train flag whose default the row flips, what the row needs besides the flag).
# A flag defaulting to None is automatic (on where it works, as --packing): its row sets it false.
OPTIONS = [
    ("packing", "--packing", None),
    ("chunked_loss", "--chunked_loss", None),
    ("offload_activations", "--offload_activations", None),
    ("activation_checkpointing", "--activation_checkpointing", None),
    ("fused_lora", "--fused_lora", None),
    ("tiled_mlp", "--tiled_mlp", None),
    ("liger", "--use_liger_kernel", "liger"),
]
SPECIALS = ["<unk>", "<pad>", "</s>"]


def requirement_missing(need: str | None) -> str | None:
    """Why a row cannot run here, or None."""
    if need == "liger":
        if not torch.cuda.is_available():
            return "Liger kernels need CUDA"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger_kernel is not installed"
    return None


def option_rows(selected: list[str]) -> tuple[list[tuple[str, list[str]]], dict]:
    """[(row name, flags)] for the selected options that this qmilora-train has, and {option: why skipped}."""
    from qmilora.cli.train import build_parser

    parser, _ = build_parser()
    actions = {s: a for a in parser._actions for s in a.option_strings}
    rows, skipped = [], {}
    for name, flag, need in OPTIONS:
        if name not in selected:
            continue
        if flag not in actions:
            skipped[name] = f"qmilora-train has no {flag}"
            continue
        default = parser.get_default(actions[flag].dest)
        if default is not None and not isinstance(default, bool):
            skipped[name] = f"{flag} defaults to {default!r}, not a boolean to flip"
            continue
        why = requirement_missing(need)
        if why:
            skipped[name] = why
            continue
        value = "false" if default is None else str(not default).lower()
        rows.append((f"{name}={value}", [flag, value]))
    return rows, skipped


def words() -> list[str]:
    """The bundled data's words, sorted: the synthetic text and the random checkpoint's vocabulary."""
    import re

    from qmilora.data import BUNDLED

    found = set()
    for line in open(BUNDLED):
        for value in json.loads(line).values():
            found.update(re.findall(r"\w+", value))
    return sorted(found)


def save_word_tokenizer(directory: str, vocab_size: int) -> None:
    """A word-level tokenizer whose ids all fit an embedding of `vocab_size` rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pool = words()[: vocab_size - len(SPECIALS)]
    vocab = {w: i for i, w in enumerate(SPECIALS + pool)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(directory)


def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, n)) for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def with_tokenizer(directory: str, tmp: str) -> str:
    """`directory` if it has a tokenizer; else a view of it (links to its files) with a word-level tokenizer added,
    so that a checkpoint passed in is never written to."""
    if has_tokenizer(directory):
        return directory
    from transformers import AutoConfig

    view = os.path.join(tmp, "model")
    os.makedirs(view)
    for name in os.listdir(directory):
        os.symlink(os.path.abspath(os.path.join(directory, name)), os.path.join(view, name))
    save_word_tokenizer(view, AutoConfig.from_pretrained(directory).get_text_config().vocab_size)
    return view


def write_data(path: str, directory: str, rows: int, seq: int) -> None:
    """`rows` plain-text rows of seq/2..seq tokens of the model's tokenizer, the same on every call."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    pool = [w for w in words() if tokenizer.convert_tokens_to_ids(w) != tokenizer.unk_token_id] or words()
    rng = random.Random(0)
    sample = [rng.choice(pool) for _ in range(400)]
    per_word = len(tokenizer(" ".join(sample))["input_ids"]) / len(sample)  # 1 for the word-level tokenizer
    with open(path, "w") as f:
        for _ in range(rows):
            n = max(1, round((rng.randint(seq // 2, seq) - 1) / per_word))  # one token left for </s>
            f.write(json.dumps({"text": " ".join(rng.choice(pool) for _ in range(n))}) + "\n")


def cap_memory() -> None:
    """This process's CUDA memory capped at $QMILORA_BENCH_GPU_CAP GiB (a smaller card on a larger one): the
    qmilora-train rows' child and the QLoRA child alike."""
    cap = os.environ.get("QMILORA_BENCH_GPU_CAP")
    if cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * 2**30 / total))


def measure(name: str, argv: list[str], out: str, cache: str, gpu_cap: float | None = None) -> dict:
    """One row in a fresh process: qmilora-train, or the QLoRA child; what its run summary says."""
    env = {"QMILORA_CACHE": cache, "TQDM_DISABLE": "1"}
    if gpu_cap:
        env["QMILORA_BENCH_GPU_CAP"] = str(gpu_cap)
    if name == "qlora":
        command = [sys.executable, os.path.abspath(__file__), "--child", "qlora", *argv, "--output_dir", out]
        proc = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        summary = json.loads(lines[-1][len("RESULT "):]) if lines and not proc.returncode else None
        shown = command
    else:
        if gpu_cap:  # qmilora-train's own main, in a child that caps its memory first
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "train", *argv,
                                   "--output_dir", out], env={**os.environ, **env}, capture_output=True, text=True)
        else:
            proc = run_qmilora("train", [*argv, "--output_dir", out], env)
        summary = None if proc.returncode else json.load(open(os.path.join(out, "qmilora.json")))["summary"]
        shown = proc.args
    row = {"row": name, "rc": proc.returncode, "command": " ".join(shown)}
    if summary is None:
        row["rc"] = row["rc"] or 1
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        row["error"] = tail[-1] if tail else "no output"
        return row
    return {**row, "tokens_per_s": summary["tokens_per_second"], "peak_memory_gb": summary["peak_memory_gb"],
            "train_loss": round(summary["train_loss"], 4), "wall_s": summary["wall_seconds"],
            "supervised_tokens": summary["supervised_tokens"], "steps": summary["steps"], "loss": summary["loss"],
            "packing": summary.get("packing"), "fused_lora": summary.get("fused_lora")}


class CountingTrainer(Trainer):
    """transformers' Trainer counting supervised tokens as qmilora-train's summary does (the first label of a row
    is never a target)."""

    supervised_tokens = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        if inputs.get("labels") is not None:
            self.supervised_tokens += int((inputs["labels"][..., 1:] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)


def qlora_child(argv: list[str]) -> None:
    """The qlora row: qmilora-train's flags parsed by qmilora-train's own parser, the data built by qmilora's data
    code and batched by qmilora-train's collator choice (packed where the default packs), the model made by PEFT on a
    transformers 4-bit load. Prints `RESULT {summary}`."""
    import time

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qmilora import cpu
    from qmilora.cli.train import parse
    from qmilora.data import build_dataset
    from qmilora.quantize import keep_training_layout
    from qmilora.train import _peak_gb, choose_collator  # the memory probe of qmilora-train's summary

    cap_memory()
    run, qcfg, dcfg, args = parse(argv)
    threads, _ = cpu.choose(qcfg.threads)
    cpu.apply(threads)
    tokenizer = AutoTokenizer.from_pretrained(run.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set, _, _ = build_dataset(dcfg, tokenizer)
    device = "cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qcfg.quant_type,
                             bnb_4bit_use_double_quant=qcfg.double_quant,
                             bnb_4bit_compute_dtype=qcfg.torch_compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(run.model, quantization_config=bnb, dtype=qcfg.torch_compute_dtype,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.activation_checkpointing,
                                            gradient_checkpointing_kwargs=args.activation_checkpointing_kwargs)
    targets = "all-linear" if qcfg.target_modules == ["all-linear"] else qcfg.target_modules
    lora = LoraConfig(r=qcfg.rank, lora_alpha=qcfg.lora_alpha or qcfg.rank, lora_dropout=qcfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    keep_training_layout(model)
    collator, packed = choose_collator(model, tokenizer, dcfg.packing, train_set,
                                       args.per_device_train_batch_size * dcfg.max_seq_length)
    if args.include_num_input_tokens_seen == "all":  # as qmilora-train counts them (real tokens, no padding)
        args.include_num_input_tokens_seen = "non_padding"
    trainer = CountingTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                              processing_class=tokenizer)
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "steps": trainer.state.global_step, "supervised_tokens": trainer.supervised_tokens,
        "wall_seconds": round(wall, 2), "tokens_per_second": round(trainer.supervised_tokens / max(wall, 1e-9), 1),
        "peak_memory_gb": round(_peak_gb(args), 3), "train_loss": result.training_loss, "loss": "model",
        "packing": packed, "fused_lora": False}), flush=True)


def planned(row: str, argv: list[str], directory: str, packed: bool | None) -> float | None:
    """qmilora-plan's training peak (GB) for a row's settings and the batching it ran with (QLoRA's column for the
    qlora row)."""
    from transformers import AutoConfig

    from qmilora.cli.train import parse
    from qmilora.plan import PlanConfig, plan

    run, qcfg, dcfg, args = parse([*argv, "--output_dir", "unused"])
    cfg = PlanConfig(model=directory, max_seq_length=dcfg.max_seq_length,
                     per_device_train_batch_size=args.per_device_train_batch_size,
                     activation_checkpointing=args.activation_checkpointing, optim=args.optim,
                     chunked_loss=run.chunked_loss and not args.use_liger_kernel,
                     offload_activations=run.offload_activations, tiled_mlp=run.tiled_mlp,
                     packing=packed if isinstance(packed, bool) else dcfg.packing)
    p = plan(cfg, qcfg, AutoConfig.from_pretrained(directory))
    return round(p["qlora_train_peak_gb" if row == "qlora" else "train_peak_gb"], 3)


def median_rows(runs: list[dict], names: list[str]) -> list[dict]:
    """One row per name: medians over its successful runs, ratios against qlora and the qmilora default."""
    rows = []
    for name in names:
        ok = [r for r in runs if r["row"] == name and not r["rc"]]
        row = {"row": name, "runs": f"{len(ok)}/{sum(r['row'] == name for r in runs)}"}
        if ok:
            for key in ("tokens_per_s", "peak_memory_gb", "train_loss", "wall_s", "plan_gb"):
                row[key] = statistics.median(r[key] for r in ok)
            row.update({k: ok[0].get(k) for k in ("loss", "packing", "fused_lora")})
        rows.append(row)
    base = {r["row"]: r for r in rows}
    for row in rows:
        for ref, tag in (("qlora", "qlora"), ("default", "default")):
            other = base.get(ref, {})
            if "tokens_per_s" in row and other.get("tokens_per_s"):
                row[f"speed_vs_{tag}"] = round(row["tokens_per_s"] / other["tokens_per_s"], 3)
                row[f"memory_vs_{tag}"] = round(row["peak_memory_gb"] / other["peak_memory_gb"], 3)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="a checkpoint directory (default: the demo model, unless --shape is given)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="write a random checkpoint of this shape")
    source.add_argument("--checkpoint", help="a checkpoint directory of --shape's shape (e.g. written earlier by "
                                             "common.write_random_checkpoint) instead of writing one")
    p.add_argument("--data", choices=("synthetic", "bundled"),
                   help="synthetic rows of seq/2..seq tokens (default), or the bundled set (default for the demo)")
    p.add_argument("--seq", type=int, default=512, help="longest synthetic row, and --max_seq_length")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4, help="--per_device_train_batch_size (qmilora-train's default: 4)")
    p.add_argument("--rank", type=int, help="--rank (default: qmilora-train's)")
    p.add_argument("--repeat", type=int, default=1, help="runs of every row; the order alternates between repeats")
    p.add_argument("--flags", default="", help="more qmilora-train flags for every row, e.g. --flags=\"--tiled_mlp true\"")
    p.add_argument("--gpu_cap", type=float, help="GiB: cap every row's CUDA memory (torch's per-process fraction) "
                   "as on a smaller card, e.g. 23 for a 24 GB card less its CUDA context; a row that needs more fails")
    p.add_argument("--no_qlora", action="store_true", help="leave out the QLoRA row (where it cannot fit)")
    p.add_argument("--cache", help="the prepared-model cache to use and keep (default: a temporary one)")
    p.add_argument("--tag", default="", help="appended to the result's file name (e.g. the sequence length)")
    p.add_argument("--options", default="all",
                   help=f"comma-separated subset of {', '.join(n for n, _, _ in OPTIONS)}, 'all' or 'none'")
    args = p.parse_args()
    names = [n for n, _, _ in OPTIONS]
    selected = names if args.options == "all" else [] if args.options == "none" else args.options.split(",")
    unknown = sorted(set(selected) - set(names))
    if unknown:
        p.error(f"--options: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.checkpoint and not args.shape:
        p.error("--checkpoint needs --shape (the shape it was written at, which names the result)")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants, skipped = option_rows(selected)
    with tempfile.TemporaryDirectory(prefix="qmilora-speed-") as tmp:
        if args.model:
            directory, label = os.path.abspath(args.model), os.path.basename(os.path.normpath(args.model))
        elif args.checkpoint:
            directory, label = os.path.abspath(args.checkpoint), args.shape
        elif args.shape:
            directory, label = os.path.join(tmp, "ckpt"), args.shape
            print(f"writing a random {args.shape} checkpoint", flush=True)
            write_random_checkpoint(args.shape, directory, positions=max(4096, args.seq))
        else:
            from qmilora.demo import demo_model_dir

            directory, label = demo_model_dir(), "demo"
        directory = with_tokenizer(directory, tmp)
        data = args.data or ("bundled" if label == "demo" else "synthetic")
        base = ["--model", directory, "--per_device_train_batch_size", str(args.batch), "--save_strategy", "no",
                "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "0"]
        if args.rank:
            base += ["--rank", str(args.rank)]
        base += shlex.split(args.flags)
        if data == "synthetic":
            path = os.path.join(tmp, "data.jsonl")
            write_data(path, directory, max(2, args.steps * args.batch), args.seq)
            base += ["--data", path, "--max_seq_length", str(args.seq)]
        cache = os.path.abspath(args.cache) if args.cache else os.path.join(tmp, "cache")
        print("warm-up (prepares the model into the shared cache)", flush=True)
        # one short step: preparation is what it is for (a long-context step would double the step's time)
        warm = measure("warm-up", [*base, "--max_steps", "1", "--max_seq_length", str(min(args.seq, 256))],
                       os.path.join(tmp, "warm"), cache)
        if warm["rc"]:
            sys.exit(f"the warm-up run failed: {warm['error']}\n{warm['command']}")
        order = [("default", [])] + variants + ([] if args.no_qlora else [("qlora", [])])
        runs = []
        for i in range(args.repeat):
            for name, flags in (order if i % 2 == 0 else order[::-1]):
                argv = [*base, "--max_steps", str(args.steps), *flags]
                row = measure(name, argv, os.path.join(tmp, f"{name}-{i}"), cache, args.gpu_cap)
                runs.append({"repeat": i, **row, "plan_gb": planned(name, argv, directory, row.get("packing"))})
                shown = {k: v for k, v in runs[-1].items() if k != "command"}
                print(json.dumps(shown), flush=True)  # in the log even if a later row fails

    rows = median_rows(runs, [n for n, _ in order])
    print(table(rows, ["row", "runs", "tokens_per_s", "peak_memory_gb", "plan_gb", "train_loss", "loss", "packing", "fused_lora",
                       "speed_vs_qlora", "memory_vs_qlora", "speed_vs_default", "memory_vs_default"]))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    failed = [r for r in runs if r["rc"]]
    for r in failed:
        print(f"FAILED {r['row']} (repeat {r['repeat']}): {r['error']}\n  {r['command']}")
    settings = {"model": label, "data": data, "seq": args.seq if data == "synthetic" else None, "steps": args.steps,
                "batch": args.batch, "rank": args.rank, "repeat": args.repeat, "device": device,
                "gpu_cap_gib": args.gpu_cap}
    path = write(f"speed-{label}-{device}" + (f"-{args.tag}" if args.tag else ""), rows, {"settings": settings, "skipped": skipped, "runs": runs,
                                                  "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:])})
    print(f"wrote {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    if sys.argv[1:3] == ["--child", "qlora"]:
        qlora_child(sys.argv[3:])
    elif sys.argv[1:3] == ["--child", "train"]:
        from qmilora.cli.train import main as train_main

        cap_memory()
        sys.exit(train_main(sys.argv[3:]))
    else:
        main()
