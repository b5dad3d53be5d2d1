"""4-bit quantization of the frozen residual: the only module that imports bitsandbytes.

Every quantization is an explicit call to `bitsandbytes.functional.quantize_4bit`; nothing here
relies on bitsandbytes' quantize-on-`.to()` side effect.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import bitsandbytes as bnb
from bitsandbytes.functional import QuantState, dequantize_4bit, get_4bit_type, quantize_4bit


def reference_dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                              shape, dtype: torch.dtype) -> torch.Tensor:
    """4-bit codes → weight, the arithmetic every bitsandbytes backend specifies: two codes per byte (high nibble
    first), each code's value × its block's absmax in float32, then one cast to `dtype`. One table lookup per byte
    (256 × 2 values), so it runs at a few times the native kernel's time, not tens."""
    code = get_4bit_type(quant_type, device=A.device)
    byte = torch.arange(256, device=A.device)
    table = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)  # (256, 2): both values of each byte
    n = 1
    for d in shape:
        n *= d
    values = torch.index_select(table, 0, A.reshape(-1).view(torch.uint8).int()).reshape(-1)[:n]
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=A.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].float().view(-1, 1)).view(-1)
    if full < n:
        out[full:] = values[full:] * absmax[full // blocksize].float()
    return out.reshape(shape).to(dtype)


def cpu_dequantize_is_exact() -> bool:
    """Whether bitsandbytes' native CPU `dequantize_4bit` computes what it specifies. Its AVX-512 kernel does not
    when a row's length is not a multiple of the blocksize (measured, bitsandbytes 0.50.2 on an AVX-512 EPYC: errors
    of 2.0 on N(0, 1) weights of shape (128, 96) at blocksize 64, whose NF4 round trip is within 0.45; the demo's
    576-wide rows at blocksize 128 are such a case): every 4-bit layer would train on silently wrong weights."""
    g = torch.Generator().manual_seed(0)
    for shape in ((8, 96), (8, 256)):
        weight = torch.randn(*shape, generator=g)
        for quant_type in ("nf4", "fp4"):
            data, state = quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type=quant_type)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                got = torch.ops.bitsandbytes.dequantize_4bit(data, state.absmax, 64, quant_type, list(shape), dtype)
                want = reference_dequantize_4bit(data, state.absmax, 64, quant_type, shape, dtype)
                if not torch.equal(got, want):
                    return False
    return True


