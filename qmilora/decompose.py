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

Solvers. Only the r smallest triplets are needed, and randomized SVD finds only the largest, so:
- "gram": with k = min(m, n), eigendecompose the k×k Gram matrix G = WᵀW (or W Wᵀ) in float64; its r smallest
  eigenpairs give S_m = √λ and one singular factor, the other is W V_m / S_m. On CPU, LAPACK's MRRR driver
  (scipy `eigh(driver="evr", subset_by_index=...)`) computes only those r eigenvectors. Squaring the condition
  number is harmless in float64 while σ_min/σ_max ≳ 1e-6 (LLM weights: ~1e-1..1e-2); below that it falls back.
- "svd": `torch.linalg.svd` of the whole matrix (float32 for float32 input, float64 for float64), the reference.
- "auto": "gram", with a float64 SVD where the Gram matrix is too ill-conditioned.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from . import cpu


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


SOLVERS = ("auto", "gram", "svd")
# float64 Gram eigenvalues carry absolute error ~1e-16·‖G‖, so σ_min = √λ_min has relative error ~1e-16·κ²
# (κ = σ_max/σ_min), against ~6e-8·κ for a float32 SVD. Below λ_min/‖W‖²_F = 1e-12 (κ ≳ 1e6) use an SVD.
_GRAM_MIN_RATIO = 1e-12


def minor_split(weight: torch.Tensor, rank: int, scaling: float = 1.0, *, solver: str = "auto",
                threads: int | None = None) -> MinorSplit:
    """Split `weight` (out, in) into its principal residual and a rank-`rank` LoRA pair on the minor subspace.

    Results come back in the input's dtype when it is float32/float64, else in float32 (a bf16 residual would
    lose the identity W = W_res + s·B A). Cast at the caller's boundary.

    On the CPU the solver runs under QMiLoRA's thread policy (`qmilora.cpu.solver_limits`): one thread for weights
    under 2048 wide, else `threads` (default: the cores not busy right now). Two thread pools at full width on a
    loaded machine cost 10-20x on small weights.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}: a quantized weight has no meaningful minor components")
    check_rank(rank, tuple(weight.shape))
    if not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    out_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    limits = cpu.solver_limits(tuple(weight.shape), threads) if weight.device.type == "cpu" else contextlib.nullcontext()
    with limits:  # the residual's product too: at full width on a busy machine it costs as much as the solver
        minor = _minor_gram(weight, rank) if solver != "svd" else None
        if minor is None and solver == "gram":
            raise ValueError("the Gram matrix is too ill-conditioned for the gram solver; use solver='svd' or 'auto'")
        if minor is None:
            # ill-conditioned under "auto": an SVD in float64 keeps the smallest triplets accurate
            minor = _minor_svd(weight.to(torch.float64 if solver == "auto" else out_dtype), rank)
        U_m, S_m, V_m = minor  # (out, r), (r,), (in, r)
        root = (S_m / scaling).sqrt()  # (r,)
        lora_B = U_m * root  # (out, r)
        lora_A = root[:, None] * V_m.T  # (r, in)
        w = weight.to(lora_A.dtype)
        residual = w - scaling * (lora_B @ lora_A)  # (out, in)
        return MinorSplit(residual.to(out_dtype), lora_A.to(out_dtype), lora_B.to(out_dtype))


def _minor_svd(w: torch.Tensor, rank: int):
    # gesdd on CPU, gesvdj/gesvd on CUDA; full_matrices=False keeps U (out, k), Vh (k, in).
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return U[:, -rank:], S[-rank:], Vh[-rank:].T


def _minor_gram(weight: torch.Tensor, rank: int):
    """(U_m, S_m, V_m) in float64 from the smaller Gram matrix, or None when it is too ill-conditioned."""
    w = weight.to(torch.float64).contiguous()
    tall = w.shape[0] >= w.shape[1]
    if w.device.type == "cpu":
        import scipy.linalg
        from scipy.linalg.blas import dsyrk

        # dsyrk fills one triangle of the Gram matrix: half a GEMM's work. w (C order, out×in) is wᵀ in Fortran
        # order, so a = wᵀ gives a·aᵀ = wᵀw (trans=0) or aᵀ·a = w wᵀ (trans=1) without a copy.
        G = dsyrk(1.0, w.numpy().T, trans=0 if tall else 1)  # (k, k), upper triangle
        lam, vec = scipy.linalg.eigh(G, lower=False, subset_by_index=[0, rank - 1], driver="evr",
                                     check_finite=False, overwrite_a=True)
        lam, vec = torch.from_numpy(lam), torch.from_numpy(vec)
    else:
        G = w.T @ w if tall else w @ w.T  # (k, k)
        lam, vec = torch.linalg.eigh(G)
        lam, vec = lam[:rank], vec[:, :rank]
    if not lam[0] > _GRAM_MIN_RATIO * w.square().sum().item():  # ‖W‖²_F = trace(G) ≥ λ_max
        return None
    S = lam.sqrt()  # ascending: S[0] is the smallest
    other = (w @ vec if tall else w.T @ vec) / S  # the second singular factor, (out|in, r)
    U, V = (other, vec) if tall else (vec, other)
    order = torch.arange(rank - 1, -1, -1)  # descending, like torch.linalg.svd's last r triplets
    return U[:, order], S[order], V[:, order]


def minor_energy(split: MinorSplit, scaling: float, weight_sq_norm: float) -> float:
    """‖s·B A‖²_F / ‖W‖²_F, the share of the weight's energy in the adapter, via (r×r) products only."""
    A = split.lora_A.double()
    B = split.lora_B.double()
    sq = torch.trace((A @ A.T) @ (B.T @ B)).item() * scaling**2
    return sq / weight_sq_norm if weight_sq_norm > 0 else 0.0
