r"""A training-free correction for the original-base exports (`qmilora-export --to original-lora|original-merged
--correction_rank k`).

Per adapted layer the trained model multiplies with Q + s·B A, Q = NF4(W_res) dequantized; the original-base exports
give W + s·(B A − B₀ A₀) = W_res + s·B A. They differ by E = Q − W_res, the residual's 4-bit rounding error, which
the adapter was trained around. E is full rank, but what matters is what the layer's outputs see: over inputs X (the
run's training rows, as the trained model feeds them to the layer) the rank-k L minimizing ‖X (E − L)ᵀ‖_F, i.e.
‖(E − L)·H^½‖_F with H = XᵀX, is [E·H^½]_k·H^-½ (truncated SVD). Adding L to the update makes the LoRA rank 2r + k.
Measured on the demo (docs/export.md): at k = r it brings top-1 agreement with the trained model from 96% to 99%;
the plain (unweighted) truncation helps less. Costs: one forward pass of the trained model over the calibration
rows, and H (in × in, float64) of every adapted layer in host memory, as --calibration_data does.
"""
from __future__ import annotations

import os

import torch

from . import calibrate, fidelity, quantize
from .config import QMiLoRAError
from .runfolder import ADAPTER_FILE, INITIAL, RunFolder


def calibration(built: tuple | None, rows: int) -> fidelity.Rows:
    """The first `rows` training rows of `fidelity.run_data`'s result, refused in one line when it is None: checked
    before the trained model loads."""
    if built is None:
        raise QMiLoRAError("--correction_rank calibrates on the run's training rows, which could not be rebuilt (the "
                           "data file moved?); pass --correction_rank 0")
    return fidelity.take(built, rows, split="train")


def factors(run_dir: str, model: str | None, rank: int, data: fidelity.Rows, trained,
            cache_dir: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (left (out, k), right (k, in))}, float64 on the host, left @ right = L_k for every adapted layer of
    `trained` (the run's `load_trained` model, which the caller loaded once for all it needs of it), calibrated on
    `data` (`calibration`); `cache_dir` as the caller's (default: the current default cache)."""
    from safetensors.torch import load_file

    from . import experts, interop
    from .prepare import visit_target_weights
    from .train import config_of_run, verified_source

    meta = RunFolder(run_dir).read_complete()
    if experts.lora_layers(trained):
        raise QMiLoRAError("--correction_rank does not handle MoE expert stacks yet; pass --correction_rank 0")
    loras = interop.lora_layers(trained)
    grams = calibrate.hessians(trained.get_base_model(), set(loras), [r["input_ids"] for r in data.rows],
                               batch_size=1)  # rows differ in length: one at a time
    initial = load_file(os.path.join(run_dir, INITIAL, ADAPTER_FILE))
    key = lambda layer, part: f"base_model.model.{layer}.{part}.weight"  # noqa: E731
    out = {}

    def visit(layer: str, weight: torch.Tensor) -> None:
        if layer not in loras:
            return
        lora = loras[layer]
        s = lora.scaling["default"]
        b0, a0 = initial[key(layer, "lora_B")].double(), initial[key(layer, "lora_A")].double()
        q = quantize.dequantize(lora.get_base_layer().weight, torch.float32).double().cpu()
        error = q - (weight.double().cpu() - s * (b0 @ a0))
        h = grams[layer]
        h = h + calibrate.DAMP * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
        lam, v = torch.linalg.eigh(h)
        u, sv, vh = torch.linalg.svd(error @ (v * lam.sqrt()) @ v.T, full_matrices=False)
        left, right = u[:, :rank] * sv[:rank], vh[:rank] @ (v * lam.rsqrt()) @ v.T
        pad = rank - left.shape[1]  # a layer narrower than k: all of E, padded so every layer has rank k (PEFT)
        out[layer] = (torch.nn.functional.pad(left, (0, pad)), torch.nn.functional.pad(right, (0, 0, 0, pad)))

    meta_cfg = config_of_run(meta, cache_dir=cache_dir)
    visit_target_weights(verified_source(meta, model, meta_cfg.resolved_cache_dir), meta_cfg, visit)
    if set(out) != set(loras):
        raise QMiLoRAError(f"the checkpoint did not deliver the weight of {sorted(set(loras) - set(out))[:1]}")
    return out


def add_to_lora(state: dict[str, torch.Tensor], config: dict, found: dict, scaling: float) -> None:
    """Append each layer's correction to a rank-2r original-base LoRA (in place): A'' = [A'; right],
    B'' = [B', left / s], r += k and lora_alpha = s·r, so that s·B''A'' = s·B'A' + L_k."""
    k = 0
    for layer, (left, right) in found.items():
        a, b = f"base_model.model.{layer}.lora_A.weight", f"base_model.model.{layer}.lora_B.weight"
        state[a] = torch.cat([state[a], right.to(state[a].dtype)]).contiguous()
        state[b] = torch.cat([state[b], (left / scaling).to(state[b].dtype)], dim=1).contiguous()
        k = right.shape[0]
    config.update(r=config["r"] + k, lora_alpha=scaling * (config["r"] + k))
