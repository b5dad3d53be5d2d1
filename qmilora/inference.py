"""A trained run, loaded to answer prompts or score text (qmilora-generate, qmilora-eval), in the fastest form that is
still the trained model.

On a CPU, bitsandbytes has no fused 4-bit kernel here: every `Linear4bit` dequantizes its whole weight on every
forward, so decoding one token rebuilds all of a model's weights (profiled on the 135M demo: 85% of a decoding step in
`Linear4bit.forward`). The trained model is NF4(W_res) + s·B·A, and
the 4-bit layer computes exactly dequantize(NF4(W_res)) · x + s·B·(A·x) in float32. So on a CPU the run is merged
once at load, `export.as_trained`: each weight becomes dequantize(NF4(W_res)) + s·B·A in float64, cast to float32,
and the model a plain transformers model. Same function to float32 rounding (tested), and one matmul per layer.
It needs the full-precision weights in memory (4 bytes per parameter): when they do not fit in half the memory
available, or for MoE expert stacks (`as_trained` does not merge them yet), the 4-bit model runs as trained.
"""
from __future__ import annotations

import logging
import os
import time

import torch
from transformers import TextStreamer

log = logging.getLogger("qmilora")


class StreamTo(TextStreamer):
    """transformers' TextStreamer writing to `stream` (a terminal: the answer appears as it is generated)."""

    def __init__(self, stream, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def read_run(path: str) -> dict:
    """The record of the finished run in the folder `path` (`RunFolder.read_complete`); a file is named as one."""
    from .config import QMiLoRAError
    from .runfolder import RunFolder

    if os.path.isfile(path):
        raise QMiLoRAError(f"--adapter {path} is a file, not a run folder: pass the folder qmilora-train wrote (the "
                           "one holding qmilora.json)")
    return RunFolder(path).read_complete()


def load(run_dir: str, merge_on_cpu: bool = True, cache_dir: str | None = None, source: str | None = None):
    """(model in eval mode, how it runs: a phrase for the log) for the run in `run_dir`, its prepared base from
    `cache_dir` (default: the current default cache), the original checkpoint from `source` where it moved since
    training; applies the CPU thread policy (`cpu.choose`) for the inference that follows. A model whose outputs
    are not finite (a diverged run) is refused."""
    from .fidelity import require_finite

    model, how = _load(run_dir, merge_on_cpu, cache_dir, source)
    require_finite(model)
    return model, how


def _load(run_dir: str, merge_on_cpu: bool, cache_dir: str | None, source: str | None):
    from . import cpu, quantize
    from .config import QMiLoRAError
    from .export import as_trained
    from .train import load_trained

    t0 = time.perf_counter()
    model = load_trained(run_dir, source, lora_dropout=0.0, cache_dir=cache_dir).eval()
    if model.device.type != "cpu":
        return model, f"4-bit layers on {model.device}"
    threads, why = cpu.choose(None)
    cpu.apply(threads)
    log.info("qmilora: %d CPU thread%s: %s", threads, "" if threads == 1 else "s", why)
    if not merge_on_cpu:
        return model, "4-bit layers (--merge_on_cpu false)"
    # float32 weights: a 4-bit parameter's true shape, whatever dtype its packed codes are stored as
    need = 4 * sum(p.quant_state.shape.numel() if quantize.is_4bit_param(p) else p.numel() for p in model.parameters())
    free = available_memory()
    if free is not None and need > free / 2:
        return model, (f"4-bit layers: merged float32 weights would take {need / 2**30:.1f} GB of the "
                       f"{free / 2**30:.1f} GB available")
    try:
        plain = as_trained(model, torch.float32)
    except QMiLoRAError as err:  # MoE expert stacks
        return model, f"4-bit layers ({err})"
    del model
    return plain, (f"merged float32 weights, the trained model to float32 rounding ({need / 2**30:.2f} GB, loaded "
                   f"and merged in {time.perf_counter() - t0:.1f} s)")


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
