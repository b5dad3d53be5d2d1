"""What a training run prints while it trains: one readable line per log instead of transformers' dict of quoted
numbers, the end-of-training dict left to qmilora-train's summary."""
from __future__ import annotations

from transformers import PrinterCallback, ProgressCallback

# keys a line leaves out: totals the summary reports, and bookkeeping
_SKIP = {"total_flos", "train_runtime", "num_input_tokens_seen", "train_samples_per_second", "train_steps_per_second"}
_LABELS = {"train_tokens_per_second": "input tokens/s", "learning_rate": "lr"}


def line(state, logs: dict) -> str | None:
    """`step 5/75  loss 2.31  grad_norm 0.42  lr 0.0002  epoch 0.07  input tokens/s 46.2`, or None for the final
    log (train_loss, runtimes: the summary that follows says it)."""
    if "train_loss" in logs:
        return None
    parts = [f"step {state.global_step}/{state.max_steps}"]
    for key, value in logs.items():
        if key not in _SKIP:
            parts.append(f"{_LABELS.get(key, key)} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


class ProgressLines(ProgressCallback):
    """transformers' progress bar, its log dicts written as lines."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            text = line(state, logs)
            if text:
                self.training_bar.write(text)


class PrintedLines(PrinterCallback):
    """With --disable_tqdm: the same lines, printed."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            text = line(state, logs)
            if text:
                print(text, flush=True)


def use_lines(trainer) -> None:
    """Swap Trainer's log printers for ours (which of the two it uses follows --disable_tqdm)."""
    for theirs, ours in ((ProgressCallback, ProgressLines), (PrinterCallback, PrintedLines)):
        if trainer.pop_callback(theirs) is not None:
            trainer.add_callback(ours)
