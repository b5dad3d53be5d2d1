"""QMiLoRA: MiLoRA's minor-component adapters on an NF4-quantized principal residual."""
from .config import QMiLoRAConfig, QMiLoRAError
from .decompose import MinorSplit, minor_split
from .prepare import prepare_model

__version__ = "0.1.0"
__all__ = ["QMiLoRAConfig", "QMiLoRAError", "MinorSplit", "minor_split", "prepare_model"]
