r"""Per-weight evidence: where the spectrum's minor band lies and what 4-bit quantization does to each recipe.

For W with SVD U S Vᵀ and rank r, three frozen bases are compared, each stored as NF4 with its adapter exact:
    QLoRA    NF4(W)                         error E = NF4(W) − W
    QMiLoRA  NF4(W − U_m S_m V_mᵀ) + minor   error E = NF4(W_res) − W_res    (r smallest triplets removed)
    QPiSSA   NF4(W − U_p S_p V_pᵀ) + principal                                (r largest triplets removed)
Errors are ‖E‖_F / ‖W‖_F. Removing the r minor triplets barely changes W (their energy Σ S_m² / Σ S² is tiny), so
QMiLoRA's error is expected to equal QLoRA's; QPiSSA's drops because the principal part sets the absmax scales.
`minor_error_share` = ‖E V_m‖²_F / ‖E‖²_F for QMiLoRA's error, beside r/in (what an isotropic error would give).
"""
from __future__ import annotations

import torch

from . import quantize


def inspect_weight(weight: torch.Tensor, rank: int, *, quant_type: str = "nf4", blocksize: int = 64,
                   double_quant: bool = True) -> dict:
    """Spectrum summary and NF4 errors of one weight (out, in); SVD in float64 on the weight's device."""
    w = weight.to(torch.float64)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    minor = (U[:, -rank:] * S[-rank:]) @ Vh[-rank:]
    principal = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    norm = torch.linalg.matrix_norm(w).item()
    w32 = w.float()

    def nf4_error(x: torch.Tensor) -> torch.Tensor:  # E = NF4(x) − x, in float64
        q = quantize.round_trip(x.float(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        return q.double() - x.float().double()

    err_qlora = nf4_error(w32)
    err_qmilora = nf4_error(w - minor)
    err_qpissa = nf4_error(w - principal)
    share = (torch.linalg.matrix_norm(err_qmilora @ Vh[-rank:].T) ** 2 / torch.linalg.matrix_norm(err_qmilora) ** 2).item()
    energy = S.square()
    return {
        "shape": list(weight.shape), "sigma_max": S[0].item(), "sigma_min": S[-1].item(),
        "sigma_r_smallest": S[-rank].item(), "minor_energy": (energy[-rank:].sum() / energy.sum()).item(),
        "nf4_error_qlora": torch.linalg.matrix_norm(err_qlora).item() / norm,
        "nf4_error_qmilora": torch.linalg.matrix_norm(err_qmilora).item() / norm,
        "nf4_error_qpissa": torch.linalg.matrix_norm(err_qpissa).item() / norm,
        "minor_error_share": share, "isotropic_share": rank / weight.shape[1],
        "spectrum": S[torch.linspace(0, len(S) - 1, min(64, len(S))).round().long()].tolist(),
    }
