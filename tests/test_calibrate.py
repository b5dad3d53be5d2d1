"""Activation-aware rounding of the residual: same format and adapter, lower output error than round-to-nearest."""
import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit

import qmilora
from qmilora import QMiLoRAConfig, calibrate, prepare_model, quantize

KW = dict(blocksize=64, out_dtype=torch.float32)


def correlated(n_in=192, tokens=2000, seed=0):
    """A weight and the Hessian of strongly correlated inputs with a few outlier channels, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, n_in, generator=g)
    x = torch.randn(tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g) * 0.3
    x[:, :3] *= 20
    return w, (x.double().T @ x.double())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_identity_hessian_gives_bitsandbytes_own_codes(quant_type):
    # with uncorrelated, equally weighted inputs the best rounding is to nearest: exactly what bitsandbytes does
    w, _ = correlated()
    ours = quantize.quantize_calibrated(w, torch.eye(w.shape[1], dtype=torch.float64), quant_type=quant_type,
                                        double_quant=False, **KW)
    data, state = quantize_4bit(w, blocksize=64, quant_type=quant_type)
    assert torch.equal(ours.data, data)
    assert torch.equal(ours.quant_state.absmax, state.absmax)


@pytest.mark.parametrize("double_quant", [False, True])
def test_lower_output_error_same_absmax_standard_layer(double_quant):
    w, h = correlated()
    rtn = quantize.quantize(w, quant_type="nf4", double_quant=double_quant, **KW)
    cal = quantize.quantize_calibrated(w, h, quant_type="nf4", double_quant=double_quant, **KW)
    assert isinstance(cal, bnb.nn.Params4bit) and cal.dtype == torch.uint8 and cal.shape == rtn.shape
    assert torch.equal(cal.quant_state.absmax, rtn.quant_state.absmax)  # only the codes differ
    e_rtn = calibrate.output_error(quantize.dequantize(rtn) - w, h)
    e_cal = calibrate.output_error(quantize.dequantize(cal) - w, h)
    assert e_cal < 0.8 * e_rtn
    # every dequantized value is a grid level times its block's absmax: a valid NF4 tensor, nothing else
    codes = quantize.unpack(cal.data, w.numel())
    top = torch.full_like(cal.data, 0xFF)
    scale = dequantize_4bit(top, cal.quant_state).flatten()
    assert torch.equal(quantize.dequantize(cal).flatten(), cal.quant_state.code[codes] * scale)


def test_pack_unpack_match_bitsandbytes():
    w, _ = correlated()
    data, _ = quantize_4bit(w[:, :-1].contiguous(), blocksize=64, quant_type="nf4")  # odd element count
    codes = quantize.unpack(data, w[:, :-1].numel())
    assert codes.max() <= 15 and torch.equal(quantize.pack(codes, data.shape), data)


def test_hessians_are_the_layer_inputs_gram_and_shared(tiny_ckpt):
    _, model = tiny_ckpt
    seen = {}
    name = "model.layers.1.mlp.down_proj"
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.setdefault("x", []).append(a[0]))
    batches = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1)).tolist()
    targets = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    h = calibrate.hessians(model, targets, batches, batch_size=2)
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["x"]]).double()
    torch.testing.assert_close(h[name], x.T @ x)
    assert set(h) == targets
    p = "model.layers.0.self_attn."
    assert h[p + "q_proj"] is h[p + "k_proj"] is h[p + "v_proj"]  # one input, one Hessian
    assert h[p + "o_proj"] is not h[p + "q_proj"]


def test_prepare_with_calibration(tiny_llm, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32)
    cfg = QMiLoRAConfig(rank=4, cache_dir=str(tmp_path), calibration_data="bundled", calibration_samples=8,
                        calibration_length=32)
    plain = prepare_model(tiny_llm, cfg, calibration_data=None)
    model = prepare_model(tiny_llm, cfg)
    assert model.qmilora_stats.calibrated == 14
    batches = calibrate.windows(cfg, __import__("transformers").AutoTokenizer.from_pretrained(tiny_llm))
    targets = {n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    h = calibrate.hessians(ref, targets, batches)
    better = 0
    for name in targets:
        layer, layer0 = (m.base_model.model.get_submodule(name) for m in (model, plain))
        # the adapter is still exactly the minor part of the full-precision weight
        torch.testing.assert_close(layer.lora_A["default"].weight, layer0.lora_A["default"].weight, atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_B["default"].weight, layer0.lora_B["default"].weight, atol=0, rtol=0)
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
        residual = qmilora.minor_split(ref.get_submodule(name).weight.detach(), 4).residual
        err = lambda m: calibrate.output_error(quantize.dequantize(m.get_base_layer().weight).float() - residual, h[name])  # noqa: E731
        better += err(layer) < err(layer0)
    assert better == len(targets)
    # a calibrated model is cached apart from the plain one, and reloads to the same weights
    again = prepare_model(tiny_llm, cfg)
    assert again.qmilora_stats.from_cache
    name = sorted(targets)[0]
    assert torch.equal(again.base_model.model.get_submodule(name).get_base_layer().weight.data,
                       model.base_model.model.get_submodule(name).get_base_layer().weight.data)


def test_calibration_config_errors(tmp_path, tiny_llm):
    with pytest.raises(ValueError, match="quantize=True"):
        QMiLoRAConfig(calibration_data="bundled", quantize=False)
    with pytest.raises(ValueError, match="calibration"):
        QMiLoRAConfig(calibration_samples=0)
    with pytest.raises(qmilora.QMiLoRAError, match="does not exist"):
        prepare_model(tiny_llm, QMiLoRAConfig(rank=4, calibration_data=str(tmp_path / "none.jsonl"), cache_dir=str(tmp_path)))


def test_all_zero_block_stays_zero():
    w, h = correlated()
    w[:, :64] = 0  # one all-zero block per row: absmax 0
    cal = quantize.quantize_calibrated(w, h, quant_type="nf4", double_quant=False, **KW)
    deq = quantize.dequantize(cal)
    assert torch.isfinite(deq).all() and torch.equal(deq[:, :64], torch.zeros_like(deq[:, :64]))
    assert calibrate.output_error(deq - w, h) < calibrate.output_error(quantize.dequantize(
        quantize.quantize(w, quant_type="nf4", double_quant=False, **KW)) - w, h)
