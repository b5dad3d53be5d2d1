"""Finetuning on transformers' Trainer: defaults, outputs, resumable checkpoints, a run summary.

Output directory:
    adapter_config.json, adapter_model.safetensors   the trained adapter (PEFT format)
    initial_adapter/                                 the minor factors at init (needed to export for the original base)
    qmilora.json                                     every config, the source checkpoint's identity, versions, summary
    tokenizer files, loss.png, checkpoint-N/         (a checkpoint counts only once it holds the `.complete` marker)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from . import checkpoint
from .config import QMiLoRAConfig, QMiLoRAError
from .data import DataConfig, build_dataset

log = logging.getLogger("qmilora")
COMPLETE = ".complete"


@dataclass
class RunConfig:
    _argument_group_name = "model"
    model: str | None = field(default=None, metadata={"help": "Full-precision checkpoint directory or Hub id. Default: the bundled demo model SmolLM2-135M-Instruct.", "aliases": ["--model_name_or_path"]})


def training_defaults() -> dict:
    """QLoRA-style defaults; every one can be overridden by YAML or flags."""
    cuda = torch.cuda.is_available()
    return dict(learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False},
                optim="paged_adamw_8bit" if cuda else "adamw_torch", bf16=cuda and torch.cuda.is_bf16_supported(),
                per_device_train_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=1, logging_steps=5,
                save_strategy="steps", save_steps=200, save_total_limit=2, report_to="none", eval_strategy="no",
                include_num_input_tokens_seen=True, remove_unused_columns=False)


class _Progress(TrainerCallback):
    """Adds tokens/s to the logs and marks each checkpoint complete once Trainer has fully written it."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens_at_start = None

    def on_train_begin(self, args, state, control, **kw):
        self.start, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and state.num_input_tokens_seen:
            elapsed = time.perf_counter() - self.start
            logs["tokens_per_second"] = round((state.num_input_tokens_seen - self.tokens_at_start) / max(elapsed, 1e-9), 1)

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(path):
                open(os.path.join(path, COMPLETE), "w").close()


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N that was written to the end (a run killed mid-save leaves one without the marker)."""
    if not os.path.isdir(output_dir):
        return None
    steps = [int(n.split("-")[1]) for n in os.listdir(output_dir)
             if n.startswith("checkpoint-") and n.split("-")[1].isdigit()
             and os.path.isfile(os.path.join(output_dir, n, COMPLETE))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    if value in (None, "", "false", "False"):
        return None
    if value in ("true", "True", "last"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise QMiLoRAError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
        return found
    if not os.path.isfile(os.path.join(value, COMPLETE)):
        raise QMiLoRAError(f"--resume_from_checkpoint {value}: not a complete qmilora checkpoint directory")
    return value


def train(run: RunConfig, qcfg: QMiLoRAConfig, dcfg: DataConfig, args: TrainingArguments):
    """Prepare, train, and write the outputs; returns (trained PeftModel, run summary)."""
    from .demo import demo_model_dir
    from .prepare import prepare_model

    source = run.model or demo_model_dir(qcfg.cache_dir)
    directory = checkpoint.resolve(source)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set, eval_set, fmt = build_dataset(dcfg, tokenizer)  # bad data stops here, before the model loads
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if eval_set is None and args.eval_strategy != "no":
        raise QMiLoRAError("evaluation was requested (--eval_strategy) but there is no eval split: set --val_size")
    if eval_set is not None and args.eval_strategy == "no":
        args.eval_strategy = "steps"
        args.eval_steps = args.eval_steps or args.logging_steps

    model = prepare_model(directory, qcfg)
    os.makedirs(args.output_dir, exist_ok=True)
    initial = os.path.join(args.output_dir, "initial_adapter")
    if not os.path.isdir(initial):
        with checkpoint.atomic_dir(initial) as tmp:
            model.save_pretrained(tmp)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8),
                      processing_class=tokenizer, callbacks=[_Progress()])
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - t0

    summary = {"steps": trainer.state.global_step, "tokens": int(trainer.state.num_input_tokens_seen),
               "wall_seconds": round(wall, 2), "train_loss": result.training_loss,
               "tokens_per_second": round(trainer.state.num_input_tokens_seen / max(wall, 1e-9), 1),
               "peak_memory_gb": round(_peak_gb(args), 3), "data_format": fmt, "train_rows": len(train_set),
               "eval_rows": len(eval_set) if eval_set is not None else 0}
    if eval_set is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    _write_outputs(model, tokenizer, trainer, args.output_dir, directory, run, qcfg, dcfg, args, summary)
    return model, summary


def load_trained(output_dir: str, **overrides):
    """The trained model of a qmilora-train output dir: the prepared base (from the cache, or prepared again,
    deterministically) with the trained adapter weights loaded by PEFT."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .prepare import prepare_model

    path = os.path.join(output_dir, "qmilora.json")
    if not os.path.isfile(path):
        raise QMiLoRAError(f"{output_dir} has no qmilora.json: it is not a qmilora-train output directory")
    with open(path) as f:
        meta = json.load(f)
    model = prepare_model(meta["source"]["path"], QMiLoRAConfig(**{**meta["qmilora"], **overrides}))
    set_peft_model_state_dict(model, load_file(os.path.join(output_dir, "adapter_model.safetensors")))
    return model


def _write_outputs(model, tokenizer, trainer, out, directory, run, qcfg, dcfg, args, summary) -> None:
    """Each file lands under a temporary name first, then is renamed into place."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".final-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _plot_loss(trainer.state.log_history, os.path.join(tmp, "loss.png"))
        files = checkpoint.shard_files(directory)
        meta = {"source": {"model": run.model or "demo:SmolLM2-135M-Instruct", "path": os.path.abspath(directory),
                           "fingerprint": checkpoint.fingerprint(directory, files)},
                "qmilora": qcfg.to_dict(), "data": asdict(dcfg), "training": args.to_dict(), "summary": summary,
                "versions": _versions()}
        with open(os.path.join(tmp, "qmilora.json"), "w") as f:
            json.dump(meta, f, indent=2, default=str)
        # qmilora.json goes last: its presence (what export/eval check) implies the adapter beside it is final
        for name in sorted(os.listdir(tmp), key=lambda n: n == "qmilora.json"):
            dest = os.path.join(out, name)
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            os.replace(os.path.join(tmp, name), dest)


def _plot_loss(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), marker="o" if label == "eval" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _peak_gb(args: TrainingArguments) -> float:
    if torch.cuda.is_available() and not args.use_cpu:
        return torch.cuda.max_memory_allocated() / 2**30
    return checkpoint.peak_rss_gb()


def _versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    from . import __version__

    return {"qmilora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