def _row_per_block_dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                                   shape, dtype: torch.dtype) -> torch.Tensor:
    """The replacement CPU kernel: the native one where it is right, the reference elsewhere. The native kernel
    indexes blocks by row; given the same bytes as rows of exactly one block, every block is a row and it computes
    the specified result (the blocks lie in memory as before), so only a partial last block needs the reference."""
    n = 1
    for d in shape:
        n *= d
    fn = getattr(_native_lib(), f"cdequantize_blockwise_cpu_{quant_type}_{_CODES.get(dtype)}", None)
    if fn is None or n % blocksize or blocksize >= 2048 or not A.is_contiguous():
        return reference_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    import ctypes

    codes, scale = A.reshape(-1).view(torch.uint8), absmax.float().contiguous()
    out = torch.empty(n, dtype=dtype)
    fn(ctypes.c_void_p(codes.data_ptr()), ctypes.c_void_p(scale.data_ptr()), ctypes.c_void_p(out.data_ptr()),
       ctypes.c_longlong(blocksize), ctypes.c_longlong(n // blocksize), ctypes.c_longlong(blocksize))
    return out.reshape(shape)


_CODES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _native_lib():
    from bitsandbytes.cextension import lib

    return lib


def repair_cpu_dequantize() -> bool:
    """Replace bitsandbytes' CPU `dequantize_4bit` kernel where the native one is wrong (every 4-bit layer's forward
    and backward on a CPU goes through it): by the native kernel called with one block per row, and the reference
    where that cannot be done; returns whether it was replaced (and the replacement verified)."""
    if cpu_dequantize_is_exact():
        return False
    import warnings

    for kernel in (_row_per_block_dequantize_4bit, reference_dequantize_4bit):
        with warnings.catch_warnings():  # torch warns that a kernel is overridden: that is the point
            warnings.simplefilter("ignore")
            torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", kernel)
        if cpu_dequantize_is_exact():
            return True
    raise RuntimeError("bitsandbytes' CPU 4-bit dequantization is wrong on this CPU and could not be replaced")


CPU_DEQUANTIZE_REPAIRED = repair_cpu_dequantize()


def quantize(weight: torch.Tensor, *, quant_type: str, blocksize: int, double_quant: bool,
             out_dtype: torch.dtype, storage: torch.dtype = torch.uint8) -> bnb.nn.Params4bit:
    """Quantize a float weight (out, in) to a frozen `Params4bit`, on the weight's device.

    The codes are computed from the full-precision input (float32 here), then `out_dtype` is recorded
    as the dtype dequantization returns, so the layer computes in `out_dtype` without a second rounding
    of the weight to that dtype before quantization. `storage` is the dtype the packed codes are viewed as
    (bitsandbytes' quant_storage): uint8, or a float dtype so that FSDP can shard them with the other weights.
    """
    data, state = quantize_4bit(weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                quant_type=quant_type, quant_storage=torch.uint8)
    return _param(data, state, out_dtype, storage)


def quantize_calibrated(weight: torch.Tensor, hessian: torch.Tensor, *, quant_type: str, blocksize: int,
                        double_quant: bool, out_dtype: torch.dtype, storage: torch.dtype = torch.uint8
                        ) -> bnb.nn.Params4bit:
    """Like `quantize`, with bitsandbytes' own absmax for `weight` (out, in), but with codes chosen by GPTQ's error
    feedback under the calibration Hessian (in, in) instead of round-to-nearest (see `calibrate`)."""
    from .calibrate import gptq_codes

    data, state = quantize_4bit(weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                quant_type=quant_type, quant_storage=torch.uint8)
    top = int(state.code.abs().argmax())  # the ±1 level: dequantizing it everywhere yields each element's absmax
    scale = dequantize_4bit(torch.full_like(data, top << 4 | top), state).float() / state.code[top].float()
    codes = gptq_codes(weight, hessian, scale, state.code)
    return _param(pack(codes, data.shape), state, out_dtype, storage)


def pack(codes: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """bitsandbytes' 4-bit storage: two codes per byte in row-major order, the first in the high nibble."""
    flat = codes.flatten().to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4 | flat[1::2]).reshape(shape)


def unpack(data: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the codes (flat, int64) of a 4-bit tensor holding `numel` values."""
    flat = data.flatten()
    return torch.stack([flat >> 4, flat & 15], 1).flatten()[:numel].long()


def as_storage(data: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """Packed uint8 codes viewed as `storage`, in bitsandbytes' quant_storage layout (rows of one element each);
    the bytes are unchanged (zero-padded to whole elements)."""
    if storage == torch.uint8:
        return data
    flat = data.reshape(-1)
    pad = -flat.numel() % storage.itemsize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(storage).reshape(-1, 1)


def _param(data: torch.Tensor, state: QuantState, out_dtype: torch.dtype,
           storage: torch.dtype = torch.uint8) -> bnb.nn.Params4bit:
    state.dtype = out_dtype
    return bnb.nn.Params4bit(as_storage(data, storage), requires_grad=False, quant_state=state,
                             blocksize=state.blocksize, compress_statistics=state.nested, quant_type=state.quant_type,
                             quant_storage=storage, bnb_quantized=True)


def quantize_experts(stack: torch.Tensor, *, quant_type: str, blocksize: int, double_quant: bool,
                     out_dtype: torch.dtype, storage: torch.dtype = torch.uint8) -> bnb.nn.Params4bit:
    """Quantize a stack of expert weights (experts, a, b) in one call: bitsandbytes' blocks run over the flattened
    stack, so with a·b a multiple of `blocksize` no block straddles two experts and `dequantize_expert` can read
    any one expert alone."""
    experts, a, b = stack.shape
    if (a * b) % blocksize:
        raise ValueError(f"an expert weight of {a}x{b} is not a whole number of {blocksize}-blocks")
    return quantize(stack, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, out_dtype=out_dtype,
                    storage=storage)


def dequantize_expert(param: bnb.nn.Params4bit, expert: int) -> torch.Tensor:
    """Expert `expert` (a, b) of a `quantize_experts` stack, bit-identical to `dequantize(param)[expert]`, reading
    only that expert's codes and absmax (for double quantization, the 8-bit absmax blocks that cover them)."""
    state = param.quant_state
    _, a, b = state.shape
    n, bs = a * b, state.blocksize
    lo, hi = expert * n // bs, (expert + 1) * n // bs  # this expert's absmax entries
    if state.nested:
        inner = state.state2
        first, last = lo // inner.blocksize, -(-hi // inner.blocksize)
        codes = state.absmax[first * inner.blocksize: last * inner.blocksize]
        covering = QuantState(absmax=inner.absmax[first:last], code=inner.code, blocksize=inner.blocksize,
                              dtype=torch.float32)
        from bitsandbytes.functional import dequantize_blockwise

        absmax = dequantize_blockwise(codes, covering)[lo - first * inner.blocksize: hi - first * inner.blocksize]
        absmax = absmax + state.offset
    else:
        absmax = state.absmax[lo:hi]
    one = QuantState(absmax=absmax.float(), shape=torch.Size([a, b]), code=state.code, blocksize=bs,
                     quant_type=state.quant_type, dtype=state.dtype)
    codes = param.data.reshape(-1).view(torch.uint8)  # bytes, whatever the quant_storage
    return dequantize_4bit(codes[expert * n // 2: (expert + 1) * n // 2], one)


def dequantize(param: bnb.nn.Params4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight a 4-bit layer actually multiplies with (out, in), in its quant state's dtype, or in `dtype`
    (float32: code × absmax without a rounding to the compute dtype, for exports that cast once at the end)."""
    state = param.quant_state
    if dtype is not None and dtype != state.dtype:
        state = copy.copy(state)  # the layer's own state keeps its dtype
        state.dtype = dtype
    return dequantize_4bit(param.data, state)


def input_grad(layer: bnb.nn.Linear4bit):
    """g ↦ g·W for a 4-bit layer, computed as bitsandbytes' own backward computes it (in the layer's compute dtype,
    the weight dequantized anew, nothing kept between calls), in g's dtype."""

    def grad(g: torch.Tensor) -> torch.Tensor:
        g_compute = g.to(layer.compute_dtype or g.dtype)
        weight = dequantize(layer.weight).to(g_compute.dtype)
        return torch.matmul(g_compute, weight).to(g.dtype)

    return grad


def round_trip(weight: torch.Tensor, *, quant_type: str, blocksize: int, double_quant: bool) -> torch.Tensor:
    """bitsandbytes' own quantize → dequantize of `weight`, in its dtype (the reference for tests and stats)."""
    data, state = quantize_4bit(weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                quant_type=quant_type)
    return dequantize_4bit(data, state)


def set_weight(module: nn.Module, param: bnb.nn.Params4bit) -> None:
    """Install a quantized weight in a `bnb.nn.Linear4bit` (which also keeps a copy of the quant state)."""
    param.module = module
    module.weight = param
    module.quant_state = param.quant_state


def empty_4bit_linear(in_features: int, out_features: int, bias: bool, *, compute_dtype: torch.dtype,
                      quant_type: str, double_quant: bool, storage: torch.dtype = torch.uint8) -> bnb.nn.Linear4bit:
    """A `Linear4bit` on the meta device, to be filled by `set_weight` (what transformers' surgery creates)."""
    with torch.device("meta"):
        return bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                                 compress_statistics=double_quant, quant_type=quant_type, quant_storage=storage)


def is_4bit_param(value) -> bool:
    return isinstance(value, bnb.nn.Params4bit)


def is_4bit_linear(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit)


def is_quantized_module(module: nn.Module) -> bool:
    """A layer that already holds quantized weights (bitsandbytes 4/8-bit)."""
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or isinstance(
        getattr(module, "weight", None), (bnb.nn.Params4bit, bnb.nn.Int8Params))


def keep_training_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout; returns layers changed.

    On CPUs with AVX512-BF16, `Linear4bit.forward` repacks its weight the first time it runs in eval mode
    without grad (bitsandbytes 0.50). Nothing unpacks it when training resumes: the packed path runs
    `gemv_4bit`, which has no autograd kernel, so no gradient reaches earlier layers; its inverse also
    re-quantizes the absmax, so the weights would not come back bit-exact either. A model that may train
    again must never enter that layout, so switch the repacking off at its source, layer by layer. The
    switch is found by capability (the attribute bitsandbytes reads), not by version. Inference-only
    models may leave it on: the packed layout is faster there.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def is_cpu_packed(param: torch.Tensor) -> bool:
    return bool(getattr(getattr(param, "quant_state", None), "packing_format_for_cpu", False))


__all__ = ["QuantState", "as_storage", "empty_4bit_linear", "is_4bit_param", "quantize", "quantize_experts", "dequantize_expert", "quantize_calibrated", "pack", "unpack", "dequantize", "round_trip", "input_grad", "set_weight", "is_4bit_linear",
           "is_quantized_module", "keep_training_layout", "is_cpu_packed"]
