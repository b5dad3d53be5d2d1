"""The one place that relies on other libraries' internals rather than their documented API, so that an upgrade of
transformers or PEFT touches this file only. (bitsandbytes' own internals stay in `quantize`, the only module that
imports it.)

Loading follows transformers. A QMiLoRA preparation is `from_pretrained` with a registered custom quantizer (the
extension point transformers documents for new quantization methods). transformers then does what it knows about
each architecture: key renames (GPT-NeoX's `embed_out`), weight conversions (per-expert MoE tensors fused into 3-D
parameters), tied weights, its 4-bit module surgery (`nn.Linear` and `Conv1D` → `Linear4bit`), sequential
loading of one tensor at a time when quantizing on the fly. The quantizer's conversion op receives each linear
weight exactly as the model will hold it and hands it, oriented (out, in) and in float32, to QMiLoRA's callback,
which returns the 4-bit parameter (or, unquantized, the residual). Nothing here knows an architecture by name.

- transformers: `register_quantizer` / `register_quantization_config`, `Bnb4BitHfQuantizer`'s surgery and
  bitsandbytes (de)serialization, `ConversionOps`, `Conv1D`'s (in, out) storage.
- PEFT: which LoRA layer class wraps which base layer (its bitsandbytes layer is chosen only for 4-bit-marked models);
  its per-model-type target rules (the transformers-v4 MoE re-targeting tables, its Mamba check), asked, not copied.

MoE expert stacks (transformers' experts interface, PEFT's parameter LoRA) have their own module, `experts`.
"""
from __future__ import annotations

import contextlib
import functools
import re
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import ParamWrapper
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.core_model_loading import ConversionOps
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import AutoHfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

from . import quantize
from .config import QMiLoRAError

# PEFT 0.21 reads `model.is_gradient_checkpointing` whenever it builds a PeftModel, and transformers 5 deprecates that
# property for `is_activation_checkpointing` (same value) with a FutureWarning: printed by every command that loads a
# model, and nothing a user can act on. Only that message is silenced.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

METHOD = "qmilora"


@dataclass
class LoadJob:
    """What one preparation asks of the loader: which layers' weights go through `convert`, and whether the model
    gets 4-bit layers at all. `convert(layer, W)` receives W (out, in) float32 and returns what the layer holds."""
    quantize: bool
    quant_type: str
    double_quant: bool
    dtype: torch.dtype
    storage: torch.dtype = torch.uint8  # bitsandbytes' quant_storage (a float dtype: FSDP shards the 4-bit weights)
    layers: set[str] | None = None
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    # MoE expert stacks, by full parameter name: `convert` receives them as W (experts, out, in) float32 too
    experts: set[str] = field(default_factory=set)
    keep: set[str] = field(default_factory=set)  # linear layers left as they are (MoE routers): not converted


_JOBS: dict[str, LoadJob] = {}


@register_quantization_config(METHOD)
class QMiLoRALoadConfig(BitsAndBytesConfig):
    """bitsandbytes' 4-bit config under QMiLoRA's method name, so that transformers builds `QMiLoRAQuantizer`."""

    def __init__(self, job_id: str | None = None, **kwargs):
        kwargs.setdefault("load_in_4bit", True)
        super().__init__(**kwargs)
        self.quant_method = METHOD
        self.job_id = job_id


