"""One autograd function for a LoRA layer over a frozen (4-bit) base:

    y = base(x) + s · (drop(x) · Aᵀ) · Bᵀ        x (…, in), A (r, in), B (out, r), s = lora_alpha / r

computed as PEFT's LoRA layer computes it (same operations, same casts, so outputs and gradients agree to
rounding), with less kept for backward. PEFT's composition of modules saves, per adapted layer, the dropped input
drop(x) in the adapter's dtype (lora_A needs it for A's gradient) and dropout's mask; this function saves x itself
(which the q, k and v projections share, and which the layer before usually keeps anyway), the mask as booleans,
and the r-wide x·Aᵀ. Backward:

    ∂L/∂B = s · gᵀ · h,   h = drop(x)·Aᵀ            ∂L/∂A = s · (g·B)ᵀ · drop(x)
    ∂L/∂x = g · W  +  s · ((g·B)·A) ⊙ mask / (1 − p)   (W: the base weight, dequantized again in backward)

The base's forward and its input gradient g·W are passed in as functions, so this module knows no quantization
format. The dropout mask is drawn by `F.dropout` on a tensor of ones shaped like x: the same random numbers
PEFT's dropout draws, and the same again when activation checkpointing recomputes the forward (torch restores
the RNG state).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class LoraOverFrozen(torch.autograd.Function):
    """`apply(x, A, B, base, base_input_grad, scaling, p, lora_dtype)`: see the module docstring. `base(x)` runs the
    frozen layer (with its casts); `base_input_grad(g)` returns g·W in x's dtype. `lora_dtype` is the dtype the
    adapter branch computes in (PEFT casts x to the adapter's dtype unless autocast is on: then None)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base: Callable, base_input_grad: Callable,
                scaling: float, p: float, lora_dtype: torch.dtype | None):
        result = base(x)
        xl = x if lora_dtype is None else x.to(lora_dtype)
        mask = None
        if p > 0:
            kept = F.dropout(torch.ones_like(xl), p, training=True)  # 0 or 1/(1-p), PEFT's draws
            xl = xl * kept
            mask = kept != 0
        h = F.linear(xl, A)
        lora = F.linear(h, B) * scaling
        ctx.save_for_backward(x, A, B, h, mask)
        ctx.base_input_grad, ctx.scaling, ctx.p, ctx.lora_dtype = base_input_grad, scaling, p, lora_dtype
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        return result + (lora if lora_dtype is None else lora.to(result.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, A, B, h, mask = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # the forward's precision, as autograd's own
            g = grad if ctx.lora_dtype is None else grad.to(ctx.lora_dtype)
            g = g * ctx.scaling
            rows_g, rows_h = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
            grad_B = rows_g.t().mm(rows_h) if ctx.needs_input_grad[2] else None
            g_h = F.linear(g, B.t())  # (…, r)
            dropped = x if ctx.lora_dtype is None else x.to(ctx.lora_dtype)
            if mask is not None:
                dropped = dropped * mask / (1 - ctx.p)
            grad_A = g_h.reshape(-1, g_h.shape[-1]).t().mm(dropped.reshape(-1, dropped.shape[-1])) \
                if ctx.needs_input_grad[1] else None
            g_x = F.linear(g_h, A.t()) if ctx.needs_input_grad[0] else None
        if g_x is not None:  # dropout's backward in the input's precision, after the cast, as autograd orders them
            g_x = g_x.to(x.dtype if ctx.lora_dtype is None else ctx.lora_dtype)
            g_x = (g_x * mask / (1 - ctx.p) if mask is not None else g_x).to(x.dtype)
        # the frozen base's gradient as its own backward computes it (outside autocast, like bitsandbytes')
        grad_x = ctx.base_input_grad(grad) + g_x if g_x is not None else None
        return grad_x, grad_A, grad_B, None, None, None, None, None


__all__ = ["LoraOverFrozen"]
