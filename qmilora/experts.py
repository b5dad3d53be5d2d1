"""Mixture-of-experts weights: each expert's matrix split like a linear layer's, stored as one 4-bit stack, and a
forward that dequantizes only the experts the router picked.

transformers keeps the experts of a MoE layer as 3-D parameters (experts, out, in), or (experts, in, out) where the
class declares `is_transposed`, on a module decorated with `use_experts_implementation`; its forward is chosen by
name from the experts interface (`config._experts_implementation`). QMiLoRA registers one more name there,
"qmilora", under which every expert weight the forward reads is

    W_e = dequant(NF4 residual)_e + s · B_e A_e      (the adapter of expert e, PEFT's layout, see below)

Few routed (token, expert) pairs (decoding): the model's own eager forward runs, and its `self.<param>[e]` dequantizes
the routed experts only. As many pairs as experts or more (training, prefill), when nearly every expert is hit
anyway: each stack is dequantized in one call and transformers' grouped forward (one grouped GEMM per stack) runs on
it, instead of a Python loop over experts that launches a dequant, an adapter product and two matmuls per expert.
There the adapter is applied to the routed tokens, never built as B_e A_e:

    y = X W_eᵀ + s · (X A_eᵀ) B_eᵀ      (three grouped GEMMs over the same expert offsets)

so backward computes no gradient of a whole (experts, out, in) stack, only the tokens' and the r-wide factors'.

The adapters are PEFT's LoRA on parameters (`LoraConfig.target_parameters`), whose
per-expert factors are lora_A (r·E, in) = [A_0; …; A_E-1] and lora_B (out, r·E) with B_e in columns e, E+e, … (its
`ParamWrapper` layout), so a saved adapter loads in plain PEFT. Training uses `ExpertsLora`, a `ParamWrapper` that
hands the factors to the forward above instead of adding a delta to the whole stack (PEFT's way, which would
dequantize every expert on every step). Routers stay in the compute dtype, unadapted.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from peft.tuners.lora.layer import ParamWrapper
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward

from . import quantize
from .config import QMiLoRAError

log = logging.getLogger("qmilora")
IMPLEMENTATION = "qmilora"


def experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{name: module} of every module that owns a 3-D parameter; refuses one that transformers cannot route
    through its experts interface (its layout is then unknown)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            continue  # a convolution's kernel (e.g. in linear-attention layers): kept as transformers keeps it
        if any(is_stack(p) for p in module.parameters(recurse=False)):
            if not routable(module):
                param = next(n for n, p in module.named_parameters(recurse=False) if is_stack(p))
                raise QMiLoRAError(f"{name}.{param} is a 3-D parameter of {type(module).__name__}, whose layout "
                                   "transformers does not declare (no experts interface): QMiLoRA cannot quantize or "
                                   "adapt it")
            found[name] = module
    return found


def is_stack(param: torch.Tensor) -> bool:
    """A stack of matrices, (experts, a, b) with every size above 1 (how transformers holds MoE experts), or a 4-bit
    stack made from one. Broadcast tensors such as RWKV's (1, 1, hidden) mixing weights, or a 4-D position
    embedding, are no stack."""
    state = getattr(param, "quant_state", None)
    if quantize.is_4bit_param(param):
        return state is not None and len(state.shape) == 3
    return param.dim() == 3 and all(size > 1 for size in param.shape)


def routable(module: torch.nn.Module) -> bool:
    """An experts module built by transformers' `use_experts_implementation` (it declares its weight layout)."""
    return hasattr(module, "is_transposed") and hasattr(type(module).forward, "__wrapped__")


