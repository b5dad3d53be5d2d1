"""The one place that relies on other libraries' internals rather than their documented API, so that an upgrade of
transformers or PEFT touches this file only. (bitsandbytes' own internals stay in `quantize`, the only module that
imports it.)

- transformers: its bitsandbytes quantizer's model surgery (`preprocess_model` swaps `nn.Linear` for
  `Linear4bit` exactly as `from_pretrained(quantization_config=...)` would; `postprocess_model` marks the model
  4-bit, which PEFT and Trainer read), driven here without loading any weights.
- PEFT: which LoRA layer class wraps which base layer (its bitsandbytes layer is chosen only for 4-bit-marked models).
"""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.quantizers import AutoHfQuantizer


def install_4bit_layers(model: PreTrainedModel, *, quant_type: str, double_quant: bool, dtype: torch.dtype,
                        device: torch.device):
    """Replace `model`'s linear layers (on meta) by empty `Linear4bit`s, as transformers' 4-bit load does;
    returns the quantizer, to be handed to `mark_4bit` once the weights are in."""
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=True)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": device})
    return quantizer


def mark_4bit(model: PreTrainedModel, quantizer) -> None:
    """What from_pretrained does after loading: config.quantization_config, is_loaded_in_4bit, hf_quantizer."""
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    """{base-model layer name: PEFT LoRA layer}."""
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def is_bnb_lora(layer: LoraLayer) -> bool:
    """PEFT's bitsandbytes LoRA layer (dequantizes for merges, knows the 4-bit base), not its plain one."""
    return type(layer).__module__ == "peft.tuners.lora.bnb"
