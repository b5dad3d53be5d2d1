r"""Deploy a trained QMiLoRA adapter where QMiLoRA is not installed.

Training updated (B, A) on top of the frozen residual W_res = W − s·B₀A₀, so the finetuned weight is

    W_res + s·B A  =  W + s·(B A − B₀ A₀)  =  W + s·[B, −B₀]·[A; A₀]

- `to_lora`: that difference as a standard rank-2r LoRA for the ORIGINAL base: A' = [A; A₀] (2r × in),
  B' = [B, −B₀] (out × 2r), r and lora_alpha doubled so s is unchanged (PEFT's PiSSA→LoRA conversion,
  `LoraModel.subtract_mutated_init`, done here on state dicts: it needs no model in memory).
- `to_merged`: W + s·(B A − B₀ A₀) for every target weight, from the original full-precision weights (never from
  dequantized NF4), streamed shard by shard and saved as a standard safetensors checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import checkpoint
from .config import QMiLoRAError
from .runfolder import ADAPTER_CONFIG, ADAPTER_FILE, INITIAL, RunFolder

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


def _source(adapter_dir: str, model: str | None) -> tuple[dict, str]:
    """A finished run's record and its original checkpoint, verified by content."""
    from .config import QMiLoRAConfig
    from .train import verified_source

    meta = RunFolder(adapter_dir).read_complete()
    directory = verified_source(meta, model, QMiLoRAConfig(**meta["qmilora"]).resolved_cache_dir)
    return meta, directory


def _check_output(output: str, overwrite: bool, adapter_dir: str, model: str | None) -> None:
    checkpoint.fresh_output(output, overwrite)
    target = os.path.realpath(output)
    for what, path in (("the run directory", adapter_dir), ("the original checkpoint", model)):
        if path and os.path.exists(path) and target == os.path.realpath(path):
            raise QMiLoRAError(f"--output {output} is {what}; write the export elsewhere")


def lora_delta(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank-2r state dict: lora_A → [A; A₀] (2r, in), lora_B → [B, −B₀] (out, 2r)."""
    if trained.keys() != initial.keys():
        raise QMiLoRAError("the trained and initial adapters hold different layers")
    out = {}
    for name, value in trained.items():
        if value.shape[1 - ("lora_A" in name)] != initial[name].shape[1 - ("lora_A" in name)]:
            raise QMiLoRAError(f"the trained and initial adapters differ in shape at {name}")
        if "lora_A" in name:
            out[name] = torch.cat([value, initial[name]], dim=0).contiguous()
        elif "lora_B" in name:
            out[name] = torch.cat([value, -initial[name]], dim=1).contiguous()
        else:
            raise QMiLoRAError(f"unexpected adapter tensor {name}")
    return out


def to_lora(adapter_dir: str, output: str, model: str | None = None, overwrite: bool = False) -> str:
    _check_output(output, overwrite, adapter_dir, model)
    meta, directory = _source(adapter_dir, model)
    _check_output(output, overwrite, adapter_dir, directory)
    state = lora_delta(load_file(os.path.join(adapter_dir, ADAPTER_FILE)),
                       load_file(os.path.join(adapter_dir, INITIAL, ADAPTER_FILE)))
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    config.update(r=2 * config["r"], lora_alpha=2 * config["lora_alpha"], init_lora_weights=True,
                  base_model_name_or_path=meta["source"]["model"] if not meta["source"]["model"].startswith("demo:")
                  else os.path.abspath(directory))
    with _output(output, overwrite) as tmp:
        save_file(state, os.path.join(tmp, ADAPTER_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        _copy_tokenizer(adapter_dir, tmp)
    return output


def to_merged(adapter_dir: str, output: str, model: str | None = None, overwrite: bool = False) -> str:
    _check_output(output, overwrite, adapter_dir, model)
    meta, directory = _source(adapter_dir, model)
    _check_output(output, overwrite, adapter_dir, directory)
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        scaling = (cfg := json.load(f))["lora_alpha"] / cfg["r"]
    delta = _factors(load_file(os.path.join(adapter_dir, ADAPTER_FILE)),
                     load_file(os.path.join(adapter_dir, INITIAL, ADAPTER_FILE)))
    files = checkpoint.shard_files(directory)
    checkpoint.check_free_space(os.path.dirname(os.path.abspath(output)), sum(map(os.path.getsize, files)),
                                "the merged model")
    stored_transposed, prefix = _layout(directory)
    with _output(output, overwrite) as tmp:
        for path in files:  # one shard in memory at a time
            tensors = {}
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                for name in f.keys():
                    w = f.get_tensor(name)
                    stem = name.removesuffix(".weight")
                    # a checkpoint may store names without the base model's prefix (transformers adds it on load)
                    layer = stem if stem in delta else f"{prefix}.{stem}"
                    if name.endswith(".weight") and layer in delta:
                        (B, A), (B0, A0) = delta.pop(layer)
                        update = B.double() @ A.double() - B0.double() @ A0.double()  # (out, in)
                        if layer in stored_transposed:
                            update = update.T  # Conv1D stores (in, out)
                        w = (w.double() + scaling * update).to(w.dtype)
                    tensors[name] = w.contiguous()
            save_file(tensors, os.path.join(tmp, os.path.basename(path)), metadata={"format": "pt", **metadata})
            del tensors
        if delta:
            raise QMiLoRAError(f"the checkpoint lacks weights for adapter layers, e.g. {next(iter(delta))}")
        for name in os.listdir(directory):
            if name.endswith(".json") and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy2(os.path.join(directory, name), tmp)
        _copy_tokenizer(adapter_dir, tmp)
    return output


def _layout(directory: str) -> tuple[set[str], str]:
    """(names of layers whose checkpoint weight is stored (in, out), the base model prefix), from the model that
    config.json describes, built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .interop import is_conv1d

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return {n for n, m in model.named_modules() if is_conv1d(m)}, model.base_model_prefix


def _factors(trained: dict, initial: dict) -> dict[str, tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """{layer name in the checkpoint: ((B, A), (B₀, A₀))} from PEFT adapter state dicts."""
    out = {}
    for name in trained:
        if ".lora_A." not in name:
            continue
        layer = name.removeprefix("base_model.model.").split(".lora_A.")[0]
        b_name = name.replace(".lora_A.", ".lora_B.")
        out[layer] = ((trained[b_name], trained[name]), (initial[b_name], initial[name]))
    return out


def _output(output: str, overwrite: bool):
    return checkpoint.atomic_dir(output, overwrite=True)  # fresh_output checked first that replacing is allowed


def _copy_tokenizer(src: str, dst: str) -> None:
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)) and not os.path.exists(os.path.join(dst, name)):
            shutil.copy2(os.path.join(src, name), dst)
