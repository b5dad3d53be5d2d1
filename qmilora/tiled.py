"""Position-wise blocks (a decoder layer's MLP) over the sequence in tiles, each tile under activation checkpointing.

An MLP acts on each token alone, so y = MLP(x) equals the tiles' outputs concatenated, MLP(x[t₀:t₁]) ‖ MLP(x[t₁:t₂])
‖ …, exactly. What differs is what is kept: the whole MLP keeps its intermediate activations for every token
(for Llama-3-8B, several 14,336-wide tensors per token: the largest part of a recomputed layer at long context);
tiled, each tile's are recomputed in backward one tile at a time, so only one tile's are ever alive. The price is
one more forward of the MLP per step (with layer checkpointing: three instead of two). DeepSpeed's and Liger-Kernel's "tiled MLP"
do the same; here torch's own `checkpoint` does it, so it needs no Triton and runs on a CPU.

Which blocks are position-wise is checked, not assumed from names: each candidate (a direct child of one of the
model's decoder layers, as transformers' `_no_split_modules` names them, holding linear layers) must map a
(2, T, hidden) tensor to one of the same shape, and its output on two halves of the sequence must equal its output on
the whole. Attention (tokens see each other) fails. Mixture-of-experts blocks (expert stacks, or lists of expert
modules) are left whole without a probe: their routers' outputs are recorded per call for the auxiliary loss, which
tiles would split, and their per-token activations are small.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def tile_position_wise(model: torch.nn.Module, tokens: int | None = None) -> list[str]:
    """Compute the model's position-wise blocks in tiles of `tokens` (default: the hidden size, as DeepSpeed's
    tiled MLP) while gradients are on; returns the names of the blocks changed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.config.get_text_config().hidden_size
    tile = tokens or hidden
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    verdict: dict[type, bool] = {}
    changed = []
    for name, layer in base.named_modules():
        if type(layer).__name__ not in layer_classes:
            continue
        for child_name, child in layer.named_children():
            if not any(isinstance(m, torch.nn.Linear) for m in child.modules()) or _routes(child):
                continue
            if type(child) not in verdict:
                verdict[type(child)] = _position_wise(child, hidden)
            if verdict[type(child)]:
                _tile(child, tile)
                changed.append(f"{name}.{child_name}")
    return changed


def untile(model: torch.nn.Module) -> int:
    """Undo `tile_position_wise`; returns the number of blocks restored."""
    restored = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _TiledForward):
            del module.forward
            restored += 1
    return restored


def _tile(module: torch.nn.Module, tokens: int) -> None:
    tiled = module.__dict__.get("forward")
    if isinstance(tiled, _TiledForward):
        tiled.tile = tokens
    else:
        module.forward = _TiledForward(module.forward, tokens)  # an instance attribute: the class stays untouched


class _TiledForward:
    """`whole` (the module's own forward) over tiles of the sequence (dimension -2) while gradients are on; as it was
    otherwise."""

    def __init__(self, whole, tile: int):
        self.whole, self.tile = whole, tile

    def __call__(self, x, *args, **kwargs):
        if args or kwargs or not torch.is_grad_enabled() or x.dim() < 2 or x.shape[-2] <= self.tile:
            return self.whole(x, *args, **kwargs)
        parts = [part.contiguous() for part in x.split(self.tile, dim=-2)]  # a block may view its input as (B·T, H)
        return torch.cat([checkpoint(self.whole, part, use_reentrant=False) for part in parts], dim=-2)


def _routes(block: torch.nn.Module) -> bool:
    """A mixture-of-experts block: expert stacks (3-D parameters), or a list of modules (experts)."""
    from .experts import is_stack

    return any(is_stack(p) for p in block.parameters()) or any(
        isinstance(m, torch.nn.ModuleList) for m in block.modules())


@torch.no_grad()
def _position_wise(block: torch.nn.Module, hidden: int) -> bool:
    """Whether `block` maps (2, T, hidden) to (2, T, hidden) token by token (checked on 8 tokens in two halves)."""
    param = next(block.parameters(), None)
    if param is None:
        return False
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    x = torch.randn(2, 8, hidden, generator=torch.Generator().manual_seed(0)).to(param.device, dtype)
    was_training = block.training
    block.eval()  # dropout off
    try:
        whole = block(x)
        halves = [block(x[:, :4].contiguous()), block(x[:, 4:].contiguous())]
    except Exception:  # needs other inputs (attention's masks and positions): not a position-wise block
        return False
    finally:
        block.train(was_training)
    if not (torch.is_tensor(whole) and whole.shape == x.shape and all(torch.is_tensor(h) for h in halves)):
        return False
    tiled = torch.cat(halves, dim=-2).float()
    # other GEMM shapes may round differently: a few steps of the dtype's rounding (mixing tokens changes far more)
    tolerance = max(1e-3, 4 * torch.finfo(dtype).eps)
    return bool((tiled - whole.float()).abs().max() <= tolerance * whole.float().abs().max() + 1e-6)


__all__ = ["tile_position_wise", "untile"]
