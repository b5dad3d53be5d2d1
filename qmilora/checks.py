"""Checks before, around and after a training run: arguments that would train something other than asked, where
the cache may live, the files a run reads, a resume with nothing left to train, data the model cannot take, and the
trained adapters (finite, giving a finite loss). Each refuses in one line (`QMiLoRAError`)."""
from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

import torch

from .config import QMiLoRAError

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from .config import QMiLoRAConfig
    from .data import DataConfig


DIVERGED = ("start a new run (--overwrite_output_dir true, or another --output_dir) with a lower --learning_rate, "
            "or check the data")


def check_trained(model, collator, train_set, step: int) -> None:
    """The adapters after the last update: finite, and giving a finite loss on the first training rows (the loss
    check during training sees each update only at the next step's forward, so the last one would pass unseen)."""
    bad = next((n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    if bad:
        raise QMiLoRAError(f"the adapter weight {bad} holds NaN or Inf after step {step}: training diverged, and no "
                           f"final model was written; {DIVERGED}")
    batch = collator(check_rows(train_set))
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    finally:
        model.train(was_training)
    if not torch.isfinite(loss):
        raise QMiLoRAError(f"the trained model's loss on the first training rows is {loss.item()} after step {step}: "
                           f"training diverged, and no final model was written; {DIVERGED}")


def check_finite_adapter(path: str, what: str) -> None:
    """Refuse an adapter file holding NaN or Inf, naming the tensor, before anything loads or trains on it."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise QMiLoRAError(f"{what} holds NaN or Inf in {name}: its training diverged; in qmilora-train, "
                                   f"{DIVERGED}")


def refuse_hub_push(args: TrainingArguments) -> None:
    """Trainer's push uploads --output_dir as Trainer saves into it: the residual-form adapter at its top, which on
    the original base is another, much worse model (issue 27). Pushing starts from an export instead."""
    if args.push_to_hub:
        raise QMiLoRAError("--push_to_hub would upload the residual-form adapter, which runs only on QMiLoRA's 4-bit "
                           "residual base; after training export it (qmilora-export --to merged, or --to "
                           "original-lora) and upload that folder (hf upload)")


_NUMBERS = {"learning_rate": (lambda v: v >= 0, "0 or more"), "weight_decay": (lambda v: v >= 0, "0 or more"),
            "max_grad_norm": (lambda v: v >= 0, "0 (no clipping) or more"),
            "label_smoothing_factor": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
            "logging_steps": (lambda v: v > 0, "positive")}


def check_schedule(args: TrainingArguments) -> None:
    """Schedules that would train nothing, or something other than asked, refused before anything starts."""
    if args.max_steps == 0:
        raise QMiLoRAError("--max_steps 0 trains nothing; give a positive number of steps (or -1 to train "
                           "--num_train_epochs epochs)")
    if args.max_steps < 0 and args.num_train_epochs <= 0:
        raise QMiLoRAError(f"--num_train_epochs {args.num_train_epochs} trains nothing; give a positive number of "
                           "epochs or --max_steps")
    if args.gradient_accumulation_steps < 1:
        raise QMiLoRAError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must be at least 1")
    if args.per_device_train_batch_size < 1:
        raise QMiLoRAError(f"--per_device_train_batch_size {args.per_device_train_batch_size} must be at least 1")
    # values transformers takes without a word and trains on (or fails with late, or ignores)
    for name, (ok, what) in _NUMBERS.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and ok(value)):  # max_grad_norm None: no clipping
            raise QMiLoRAError(f"--{name} {value:g} must be {what}")
    if args.save_total_limit is not None and args.save_total_limit < 0:
        raise QMiLoRAError(f"--save_total_limit {args.save_total_limit} must be 0 or more (or unset: keep all)")


def check_cache_place(cache_dir: str, model_dir: str) -> None:
    """The cache writes only folders of its own (hash-named entries, digests), so it may hold a run's inputs; but
    inside the model checkpoint its entries would become part of that folder (copied and uploaded with it)."""
    cache_real, model_real = os.path.realpath(cache_dir), os.path.realpath(model_dir)
    if cache_real == model_real or cache_real.startswith(model_real.rstrip(os.sep) + os.sep):
        raise QMiLoRAError(f"--cache_dir {cache_dir} is or lies inside the model checkpoint {model_dir}: its entries "
                           "would become part of that folder; choose another --cache_dir")


def read_files(qcfg: QMiLoRAConfig, dcfg: DataConfig) -> dict[str, str | None]:
    """The local files a run reads besides the model (what no output of it may be, contain or lie inside)."""
    from .data import TEMPLATES

    paths = {"the data": dcfg.data, "the chat template": None if dcfg.chat_template in TEMPLATES else dcfg.chat_template,
             "the calibration data": None if qcfg.calibration_data == "bundled" else qcfg.calibration_data}
    return {what: os.path.expanduser(p) for what, p in paths.items() if p and os.path.exists(os.path.expanduser(p))}


def check_not_finished(checkpoint_dir: str, args: TrainingArguments) -> None:
    """A resume that would train nothing new: Trainer would run one step past the end and call the run complete."""
    try:
        with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return
    step, epoch = state.get("global_step", 0), state.get("epoch", 0) or 0
    if args.max_steps > 0 and step >= args.max_steps:
        raise QMiLoRAError(f"{checkpoint_dir} is at step {step}, and --max_steps is {args.max_steps}: there is nothing "
                           "left to train; pass a larger --max_steps to train longer")
    if args.max_steps <= 0 and epoch >= args.num_train_epochs:
        raise QMiLoRAError(f"{checkpoint_dir} has trained {epoch:g} epochs of --num_train_epochs "
                           f"{args.num_train_epochs:g}: there is nothing left to train; pass more epochs to train longer")


CHECK_TOKENS = 128  # per row of the pre-training checks: what they test is the architecture, not the length


def check_rows(train_set) -> list[dict]:
    """Windows of CHECK_TOKENS from the first two training rows, for the checks before and after training: at long
    context the whole rows would need a forward with full-vocabulary logits and no checkpointing (hundreds of GB at
    32k tokens). Each window starts one token before its row's first supervised one, so that it holds supervised
    tokens (a window of prompt alone gives a loss over nothing: NaN). What the checks test is the architecture,
    which any window shows."""
    rows = []
    for i in range(min(2, len(train_set))):
        row = train_set[i]
        first = next((t for t, label in enumerate(row["labels"]) if label != -100), 0)
        start = max(0, first - 1)
        rows.append({k: list(row[k][start:start + CHECK_TOKENS]) for k in ("input_ids", "labels")})
    return rows


def check_data_fits(directory: str, sets: list) -> None:
    """Token ids the embedding has rows for, and sequences no longer than the positions the model has, before the
    model loads: otherwise an index error deep inside the first forward, or positions the model never learned."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory).get_text_config()
    vocab = getattr(config, "vocab_size", None)
    rows = [ids for s in sets for ids in s["input_ids"]]
    longest, top = max(map(len, rows)), max(map(max, rows))
    if isinstance(vocab, int) and top >= vocab:
        raise QMiLoRAError(f"the tokenizer gives token id {top}, but the model's embedding has {vocab} rows: the "
                           "tokenizer does not belong to this model (or has added tokens the model lacks); use the "
                           "model's own tokenizer")
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    extended = isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"  # context extension
    if isinstance(positions, int) and longest > positions and not extended:
        raise QMiLoRAError(f"an example is {longest} tokens long, but the model has {positions} positions; lower "
                           f"--max_seq_length to {positions} or less")
