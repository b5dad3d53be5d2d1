r"""Activation-aware rounding of the frozen residual (optional): GPTQ's error feedback on bitsandbytes' NF4 grid.

Why. QMiLoRA's base NF4(W − s·B₀A₀) plus the exact minor adapter has the same NF4 error *norm* as QLoRA's NF4(W),
yet a higher initial perplexity (issue 9). Round-to-nearest makes each element's error as small as it can be,
but says nothing about what the error does to the layer's output on real inputs. With X the calibration inputs
(tokens × in) and H = XᵀX, the layer's output error is ‖(Q − W_res) Xᵀ‖²_F = tr(E H Eᵀ); GPTQ (Frantar et al.,
arXiv 2210.17323) rounds one input column at a time and spreads each column's rounding error over the columns not
yet rounded, in proportion to H⁻¹, which lowers tr(E H Eᵀ) far below round-to-nearest's.

What stays the same: the adapter is still exactly the minor part of the full-precision W (the rounding only
decides the base's 4-bit codes), the absmax of every block is bitsandbytes' own for W_res, and the packed codes
are a standard bitsandbytes `Params4bit`, so memory, speed and the saved format do not change.

Shapes: W (out, in), H (in, in), scale (out, in) = the absmax each element is dequantized with, levels (16,).
"""
from __future__ import annotations

import hashlib
import os

import torch

from .config import QMiLoRAConfig, QMiLoRAError

DAMP = 0.01  # H += DAMP · mean(diag H) · I: keeps the Cholesky factor well conditioned (GPTQ's default)


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, *,
               damp: float = DAMP, block: int = 128) -> torch.Tensor:
    """4-bit codes (out, in) (indices into `levels`) for `weight` (out, in), rounded column by column with error
    feedback under `hessian` (in, in); each element's value is levels[code] · scale. Float64 throughout."""
    w = weight.detach().to(torch.float64).clone()
    scale = scale.to(w)
    order = torch.argsort(levels.to(torch.float64))
    grid = levels.to(w)[order]
    mids = (grid[1:] + grid[:-1]) / 2
    n = w.shape[1]
    h = hessian.to(w).clone()
    dead = h.diagonal() <= 0  # inputs never active in calibration: any rounding is as good, keep it to-nearest
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    # Upper Cholesky factor of H⁻¹: row j holds how column j's rounding error is spread over the later columns.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(w.shape, dtype=torch.long, device=w.device)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            s = scale[:, i1 + j]
            # an all-zero block has absmax 0: its elements can only be 0, whatever the error feedback asks
            x = torch.where(s > 0, w1[:, j] / s.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
            k = torch.bucketize(x.clamp(grid[0], grid[-1]), mids)
            codes[:, i1 + j] = order[k]
            err = (w1[:, j] - grid[k] * s) / u1[j, j]
            w1[:, j:] -= err[:, None] * u1[j, j:][None, :]
            err1[:, j] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes


def output_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H Eᵀ): the squared output error summed over the calibration tokens, for a weight error E (out, in)."""
    e = error.to(torch.float64)
    return torch.einsum("oi,ij,oj->", e, hessian.to(e), e).item()


def windows(cfg: QMiLoRAConfig, tokenizer) -> list[list[int]]:
    """Up to `calibration_samples` windows of `calibration_length` tokens from `calibration_data`, read with the
    training data's own reader (so a file that trains also calibrates), examples concatenated."""
    from .data import BUNDLED, DataConfig, build_dataset

    source = BUNDLED if cfg.calibration_data == "bundled" else cfg.calibration_data
    rows, _, _ = build_dataset(DataConfig(data=source, max_seq_length=cfg.calibration_length, train_on_prompt=True),
                               tokenizer)
    ids = [t for row in rows for t in row["input_ids"]]
    n = cfg.calibration_length
    out = [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)][:cfg.calibration_samples]
    if not out:
        raise QMiLoRAError(f"calibration data {source} holds {len(ids)} tokens, fewer than one window of {n}")
    return out


def identity(cfg: QMiLoRAConfig) -> str | None:
    """What the cache key needs to know of the calibration text: a digest of the file, or the hub name."""
    if cfg.calibration_data is None:
        return None
    from .data import BUNDLED

    path = BUNDLED if cfg.calibration_data == "bundled" else cfg.calibration_data
    if not os.path.isfile(path):
        return path
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def hessians(model: torch.nn.Module, targets: set[str], batches: list[list[int]], *, batch_size: int = 8
             ) -> dict[str, torch.Tensor]:
    """H = Σ xᵀx (in, in), float64 on the host, of the inputs each target linear layer of the full-precision `model`
    sees on the calibration windows. Layers that read the same tensor (q/k/v, gate/up) share one H."""
    sums: dict[str, torch.Tensor] = {}
    last: list = [None, None]  # (input tensor, layer) of the previous call; holding it keeps its memory from reuse

    def hook(name):
        def fn(module, args, output):
            x = args[0]
            if x is last[0]:  # same tensor as the previous layer's input: same H
                sums.setdefault(name, sums[last[1]])
                return
            last[0], last[1] = x, name
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            sums[name].addmm_(x.T, x)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n in targets]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(0, len(batches), batch_size):
                model(input_ids=torch.tensor(batches[i:i + batch_size], device=device))
    finally:
        last[0] = None
        for h in handles:
            h.remove()
    moved: dict[int, torch.Tensor] = {}  # shared sums move to the host once and stay shared
    for h in sums.values():
        if id(h) not in moved:
            moved[id(h)] = h.cpu()
    return {name: moved[id(h)] for name, h in sums.items()}
