"""`QMiLoRAConfig`: the one source of truth for how a model is decomposed and quantized.

Every field carries its help text; the CLI builds its flags from these fields (with
transformers' HfArgumentParser), so the Python API and the command line cannot drift apart.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bitsandbytes' 4-bit kernels support these block sizes on every backend.
_SCALING_RANGE = (1e-4, 1e4)
_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


class QMiLoRAError(Exception):
    """A user-facing problem (bad input, refused checkpoint): the CLI prints it as one line."""


def default_cache_dir() -> str:
    return os.environ.get("QMILORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "qmilora"))


def _cuda() -> bool:
    return torch.cuda.is_available()


@dataclass
class QMiLoRAConfig:
    _argument_group_name = "QMiLoRA decomposition and quantization"
    rank: int = field(default=64, metadata={"help": "LoRA rank r: the number of smallest singular triplets that become the adapter.", "aliases": ["--lora_r"]})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; the scaling is s = lora_alpha / rank. Default: rank (s = 1), as in the MiLoRA code."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input (MiLoRA's scripts use 0.05)."})
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "\"all-linear\" (every linear layer but the output head) or a list of module names, e.g. q_proj v_proj."})
    svd_solver: str = field(default="auto", metadata={"help": "How the r smallest singular triplets are found: auto (float64 Gram eigendecomposition, SVD fallback when ill-conditioned), gram, or svd (full torch.linalg.svd, the reference).", "choices": ("auto", "gram", "svd")})
    quantize: bool = field(default=True, metadata={"help": "Quantize the frozen residual to 4 bits. False keeps it in compute_dtype: full-precision MiLoRA, the reference."})
    quant_type: str = field(default="nf4", metadata={"help": "bitsandbytes 4-bit data type of the frozen residual: nf4 or fp4."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the per-block absmax constants too (QLoRA's double quantization)."})
    quant_storage: str = field(default="uint8", metadata={"help": "The dtype the packed 4-bit codes are stored as (bitsandbytes' quant_storage): uint8, or the compute dtype so that FSDP shards them with the other weights (qmilora-train sets it under --fsdp). Same bytes, same results.", "choices": ("uint8", "bfloat16", "float16", "float32"), "aliases": ["--bnb_4bit_quant_storage"]})
    blocksize: int = field(default=64, metadata={"help": "Quantization block size (weights per absmax constant)."})
    calibration_data: str | None = field(default=None, metadata={"help": "Round the 4-bit residual to suit real inputs (GPTQ error feedback on the NF4 grid; same format, memory and speed) using this text: a data file in any format qmilora-train reads, a datasets hub name, or 'bundled'. Default: round-to-nearest, as QLoRA."})
    calibration_samples: int = field(default=64, metadata={"help": "Calibration windows (of calibration_length tokens) run through the full-precision model."})
    calibration_length: int = field(default=256, metadata={"help": "Tokens per calibration window."})
    compute_dtype: str | None = field(default=None, metadata={"help": "Dtype of the 4-bit matmuls and of the unquantized weights: float32, bfloat16 or float16. Default: bfloat16 on a GPU that supports it, else float32."})
    device: str = field(default="auto", metadata={"help": "Where the prepared model lives: auto (cuda:0 when there is a GPU, else cpu), cpu, cuda, cuda:1, ..."})
    svd_device: str = field(default="auto", metadata={"help": "Where each weight's SVD runs: auto (the model's device; on a GPU, the CPU instead where a timed probe finds the host's cores faster at the float64 solver, as on consumer GPUs with slow float64), cpu, cuda, ..."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for preparation and training (also $QMILORA_THREADS). Default: the cores not kept busy by other processes at start (their runnable threads in /proc/loadavg; under torchrun the cores divided among its processes); the choice and its reason are logged and recorded in the run summary. The solver uses 1 thread for weights under 2048 wide."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where prepared models are cached. Default: $QMILORA_CACHE or ~/.cache/qmilora."})
    prepared_cache: bool = field(default=True, metadata={"help": "Reuse (and write) a cached prepared model keyed by the source checkpoint and every field that changes it."})

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        # None stays None (= rank): a copy with another rank then still means "alpha = rank"
        if self.lora_alpha is not None:
            if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not (
                    0 < self.lora_alpha < math.inf):
                raise ValueError(f"lora_alpha must be a positive finite number, got {self.lora_alpha!r}")
            self.lora_alpha = float(self.lora_alpha)
            # the factors are sqrt(sigma / s) in float32: outside this range they under- or overflow
            if not _SCALING_RANGE[0] <= self.lora_alpha / self.rank <= _SCALING_RANGE[1]:
                raise ValueError(f"lora_alpha / rank must be in [{_SCALING_RANGE[0]:g}, {_SCALING_RANGE[1]:g}] so the "
                                 f"adapter factors stay representable, got {self.lora_alpha:g} / {self.rank}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets) or ("all-linear" in targets and len(targets) > 1):
            raise ValueError(f"target_modules must be 'all-linear' or a non-empty list of names, got {self.target_modules!r}")
        self.target_modules = targets
        if self.svd_solver not in ("auto", "gram", "svd"):
            raise ValueError(f"svd_solver must be auto, gram or svd, got {self.svd_solver!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.quant_storage not in ("uint8", *_DTYPES):
            raise ValueError(f"quant_storage must be uint8 or one of {sorted(_DTYPES)}, got {self.quant_storage!r}")
        if self.blocksize not in _BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {_BLOCKSIZES}, got {self.blocksize!r}")
        if self.calibration_samples < 1 or self.calibration_length < 2:
            raise ValueError(f"calibration needs >= 1 sample of >= 2 tokens, got {self.calibration_samples} x {self.calibration_length}")
        if self.calibration_data is not None and not self.quantize:
            raise ValueError("calibration_data shapes the 4-bit rounding: it needs quantize=True")
        if self.compute_dtype is None:
            self.compute_dtype = "bfloat16" if _cuda() and torch.cuda.is_bf16_supported() else "float32"
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {self.compute_dtype!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        for name in ("device", "svd_device"):
            value = getattr(self, name)
            if value != "auto":
                try:
                    torch.device(value)
                except (RuntimeError, TypeError):
                    raise ValueError(f"{name} must be 'auto' or a torch device such as cpu or cuda:0, got {value!r}") from None
                if torch.device(value).type == "cuda" and not _cuda():
                    raise ValueError(f"{name} {value!r} asks for CUDA, but torch sees no CUDA device here")

    @property
    def peft_target_modules(self) -> str | list[str]:
        """What PEFT's LoraConfig takes: the string "all-linear" or a list of names."""
        return "all-linear" if self.target_modules == ["all-linear"] else self.target_modules

    @property
    def alpha(self) -> float:
        """lora_alpha, or rank when it is unset."""
        return float(self.rank) if self.lora_alpha is None else self.lora_alpha

    @property
    def scaling(self) -> float:
        """s = lora_alpha / rank, the factor PEFT applies to B @ A."""
        return self.alpha / self.rank

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    @property
    def torch_quant_storage(self) -> torch.dtype:
        return torch.uint8 if self.quant_storage == "uint8" else _DTYPES[self.quant_storage]

    @property
    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            # under `accelerate launch` / torchrun each process owns the GPU of its LOCAL_RANK
            rank = int(os.environ.get("LOCAL_RANK", -1))
            return torch.device("cuda", rank if rank >= 0 else torch.cuda.current_device()) if _cuda() else torch.device("cpu")
        return torch.device(self.device)

    @property
    def resolved_svd_device(self) -> torch.device:
        return self.resolved_device if self.svd_device == "auto" else torch.device(self.svd_device)

    @property
    def resolved_cache_dir(self) -> str:
        return os.path.expanduser(self.cache_dir) if self.cache_dir else default_cache_dir()

    def result_fields(self) -> dict:
        """The fields that change the prepared model's tensors (the cache key); dropout and placement do not."""
        skip = {"lora_dropout", "device", "svd_device", "cache_dir", "prepared_cache", "threads"}
        if self.calibration_data is None:
            skip |= {"calibration_samples", "calibration_length"}
        return {**{k: v for k, v in asdict(self).items() if k not in skip}, "lora_alpha": self.alpha}

    def to_dict(self) -> dict:
        return asdict(self)


__all__ = ["QMiLoRAConfig", "QMiLoRAError", "default_cache_dir"]