@register_quantizer(METHOD)
class QMiLoRAQuantizer(Bnb4BitHfQuantizer):
    """transformers' bitsandbytes 4-bit quantizer, with QMiLoRA's conversion of each linear weight on its way in,
    and `nn.Linear` subclasses with a plain linear forward (e.g. Falcon's) converted like `nn.Linear`."""

    @property
    def job(self) -> LoadJob | None:
        return _JOBS.get(getattr(self.quantization_config, "job_id", None))

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        job = self.job
        if job is None or job.layers is None:
            return super().param_needs_quantization(model, param_name, **kwargs)
        layer, _, name = param_name.rpartition(".")
        return (name == "weight" and layer in job.layers) or param_name in job.experts

    def get_modules_to_not_convert(self, model, skip_modules=None, keep_in_fp32_modules=None, add_default_skips=False):
        names = super().get_modules_to_not_convert(model, skip_modules, keep_in_fp32_modules, add_default_skips)
        job = self.job  # transformers reads each entry as a regex from a name's start: exact names, escaped
        return sorted(set(names) | {re.escape(n) for n in (job.keep if job is not None else ())})

    def _process_model_before_weight_loading(self, model, device_map, **kwargs):
        job = self.job
        if job is not None and not job.quantize:
            return  # full-precision MiLoRA: the layers stay as they are
        super()._process_model_before_weight_loading(model, device_map, **kwargs)
        skip = set(self.modules_to_not_convert or [])
        for name, module in list(model.named_modules()):
            if (isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear
                    and not quantize.is_4bit_linear(module) and not any(name == s or name.endswith("." + s) or
                                                                      name.startswith(s + ".") for s in skip)):
                if not acts_as_linear(type(module)):
                    continue  # e.g. a MoE router built on nn.Linear: kept in full precision, as transformers keeps it
                parent, _, child = name.rpartition(".")
                replacement = quantize.empty_4bit_linear(
                    module.in_features, module.out_features, module.bias is not None,
                    compute_dtype=self.quantization_config.bnb_4bit_compute_dtype,
                    quant_type=self.quantization_config.bnb_4bit_quant_type,
                    double_quant=self.quantization_config.bnb_4bit_use_double_quant,
                    storage=self.quantization_config.bnb_4bit_quant_storage)
                replacement.source_cls = type(module)
                replacement.requires_grad_(False)
                setattr(model.get_submodule(parent) if parent else model, child, replacement)

    def _process_model_after_weight_loading(self, model, **kwargs):
        job = self.job
        if job is not None and not job.quantize:
            return model
        return super()._process_model_after_weight_loading(model, **kwargs)

    def get_quantize_ops(self):
        return _MinorSplitConvert(self)


class _MinorSplitConvert(ConversionOps):
    """Each linear weight, as transformers would place it, through the job's callback."""

    def __init__(self, quantizer: QMiLoRAQuantizer):
        self.quantizer = quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        job = self.quantizer.job
        out = {}
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            layer_name = param_name.rpartition(".")[0]
            module = model.get_submodule(layer_name)
            if param_name in job.experts:  # a MoE stack, after transformers' own conversions (experts fused)
                key, transposed, swap = param_name, module.is_transposed, lambda t: t.transpose(1, 2)
                stored = tuple(getattr(module, param_name.rpartition(".")[2]).shape)
                expected = (stored[0], stored[2], stored[1]) if transposed else stored
            else:
                key, transposed, swap = layer_name, is_conv1d(module), lambda t: t.T
                expected = out_in(module)
            weight = swap(value) if transposed else value  # (…, out, in), as the forward multiplies
            if tuple(weight.shape) != expected:
                raise _Abort(QMiLoRAError(
                    f"checkpoint tensor {param_name} holds a {tuple(weight.shape)} weight where config.json describes "
                    f"{expected} ({'experts, ' if key == param_name else ''}out, in): the weights and the config do "
                    "not belong together"))
            try:
                result = job.convert(key, weight)
            except Exception as err:
                raise _Abort(err) from err
            if transposed and not quantize.is_4bit_param(result):
                result = swap(result).contiguous()  # unquantized: back into the module's own layout
            # (a 4-bit stack stays (experts, out, in): `experts` reads it in the module's orientation)
            module._is_hf_initialized = True
            out[param_name] = result
        return out


