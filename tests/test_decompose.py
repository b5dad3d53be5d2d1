import pytest
import torch

from qmilora import minor_split
from qmilora.decompose import minor_energy

SHAPES = [(48, 32), (32, 48), (64, 64), (40, 17)]


def ill_conditioned(m, n, decades=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    S = torch.logspace(0, -decades, k, dtype=torch.float64)
    return ((U * S) @ V.T).to(dtype)


def check_split(W, rank, scaling, atol, solver="auto"):
    res, A, B = minor_split(W, rank, scaling, solver=solver)
    assert res.shape == W.shape and A.shape == (rank, W.shape[1]) and B.shape == (W.shape[0], rank)
    W64 = W.double()
    scale = torch.linalg.matrix_norm(W64, ord=2).item()
    # reconstruction: W = W_res + s·B A to rounding
    torch.testing.assert_close(res.double() + scaling * B.double() @ A.double(), W64, atol=atol * scale, rtol=0)
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    # s·B A carries exactly the `rank` smallest singular values of W
    sv = torch.linalg.svdvals(scaling * B.double() @ A.double())[:rank]
    torch.testing.assert_close(sv, S[-rank:], atol=atol * scale, rtol=0)
    # ... and lies in the minor subspace: orthogonal to the principal singular vectors
    k = min(W.shape) - rank
    assert (U[:, :k].T @ B.double()).abs().max() <= atol * scale
    assert (A.double() @ Vh[:k].T).abs().max() <= atol * scale
    # the residual has the principal rest: its singular values are S_p, and r (numerically) zeros
    sv_res = torch.linalg.svdvals(res.double())
    torch.testing.assert_close(sv_res[:k], S[:k], atol=atol * scale, rtol=0)
    assert sv_res[k:].max() <= atol * scale
    # B = U_m √(S_m/s), A = √(S_m/s) V_mᵀ: B's columns are orthogonal with squared norms S_m/s, like A's rows
    torch.testing.assert_close(torch.diag(B.double().T @ B.double()), torch.diag(A.double() @ A.double().T),
                               atol=atol * scale, rtol=0)
    return res, A, B


@pytest.mark.parametrize("solver", ["gram", "svd"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.25])
def test_random_float64_exact(shape, scaling, solver):
    W = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for rank in (1, 3, min(shape) - 1):
        check_split(W, rank, scaling, atol=1e-10, solver=solver)


@pytest.mark.parametrize("solver", ["gram", "svd"])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_float32_against_float64_reference(shape, solver):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    res, A, B = check_split(W, 4, 1.0, atol=2e-5, solver=solver)
    assert res.dtype == A.dtype == B.dtype == torch.float32


def sin_angle(X, Y):
    """Largest principal angle (its sine) between the column spaces of X and Y."""
    Qx, Qy = torch.linalg.qr(X.double())[0], torch.linalg.qr(Y.double())[0]
    return (1 - torch.linalg.svdvals(Qx.T @ Qy).min().clamp(max=1) ** 2).clamp(min=0).sqrt().item()


@pytest.mark.parametrize("shape", [(256, 128), (128, 256), (192, 192)])
def test_gram_solver_subspace_accuracy_on_float32_weights(shape):
    """Issue 5's bar: minor subspaces within 1e-6 (principal angle) of the float64 reference, for a spectrum
    with a clear gap at the split, from float32 input."""
    g = torch.Generator().manual_seed(5)
    k, r = min(shape), 8
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64))
    S = torch.cat([torch.linspace(30, 1.0, k - r), torch.linspace(0.5, 0.1, r)]).double()  # LLM-like range, gap at r
    W = ((U * S) @ V.T).float()
    _, Sref, Vhref = torch.linalg.svd(W.double(), full_matrices=False)
    Uref = torch.linalg.svd(W.double(), full_matrices=False)[0]
    res, A, B = minor_split(W, r, 1.0, solver="gram")
    assert sin_angle(A.T, Vhref[-r:].T) <= 1e-6 and sin_angle(B, Uref[:, -r:]) <= 1e-6
    err = (res.double() + B.double() @ A.double() - W.double()).abs().max()
    assert err <= 4 * torch.finfo(torch.float32).eps * W.abs().max()  # float32 rounding of the subtraction
    # the float32 SVD misses this bar on the same matrix: the reason "auto" uses the Gram route
    _, _, Vh32 = torch.linalg.svd(W, full_matrices=False)
    assert sin_angle(Vh32[-r:].T, Vhref[-r:].T) > sin_angle(A.T, Vhref[-r:].T)


def test_ill_conditioned_falls_back_to_svd():
    W = ill_conditioned(48, 32, decades=8).float()
    with pytest.raises(ValueError, match="ill-conditioned"):
        minor_split(W, 4, solver="gram")
    res, A, B = minor_split(W, 4, solver="auto")
    S = torch.linalg.svdvals(W.double())
    torch.testing.assert_close(torch.linalg.svdvals(B.double() @ A.double())[:4], S[-4:], atol=1e-7, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_ill_conditioned(shape):
    W = ill_conditioned(*shape)
    check_split(W, 5, 1.0, atol=1e-10)
    # float32 input: minor values sit near rounding level, yet reconstruction holds to float32 rounding
    W32 = W.float()
    res, A, B = minor_split(W32, 5)
    err = (res.double() + B.double() @ A.double() - W32.double()).abs().max()
    assert err <= 1e-6 * torch.linalg.matrix_norm(W, ord=2)


def test_low_precision_input_is_computed_in_float32():
    W = torch.randn(32, 24, generator=torch.Generator().manual_seed(3)).bfloat16()
    res, A, B = minor_split(W, 4, 1.0)
    assert res.dtype == torch.float32
    torch.testing.assert_close(res + B @ A, W.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [0, -1, 24, 30, 2.0, True, "4"])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        minor_split(torch.randn(32, 24), rank)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        minor_split(torch.randn(4, 4, 4), 1)
    with pytest.raises(ValueError, match="floating point"):
        minor_split(torch.ones(8, 8, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="scaling"):
        minor_split(torch.randn(8, 8), 1, 0.0)


def test_minor_energy_matches_singular_values():
    W = torch.randn(40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    S = torch.linalg.svdvals(W)
    split = minor_split(W, 6, 2.0)
    expected = (S[-6:] ** 2).sum() / (S**2).sum()
    assert minor_energy(split, 2.0, W.square().sum().item()) == pytest.approx(expected.item(), rel=1e-10)
