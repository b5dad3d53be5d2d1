r"""The minor decomposition of MiLoRA (Wang et al., arXiv 2406.09044, eq. 3-5).

For a weight W ∈ R^{m×n} (out × in) with SVD W = U S Vᵀ, singular values sorted
descending, split the spectrum at rank r:

    W = U_p S_p V_pᵀ  +  U_m S_m V_mᵀ            (p: the first min(m,n)-r triplets, m: the last r)

MiLoRA trains only the minor part. With PEFT's forward  y = W_res x + s·B A x  and s = lora_alpha / r:

    B = U_m · diag(√(S_m / s))        (m × r)
    A = diag(√(S_m / s)) · V_mᵀ       (r × n)
    W_res = W − s·B A  = U_p S_p V_pᵀ  (m × n)

so the model is unchanged at initialization (before quantization), and the adapter starts
orthogonal to the principal subspace: U_pᵀ B = 0 and A V_p = 0.

W_res is computed as W − s·B A, not rebuilt from U_p S_p V_pᵀ: that keeps W_res + s·B A = W to
rounding of the subtraction, whatever the SVD's own error.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class MinorSplit(NamedTuple):
    residual: torch.Tensor  # (out, in): W − s·B A, the principal rest
    lora_A: torch.Tensor  # (rank, in)
    lora_B: torch.Tensor  # (out, rank)


def check_rank(rank, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless 1 <= rank < min(shape) (rank = min(shape) would leave no principal part)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int, got {type(rank).__name__} {rank!r}")
    limit = min(shape)
    if not 1 <= rank < limit:
        raise ValueError(f"rank must be in [1, {limit - 1}] for a weight of shape {tuple(shape)}, got {rank}")


def minor_split(weight: torch.Tensor, rank: int, scaling: float = 1.0, *, svd_dtype: torch.dtype | None = None) -> MinorSplit:
    """Split `weight` (out, in) into its principal residual and a rank-`rank` LoRA pair on the minor subspace.

    The SVD runs in `svd_dtype` (default: float32, or float64 when the input is float64); the
    results come back in the input's dtype when it is float32/float64, else in float32 (a bf16
    residual would lose the identity W = W_res + s·B A). Cast at the caller's boundary.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}: a quantized weight has no meaningful minor components")
    check_rank(rank, tuple(weight.shape))
    if not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling}")
    out_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    svd_dtype = svd_dtype or (torch.float64 if weight.dtype == torch.float64 else torch.float32)

    w = weight.to(svd_dtype)
    # gesvd/gesvdj on CUDA and gesdd on CPU; full_matrices=False keeps U (out, k), Vh (k, in).
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = (S[-rank:] / scaling).sqrt()  # (rank,)
    lora_B = U[:, -rank:] * root  # (out, rank)
    lora_A = root[:, None] * Vh[-rank:]  # (rank, in)
    residual = w - scaling * (lora_B @ lora_A)  # (out, in)
    return MinorSplit(residual.to(out_dtype), lora_A.to(out_dtype), lora_B.to(out_dtype))


def minor_energy(split: MinorSplit, scaling: float, weight_sq_norm: float) -> float:
    """‖s·B A‖²_F / ‖W‖²_F, the share of the weight's energy in the adapter, via (r×r) products only."""
    A = split.lora_A.double()
    B = split.lora_B.double()
    sq = torch.trace((A @ A.T) @ (B.T @ B)).item() * scaling**2
    return sq / weight_sq_norm if weight_sq_norm > 0 else 0.0