class _Abort(BaseException):
    """transformers logs an op's Exception and goes on loading without that tensor; a refusal must stop the load."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def from_pretrained(job: LoadJob, model_class, **kwargs):
    """`model_class.from_pretrained(**kwargs, output_loading_info=True)` under `job`; an error raised by the job's
    `convert` stops the load and is raised as it was."""
    with loading(job) as quantization_config:
        try:
            return model_class.from_pretrained(**kwargs, quantization_config=quantization_config,
                                               output_loading_info=True)
        except _Abort as abort:
            raise abort.error from None


def out_in(layer: torch.nn.Module) -> tuple[int, int]:
    """(out, in) features of a linear-like layer: nn.Linear, Linear4bit, or Conv1D (whose weight is stored (in, out))."""
    if isinstance(layer, Conv1D):
        return layer.nf, layer.weight.shape[0]
    return layer.out_features, layer.in_features


def is_conv1d(module: torch.nn.Module) -> bool:
    """A layer whose checkpoint weight is stored (in, out): a Conv1D, or a 4-bit layer transformers made from one."""
    return isinstance(module, Conv1D) or issubclass(getattr(module, "source_cls", type(None)), Conv1D)


@functools.cache
def acts_as_linear(cls: type) -> bool:
    """Whether an nn.Linear subclass computes x @ Wᵀ + b (checked on a small instance, not by its name)."""
    # the surgery runs under a meta-device context (init_empty_weights, from_pretrained's device mode): the probe and
    # its inputs get real CPU memory explicitly
    with torch.device("cpu"):
        try:
            probe = cls(5, 3, bias=True)
        except TypeError:
            return False
        probe = probe.to_empty(device="cpu")
        g = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():
            probe.weight.copy_(torch.randn(3, 5, generator=g, device="cpu"))
            probe.bias.copy_(torch.randn(3, generator=g, device="cpu"))
            x = torch.randn(2, 5, generator=g, device="cpu")
            try:
                return torch.allclose(probe(x), torch.nn.functional.linear(x, probe.weight, probe.bias), atol=1e-6)
            except Exception:
                return False


def linear_like(module: torch.nn.Module) -> bool:
    """A layer "all-linear" covers: nn.Linear, its subclasses that compute a plain linear map (not, e.g., a router
    that picks experts in its forward), or transformers' Conv1D."""
    if isinstance(module, Conv1D) or type(module) is torch.nn.Linear:
        return True
    return isinstance(module, torch.nn.Linear) and acts_as_linear(type(module))


def opaque_linear(module: torch.nn.Module) -> bool:
    """An nn.Linear subclass whose forward is not a plain linear map: neither quantized nor adapted."""
    return isinstance(module, torch.nn.Linear) and not quantize.is_4bit_linear(module) and not linear_like(module)


def peft_unadaptable(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """{layer: why} for linear layers PEFT will not put a LoRA adapter on (or not load one back onto) in `model`,
    by PEFT's own rules for its model type:
    - a name PEFT rewrites into a MoE expert-parameter target (its compatibility with LoRA configs written for
      transformers v4, `peft.utils.transformers_weight_conversion`), whatever module it names;
    - a module PEFT refuses outright on that model type (e.g. Mamba's `out_proj`)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    from peft.utils import transformers_weight_conversion as v4
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    model_type = getattr(model.config, "model_type", None)
    pattern = v4._MODEL_TO_CONVERSION_PATTERN.get(model_type)
    renamed = set(v4._MOE_TARGET_MODULE_MAPPING.get(pattern, {})) if (
        get_checkpoint_conversion_mapping(model_type) is not None and v4._MOE_FUSED_TARGETS.get(pattern)) else set()
    probe = LoraConfig(target_modules=["-"])
    out = {}
    for name in names:
        leaf = name.rpartition(".")[2]
        if leaf in renamed:
            out[name] = (f"PEFT reads a LoRA target named {leaf!r} on {model_type} models as a transformers-v4 MoE "
                         "expert and would load it elsewhere")
            continue
        try:
            _check_lora_target_modules_mamba(probe, model, leaf)
        except ValueError as err:
            out[name] = str(err).split("] ", 1)[-1].split(". ")[0]
    return out


@contextlib.contextmanager
def loading(job: LoadJob):
    """The `quantization_config` to pass to `from_pretrained` (or to `skeleton`) while `job` is active."""
    job_id = uuid.uuid4().hex
    _JOBS[job_id] = job
    try:
        yield QMiLoRALoadConfig(job_id=job_id, bnb_4bit_quant_type=job.quant_type,
                                bnb_4bit_use_double_quant=job.double_quant, bnb_4bit_compute_dtype=job.dtype,
                                bnb_4bit_quant_storage=job.storage)
    finally:
        del _JOBS[job_id]


def install_4bit_layers(model: PreTrainedModel, job: LoadJob, device: torch.device) -> None:
    """The module surgery `from_pretrained` will do under `job`, applied to a meta skeleton (to resolve targets)."""
    with loading(job) as config:
        quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=job.dtype, device_map={"": device})


def finish_loaded(model: PreTrainedModel, job: LoadJob | None) -> None:
    """After loading (a preparation, `job`, or a cached 4-bit base, None): the model reads as a bitsandbytes 4-bit
    model to PEFT and Trainer (which check `quantization_method` and `is_loaded_in_4bit`; its config keeps QMiLoRA's
    method name so that a reload rebuilds the same layers), or, unquantized, as a plain model."""
    from transformers.utils.quantization_config import QuantizationMethod

    if job is not None and not job.quantize:
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
        return
    if job is not None:
        config = QMiLoRALoadConfig(bnb_4bit_quant_type=job.quant_type, bnb_4bit_use_double_quant=job.double_quant,
                                   bnb_4bit_compute_dtype=job.dtype, bnb_4bit_quant_storage=job.storage)
        model.config.quantization_config = config
        model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)
    model.is_loaded_in_4bit = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES


def save_on_this_process(model: PreTrainedModel, directory: str) -> None:
    """`model.save_pretrained(directory)` on this process, whatever its rank. Once torch.distributed is initialized,
    transformers writes only on global rank 0 and silently writes nothing elsewhere; a cache entry written by
    another node's main process (multi-node torchrun) would have an empty base."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process  # shadows transformers' method
    try:
        model.save_pretrained(directory)
    finally:
        del model.should_save_on_this_rank


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    """{base-model layer name: PEFT LoRA layer} of the linear layers (expert stacks: `experts.lora_layers`)."""
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)}