def expert_params(model: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    """{full parameter name: (experts, out, in)} of every expert weight stack."""
    out = {}
    for name, module in experts_modules(model).items():
        for pname, param in module.named_parameters(recurse=False):
            if quantize.is_4bit_param(param) and is_stack(param):
                out[f"{name}.{pname}"] = tuple(param.quant_state.shape)  # kept (experts, out, in)
            elif param.dim() == 3 and is_stack(param):
                e, a, b = param.shape
                out[f"{name}.{pname}"] = (e, b, a) if module.is_transposed else (e, a, b)
    return out


def router_layers(model: torch.nn.Module) -> set[str]:
    """Linear layers that route tokens to experts: in the block that holds an experts module (beside it), with one
    output per expert. They stay as transformers builds them, unquantized and unadapted."""
    found = set()
    modules = dict(model.named_modules())
    for path, module in experts_modules(model).items():
        count = next(p.shape[0] for p in module.parameters(recurse=False) if is_stack(p))
        block = path.rpartition(".")[0]
        found |= {n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and m.out_features == count
                  and n.startswith(block + ".") and not n.startswith(path + ".")}
    return found


def use_routed_forward(model: torch.nn.Module) -> None:
    """Route every experts module of `model` through `routed_forward`."""
    for module in experts_modules(model).values():
        module.config._experts_implementation = IMPLEMENTATION


class _Weights:
    """`stack[e]` of an expert parameter as the eager forward reads it: dequantized (if 4-bit) plus the adapter."""

    def __init__(self, module, name: str, param, lora):
        self.module, self.name, self.param, self.lora = module, name, param, lora

    def __getitem__(self, expert):
        e, transposed = int(expert), self.module.is_transposed
        if quantize.is_4bit_param(self.param):
            w = quantize.dequantize_expert(self.param, e)  # 4-bit stacks are kept (experts, out, in)
        else:
            w = self.param[e].T if transposed else self.param[e]
        if self.lora is not None:
            A, B, scaling = self.lora  # (E, r, in), (E, out, r)
            w = w + (scaling * (B[e] @ A[e])).to(w.dtype)
        return w.T if transposed else w

    def __getattr__(self, attr):
        # an eager forward that uses the whole stack (e.g. one bmm over all experts) gets all of it, dequantized
        log.warning("qmilora: %s uses all its experts at once; the whole stack is dequantized", type(self.module).__name__)
        return getattr(whole_stack(self.module, self.param, self.lora), attr)


def grouped_gemm_takes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs these weights: on CUDA only bfloat16 (transformers' grouped forward does not
    check the dtype there, so float16 or float32 would fail in the kernel); its CPU kernel takes any float dtype."""
    return device.type != "cuda" or dtype == torch.bfloat16


def dtype_of(stack) -> torch.dtype:
    """The dtype a stack's experts are multiplied in: the quant state's for a 4-bit stack."""
    return stack.quant_state.dtype if quantize.is_4bit_param(stack) else stack.dtype


def count(stack) -> int:
    """Experts in a stack, 4-bit or not."""
    return stack.quant_state.shape[0] if quantize.is_4bit_param(stack) else stack.shape[0]


class _View:
    """The experts module as its eager forward sees it under QMiLoRA: expert parameters replaced by `_Weights`."""

    def __init__(self, module, weights: dict):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_weights", weights)

    def __getattr__(self, attr):
        weights = object.__getattribute__(self, "_weights")
        return weights[attr] if attr in weights else getattr(object.__getattribute__(self, "_module"), attr)


def whole_stack(module, param, lora) -> torch.Tensor:
    """Every expert's weight of `param` in the module's own layout: dequantized (if 4-bit) in one call, plus the
    adapters in one batched product."""
    transposed, fresh = module.is_transposed, quantize.is_4bit_param(param)
    if fresh:
        w = quantize.dequantize(param)  # 4-bit stacks are kept (experts, out, in)
    else:
        w = param.transpose(1, 2) if transposed else param
    if lora is not None:
        A, B, scaling = lora  # (E, r, in), (E, out, r)
        # one fused multiply-add; a freshly dequantized stack takes it in place, so one stack-sized tensor is alive
        # per stack, not three (autograd keeps B and A for it, not the stack); a frozen full-precision one must not
        add = torch.Tensor.baddbmm_ if fresh else torch.baddbmm
        w = add(w, B.to(w.dtype), A.to(w.dtype), alpha=scaling)
    return w.transpose(1, 2) if transposed else w


class _Adapted:
    """A frozen stack with its adapter, as the grouped forward's `_grouped_linear` receives it (see
    `_install_routed_lora`)."""

    def __init__(self, base: torch.Tensor, lora):
        self.base, (self.A, self.B, self.scaling) = base, lora  # A (E, r, in), B (E, out, r)


def _install_routed_lora() -> None:
    """transformers' grouped forward multiplies each stack by one module-level function, `_grouped_linear`; wrapped
    here (once, and left installed: autograd may recompute layers on several threads at once) so that an
    `_Adapted` stack goes through three grouped GEMMs, X Wᵀ + s·(X Aᵀ) Bᵀ, and a plain tensor as before."""
    from transformers.integrations import moe

    plain = moe._grouped_linear
    if getattr(plain, "qmilora", False):
        return

    def grouped_linear(input, weight, offs, bias=None, is_transposed=False):
        if not isinstance(weight, _Adapted):
            return plain(input, weight, offs, bias=bias, is_transposed=is_transposed)
        dtype = weight.base.dtype  # the grouped GEMM's dtype (CUDA: bfloat16 only); the factors are cast to it
        down = plain(input, weight.A.to(dtype).contiguous(), offs)  # (S, r): A is (E, r, in), i.e. (experts, out, in)
        return plain(input, weight.base, offs, bias=bias, is_transposed=is_transposed) + \
            weight.scaling * plain(down, weight.B.to(dtype).contiguous(), offs)

    grouped_linear.qmilora = True
    moe._grouped_linear = grouped_linear


def _routable_lora(lora, hidden_states) -> bool:
    """Whether the adapter can run as grouped GEMMs of its own: CUDA's grouped GEMM wants 16-byte-aligned rows, so
    r·2 bytes (bfloat16) a multiple of 16 (r = 8, 16, 64, ...); other ranks get the adapter added to the stack."""
    from transformers.integrations import moe

    return lora is not None and hasattr(moe, "_grouped_linear") and (  # a transformers without it: the stack path
        hidden_states.device.type != "cuda" or lora[0].shape[1] % 8 == 0)


def routed_forward(module, hidden_states, top_k_index, top_k_weights):
    """The experts forward on QMiLoRA's weights: transformers' grouped forward on whole dequantized stacks, the
    adapters applied to the routed tokens, where there are at least as many routed pairs as experts; else the
    model's eager forward reading each routed expert's weight through `_Weights`."""
    lora = getattr(module, "_qmilora_lora", {})
    stacks = {n: p for n, p in module.named_parameters(recurse=False) if is_stack(p)}
    first = next(iter(stacks.values()))
    if top_k_index.numel() >= count(first) and grouped_gemm_takes(hidden_states.device, dtype_of(first)):
        weights = {n: _Adapted(whole_stack(module, p, None), lora[n]) if _routable_lora(lora.get(n), hidden_states)
                   else whole_stack(module, p, lora.get(n)) for n, p in stacks.items()}
        if any(isinstance(w, _Adapted) for w in weights.values()):
            _install_routed_lora()
        return grouped_mm_experts_forward(_View(module, weights), hidden_states, top_k_index, top_k_weights)
    weights = {n: _Weights(module, n, p, lora.get(n)) for n, p in stacks.items()}
    return type(module).forward.__wrapped__(_View(module, weights), hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(IMPLEMENTATION, routed_forward)


class ExpertsLora(ParamWrapper):
    """PEFT's LoRA on one expert parameter, computed per routed expert by `routed_forward` (its state dict, config
    and adapter files are `ParamWrapper`'s). The wrapped parameter may be a 4-bit stack."""

    def _get_in_out_features(self, module):
        param = self.get_param()
        if quantize.is_4bit_param(param):
            e, out_features, in_features = param.quant_state.shape  # 4-bit stacks are kept (experts, out, in)
            self.num_experts, self._param_ndim = e, 3
            # as ParamWrapper reads the module's own layout: it swaps the two where that is (experts, out, in)
            transposed = getattr(self.get_base_layer(), "is_transposed", False)
            return (in_features, out_features) if transposed else (out_features, in_features)
        return super()._get_in_out_features(module)

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (E, r, in), B (E, out, r), scaling) of `adapter`: ΔW_e = scaling · B_e A_e, (out, in)."""
        A = self.lora_A[adapter].weight
        B = self.lora_B[adapter].weight
        return (A.reshape(self.num_experts, -1, A.shape[-1]),
                B.reshape(B.shape[0], -1, self.num_experts).permute(2, 0, 1), self.scaling[adapter])

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters):
        adapters = [a for a in active_adapters if a in self.lora_A]
        if not adapters:
            yield
            return
        if len(adapters) > 1:
            raise QMiLoRAError("QMiLoRA's expert adapters run one adapter at a time")
        experts = self.get_base_layer()
        store = experts.__dict__.setdefault("_qmilora_lora", {})
        store[self.parameter_name] = self.factors(adapters[0])
        try:
            yield
        finally:
            store.pop(self.parameter_name, None)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if quantize.is_4bit_param(self.get_param()):
            raise QMiLoRAError("a 4-bit expert stack cannot take a merged adapter; export with qmilora-export --to merged")
        super().merge(safe_merge, adapter_names)


# PEFT nests a second parameter's wrapper around the first only if that one's class is *named* ParamWrapper (its
# tuners_utils checks the name to avoid a circular import); two stacks on one experts module need the nesting.
ExpertsLora.__name__ = ExpertsLora.__qualname__ = ParamWrapper.__name__


def lora_layers(peft_model) -> dict[str, ExpertsLora]:
    """{full expert parameter name in the base model: its LoRA layer}."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[f"{owner}.{module.parameter_name}"] = module
    return out


def adapter_paths(peft_model) -> dict[str, str]:
    """{full expert parameter name: the module path that its adapter's keys carry in PEFT's files (nested wrappers:
    `…experts.base_layer`)}."""
    return {f"{n.removeprefix('base_model.model.').replace('.base_layer', '')}.{m.parameter_name}":
            n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, ParamWrapper)}


def to_peft_layout(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert factors A (E, r, in), B (E, out, r) as PEFT's lora_A (r·E, in) and lora_B (out, r·E)."""
    return A.reshape(-1, A.shape[-1]).contiguous(), B.permute(1, 2, 0).reshape(B.shape[1], -1).contiguous()
