"""bitsandbytes' native CPU 4-bit dequantization is wrong on AVX-512 CPUs when a row's length is not a multiple of the
blocksize (0.50.2, measured here); qmilora replaces that kernel where a probe finds it wrong. These tests fail
without the replacement on such a CPU, and the repair itself is tested on any CPU with a kernel broken on purpose."""
import warnings

import pytest
import torch

from qmilora import quantize


def float_reference(weight, blocksize, quant_type):
    """Independent of bitsandbytes' dequantization: nearest code of each value / block absmax, times the absmax."""
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(quant_type, device="cpu").double()
    flat = weight.double().reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        absmax = block.abs().max()
        idx = (block / absmax).unsqueeze(-1).sub(code).abs().argmin(-1)
        out[start:start + blocksize] = code[idx] * absmax.float().double()
    return out.reshape(weight.shape)


@pytest.mark.parametrize("shape", [(8, 96), (5, 160), (3, 7, 64), (16, 256)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantization_equals_the_specified_arithmetic(shape, quant_type):
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    weight = torch.randn(*shape)
    data, state = quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type=quant_type)
    got = dequantize_4bit(data, state)
    assert torch.equal(got, quantize.reference_dequantize_4bit(data, state.absmax, 64, quant_type, shape,
                                                               torch.float32))
    want = float_reference(weight, 64, quant_type)
    differ = (got.double() - want).abs() > 1e-6
    assert differ.float().mean() < 0.01  # ties between two codes only
    assert (got.double() - weight.double()).abs().max() <= 0.25 * weight.abs().max()


def test_a_wrong_cpu_kernel_is_detected_and_replaced():
    def broken(A, absmax, blocksize, quant_type, shape, dtype):
        return torch.zeros(shape, dtype=dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", broken)
    try:
        assert not quantize.cpu_dequantize_is_exact()
    finally:
        assert quantize.repair_cpu_dequantize()
    assert quantize.cpu_dequantize_is_exact()


def test_a_4bit_layer_trains_on_the_weights_it_was_given():
    """Forward and input/weight gradients of a Linear4bit with rows not a multiple of the blocksize equal a float
    layer holding the reference-dequantized weight."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    weight = torch.randn(32, 96)
    param = quantize.quantize(weight, quant_type="nf4", blocksize=64, double_quant=False, out_dtype=torch.float32)
    layer = bnb.nn.Linear4bit(96, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = param
    state = param.quant_state
    dense = quantize.reference_dequantize_4bit(param.data, state.absmax, 64, "nf4", (32, 96), torch.float32)
    assert (dense - weight).abs().max() < 0.5
    x = torch.randn(4, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ref = x_ref @ dense.T
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