def is_bnb_lora(layer: LoraLayer) -> bool:
    """PEFT's bitsandbytes LoRA layer (dequantizes for merges, knows the 4-bit base), not its plain one."""
    return type(layer).__module__ == "peft.tuners.lora.bnb"


def packs_without_mask(model: torch.nn.Module) -> bool:
    """Whether the model's attention takes packed rows without a T×T mask: some flavour of FlashAttention, as
    transformers itself tells them apart (its variable-length path)."""
    from transformers.utils.generic import is_flash_attention_requested

    return is_flash_attention_requested(model.config)


def use_fused_lora(model: torch.nn.Module, enabled: bool = True) -> int:
    """Route PEFT's bitsandbytes 4-bit LoRA layers through `fused.LoraOverFrozen` while they train (or, enabled=False,
    back to PEFT's own forward); returns the number of layers changed. Any other state of a layer (merged, adapters
    disabled, several active adapters, a LoRA variant such as DoRA, per-example adapter names, no gradients) runs
    PEFT's forward unchanged."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    changed = 0
    for module in model.modules():
        if isinstance(module, PeftLinear4bit):
            if enabled:
                module.forward = _FusedForward(module)  # an instance attribute: PEFT's class stays untouched
            else:
                module.__dict__.pop("forward", None)
            changed += 1
    return changed


class _FusedForward:
    """A PEFT bitsandbytes LoRA layer's forward through `fused.LoraOverFrozen` in the plain case, PEFT's own otherwise
    (a picklable object, unlike a bound function that is not the class's)."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        from .fused import LoraOverFrozen

        layer = self.layer
        if not _plain_lora(layer, args, kwargs):
            return type(layer).forward(layer, x, *args, **kwargs)
        name = layer.active_adapters[0]
        A, B, dropout = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        # PEFT casts the adapter's input to the adapter's dtype unless autocast is on (its own test, mirrored)
        lora_dtype = None if torch.is_autocast_enabled() else A.dtype
        return LoraOverFrozen.apply(x, A, B, layer.base_layer, quantize.input_grad(layer.base_layer),
                                    layer.scaling[name], p, lora_dtype)


def _plain_lora(layer, args, kwargs) -> bool:
    """The one case the fused function computes: training, one active adapter of two bias-free linear factors with
    plain dropout (no variant such as DoRA, no lora_bias), on a frozen 4-bit base, called with x alone."""
    active = layer.active_adapters
    if (args or kwargs or not torch.is_grad_enabled() or layer.disable_adapters or layer.merged or len(active) != 1
            or active[0] not in layer.lora_A or active[0] in layer.lora_variant
            or not getattr(layer, "cast_input_dtype_enabled", True) or quantize.is_cpu_packed(layer.base_layer.weight)
            or any(p.requires_grad for p in layer.base_layer.parameters())):
        return False
    name = active[0]
    factors = (layer.lora_A[name], layer.lora_B[name])
    return (all(type(f) is torch.nn.Linear and f.bias is None for f in factors)
            and not getattr(layer, "lora_bias", {}).get(name, False)
            and type(layer.lora_dropout[name]) in (torch.nn.Dropout, torch.nn.Identity))
