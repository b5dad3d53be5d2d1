"""QMiLoRA: MiLoRA's minor-component adapters on an NF4-quantized principal residual."""
import importlib
import logging

__version__ = "0.1.0"
__all__ = ["QMiLoRAConfig", "QMiLoRAError", "MinorSplit", "minor_split", "prepare_model", "use_fused_lora"]

# Imported on first use, not here: `qmilora <verb> --help` imports this package and must not wait for torch.
_HOME = {"QMiLoRAConfig": "config", "QMiLoRAError": "config", "MinorSplit": "decompose", "minor_split": "decompose",
         "prepare_model": "prepare", "use_fused_lora": "interop"}

# bitsandbytes 0.50 on AVX512-BF16 CPUs tries an optional inference kernel from the Hub when it is first imported
# (by PEFT, before any module of ours) and logs its absence on every command; QMiLoRA never uses that path (see
# quantize.keep_training_layout). Set here, before anything can import it. Other warnings stay.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in str(record.msg))


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'qmilora' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
