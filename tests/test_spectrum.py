import json

import pytest
import torch

from qmilora.cli.inspect import main as inspect_main
from qmilora.spectrum import inspect_weight


def test_inspect_weight_properties():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 192, generator=g) * 0.02
    spikes = torch.randn(256, 4, generator=g) @ torch.randn(4, 192, generator=g)  # a dominant principal part
    W = noise + spikes
    r = 8
    row = inspect_weight(W, r)
    S = torch.linalg.svdvals(W.double())
    assert row["minor_energy"] == pytest.approx((S[-r:] ** 2).sum().item() / (S**2).sum().item(), rel=1e-9)
    assert row["sigma_max"] == pytest.approx(S[0].item(), rel=1e-9) and row["sigma_min"] == pytest.approx(S[-1].item(), rel=1e-9)
    # removing the minor band leaves the 4-bit error as it was; removing the principal part shrinks it
    assert row["nf4_error_qmilora"] == pytest.approx(row["nf4_error_qlora"], rel=0.05)
    assert row["nf4_error_qpissa"] < 0.5 * row["nf4_error_qlora"]
    # an isotropic-looking error puts about r/in of its energy in the minor input subspace
    assert 0.3 * row["isotropic_share"] < row["minor_error_share"] < 3 * row["isotropic_share"]


def test_inspect_cli(tiny_ckpt, tmp_path, capsys):
    d, _ = tiny_ckpt
    out = tmp_path / "report"
    assert inspect_main(["--model", d, "--rank", "4", "--output", str(out)]) == 0
    report = json.load(open(out / "report.json"))
    assert report["summary"]["weights"] == 14 and (out / "spectra.png").stat().st_size > 1000
    assert "QMiLoRA/QLoRA" in capsys.readouterr().out
