"""Build a trainable QMiLoRA model: load a full-precision checkpoint the way transformers loads it, intercepting each
linear weight on its way in.

Per linear weight (as `from_pretrained` places it: renamed, converted, (out, in)):  W (fp32, SVD device) →
minor_split → W_res → NF4 → the layer's `Linear4bit`, while (A, B) wait on the host for PEFT's LoRA layer. Non-target
linear layers are quantized as they are (QLoRA); every other tensor is loaded by transformers. transformers loads
one tensor at a time when quantizing on the fly, so the full-precision model is never resident. How the loader is
hooked lives in `interop`.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from . import cache, calibrate, checkpoint, cpu, decompose, experts, interop, quantize
from .config import QMiLoRAConfig, QMiLoRAError

log = logging.getLogger("qmilora")
DEMO = "demo"  # prepare_model("demo"): the bundled SmolLM2-135M-Instruct (see `qmilora.demo`)


@dataclass
class PrepareStats:
    layers: int = 0
    decomposed: int = 0
    seconds: float = 0.0
    svd_seconds: float = 0.0
    nf4_rel_error: list[float] = field(default_factory=list)
    minor_energy: list[float] = field(default_factory=list)
    peak_rss_gb: float = 0.0
    peak_gpu_gb: float = 0.0
    from_cache: bool = False
    calibrated: int = 0
    too_small: list[str] = field(default_factory=list)
    expert_stacks: int = 0  # MoE: 3-D expert parameters, each expert split on its own
    stacks_decomposed: int = 0
    experts: int = 0
    routers: list[str] = field(default_factory=list)
    unadaptable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        if self.from_cache:
            what = f"{self.layers} 4-bit layers (loaded from cache)"
        elif self.layers:
            what = (f"{self.layers} 4-bit layers ({self.decomposed} decomposed, {self.layers - self.decomposed} quantized "
                    "as-is" + (f", {self.calibrated} calibrated" if self.calibrated else "") + ")")
        else:
            what = f"{self.decomposed} layers decomposed, kept in full precision"
        if self.expert_stacks:
            what += (f"; MoE: {self.experts} expert matrices in {self.expert_stacks} stacks"
                     + (" stored in 4 bits" if self.layers else "")
                     + f", {self.stacks_decomposed} stacks decomposed expert by expert")
        if self.routers:
            what += f"; {len(self.routers)} routers kept in full precision, unadapted, e.g. {self.routers[0]}"
        if self.unadaptable:
            what += (f"; {len(self.unadaptable)} layers quantized without adapter because PEFT does not adapt them on "
                     f"this model type, e.g. {self.unadaptable[0]}")
        if self.too_small:
            what += (f"; {len(self.too_small)} layers too small for the rank quantized without adapter, e.g. "
                     f"{self.too_small[0]}")
        return (f"qmilora: {what} in {self.seconds:.1f}s (SVD {self.svd_seconds:.1f}s); "
                f"mean NF4 rel. error {mean(self.nf4_rel_error):.4f}; mean minor energy {mean(self.minor_energy):.2e}; "
                f"peak RSS {self.peak_rss_gb:.2f} GB" + (f", peak GPU {self.peak_gpu_gb:.2f} GB" if self.peak_gpu_gb else ""))


def prepare_model(model: str | os.PathLike | PreTrainedModel, config: QMiLoRAConfig | None = None,
                  **overrides) -> PeftModel:
    """A `peft.PeftModel` whose target layers are NF4 `Linear4bit`s holding W − s·B A, wrapped by PEFT's bitsandbytes
    LoRA layer with A, B set to the minor factors. `model` is a checkpoint directory, a Hub id, "demo" (the bundled
    SmolLM2-135M-Instruct), or a loaded full-precision transformers model; `overrides` replace fields of `config`."""
    cfg = QMiLoRAConfig(**{**(config.to_dict() if config else {}), **overrides})
    previous_threads = torch.get_num_threads()
    cpu.apply(cpu.resolve(cfg.threads))
    try:
        return _prepare(model, cfg)
    finally:
        torch.set_num_threads(previous_threads)  # the caller's setting again (qmilora-train sets its own)


def _prepare(model, cfg: QMiLoRAConfig) -> PeftModel:
    t0 = time.perf_counter()
    if cfg.resolved_device.type == "cpu" and cpu.slow_half_precision(cfg.torch_compute_dtype):
        log.warning("qmilora: this CPU has no %s matrix instructions; torch runs such matmuls far slower than float32 "
                    "(tens of times, measured): consider compute_dtype float32 here", cfg.compute_dtype)
    if model == DEMO:
        from .demo import demo_model_dir

        model = demo_model_dir(cfg.cache_dir)
    if isinstance(model, PreTrainedModel):
        refuse_quantized_model(model)
        skel = skeleton(model.config, cfg)
        hessians = _calibrate(lambda: model, getattr(model, "name_or_path", ""), cfg)
        # transformers loads from the model's own state dict (views, no copy) exactly as from a checkpoint
        base, factors, stats = _load(dict(model_class=type(model), pretrained_model_name_or_path=None,
                                          config=model.config, state_dict=model.state_dict()), skel, cfg, hessians)
        peft_model = _wrap(base, cfg, factors=factors, excluded=skel.peft_excluded)
        peft_model.qmilora_source_identity = None  # an in-memory model has no checkpoint to identify
    elif isinstance(model, torch.nn.Module):
        raise QMiLoRAError(f"prepare_model takes a transformers PreTrainedModel or a checkpoint path, got {type(model).__name__}")
    else:
        peft_model, stats = _prepare_checkpoint(str(model), cfg)
    check_layers_run(peft_model)
    # a model built from a config has an empty name_or_path: never its module repr as the base's name
    name_residual_base(peft_model, model if isinstance(model, str) else (getattr(model, "name_or_path", "")
                                                                         or "an in-memory model"))
    stats.seconds = time.perf_counter() - t0
    _record_peaks(stats, cfg.resolved_device)
    peft_model.qmilora_stats = stats
    tqdm.write(stats.summary(), file=sys.stderr)  # beside the progress bar, logging configured or not
    return peft_model


RESIDUAL_BASE = "qmilora residual base NF4(W - s*B0*A0) of {source}, built only by qmilora.train.load_trained"
# PEFT checks a Hub it cannot reach for that name on each save and warns that it found none: expected, not news
warnings.filterwarnings("ignore", message="Could not find a config file in qmilora residual base")


def name_residual_base(model: PeftModel, source: str) -> None:
    """Name the prepared residual, not `source`, as the adapter's base: PEFT writes this name into every adapter
    saved from the model (a run's checkpoints and adapters, a user's save_pretrained), and (B, A) on the original
    `source` give another, much worse model. No folder or Hub id has this name, so AutoPeftModel refuses it,
    showing it."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = RESIDUAL_BASE.format(source=source)


def check_layers_run(model: PeftModel) -> None:
    """One token through the prepared model: every 4-bit or adapted layer must run its own forward whenever the
    module around it runs, and keep its weight as it is. A model that reads such a layer's weight directly (Mamba's
    `dt_proj.weight @ x`) would multiply with packed 4-bit codes or bypass the adapter; one that rescales weights in
    place (RWKV in eval mode) would leave the adapter behind: refused naming the layer."""
    base = model.get_base_model()
    watched = {n: m for n, m in base.named_modules() if quantize.is_4bit_linear(m)}
    watched.update({n.removesuffix(".base_layer"): m for n, m in interop.lora_layers(model).items()})
    parents = {n.rpartition(".")[0] for n in watched}
    ran: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: ran.add(name))
             for n, m in {**{p: base.get_submodule(p) for p in parents}, **watched}.items()]
    weight = lambda m: (m.get_base_layer() if hasattr(m, "get_base_layer") else m).weight  # noqa: E731
    versions = {n: weight(m)._version for n, m in watched.items()}
    vocab = base.get_input_embeddings().num_embeddings
    token = next((t for t in (getattr(base.config, "bos_token_id", None), getattr(base.config, "eos_token_id", None))
                  if isinstance(t, int) and t < vocab), 0)
    device = base.get_input_embeddings().weight.device
    failure = None
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[token]], device=device))
    except Exception as err:  # a crash in a layer that read packed codes: name that layer below if one was bypassed
        failure = err
    finally:
        for h in hooks:
            h.remove()
    # a layer that did not run while its module did, beside watched layers of that module that did run (a layer
    # unused on text input, e.g. a vision projection, has no such sibling)
    bypassed = sorted(n for n in watched if n not in ran and n.rpartition(".")[0] in ran
                      and any(o in ran and o.rpartition(".")[0] == n.rpartition(".")[0] for o in watched))
    if bypassed:
        owner = type(base.get_submodule(bypassed[0].rpartition(".")[0])).__name__
        raise QMiLoRAError(f"{owner} reads the weight of {bypassed[0]} directly instead of calling the layer: QMiLoRA "
                           "cannot quantize or adapt it (transformers' own 4-bit loading fails on it as well)")
    if failure is not None:
        raise QMiLoRAError(f"the prepared {type(base).__name__} fails on its first token ({type(failure).__name__}: "
                           f"{str(failure).strip().splitlines()[0] if str(failure).strip() else ''})") from failure
    changed = sorted(n for n, m in watched.items() if weight(m)._version != versions[n])
    if changed:
        raise QMiLoRAError(f"{type(base).__name__} changes the weight of {changed[0]} in place during its forward (e.g. "
                           "rescaling it): QMiLoRA cannot quantize or adapt such a layer, whose adapter would not follow")


def refuse_quantized_model(model: torch.nn.Module) -> None:
    if getattr(model, "is_quantized", False) or getattr(getattr(model, "config", None), "quantization_config", None):
        checkpoint.refuse_quantized_config(model.config)
        raise QMiLoRAError("the model is already quantized: QMiLoRA needs full-precision weights")
    for name, module in model.named_modules():
        if quantize.is_quantized_module(module):
            raise QMiLoRAError(f"layer {name} is already quantized ({type(module).__name__}): QMiLoRA needs full-precision "
                               "weights, because the minor singular components of a quantized weight are mostly quantization noise")


def _prepare_checkpoint(source: str, cfg: QMiLoRAConfig) -> tuple[PeftModel, PrepareStats]:
    directory = checkpoint.resolve(source)
    parsed = checkpoint.config_bytes(directory)  # the identity covers these bytes; it refuses if they change
    hf_config = AutoConfig.from_pretrained(directory)
    checkpoint.refuse_quantized_config(hf_config)
    files = checkpoint.shard_files(directory)
    checkpoint.refuse_quantized_tensors(checkpoint.tensor_dtypes(files))
    skel = skeleton(hf_config, cfg)  # targets and rank checked before anything slow

    root = cfg.resolved_cache_dir
    source = checkpoint.SourceIdentity(directory, files, cache.memo(root), parsed)
    entry_for = lambda identity: cache.Entry(root, cache.key(identity, recipe_of(cfg)))  # noqa: E731
    if cfg.prepared_cache:
        # A full hash is waited for only when an entry from a checkpoint with the same headers exists; otherwise no
        # hit is possible, and the hash runs in the background while the same files are streamed below.
        identity = source.known or (source.value() if cache.may_hold(root, source.weak()) else None)
        entry = entry_for(identity) if identity else None
        if entry is not None and entry.exists():
            problem = entry.problem()
            if problem is None:
                log.info("qmilora: loading the prepared model from %s", entry.path)
                model = load_prepared(entry, cfg)
                model.qmilora_source_identity = identity
                return model, PrepareStats(**{**entry.meta().get("stats", {}), "from_cache": True, "svd_seconds": 0.0})
            log.warning("qmilora: the cached preparation %s is damaged (%s); preparing again", entry.path, problem)
            entry.remove()
    source.start()

    # calibration is the one step that needs the whole full-precision model, once, before streaming
    hessians = _calibrate(lambda: AutoModelForCausalLM.from_pretrained(
        directory, dtype=cfg.torch_compute_dtype, device_map={"": cfg.resolved_device}), directory, cfg)
    checkpoint.release_host_memory()
    base, factors, stats = _load(dict(model_class=AutoModelForCausalLM, pretrained_model_name_or_path=directory,
                                      config=hf_config), skel, cfg, hessians)
    identity = source.value()
    if not cfg.prepared_cache or skel.stacks:
        if skel.stacks and cfg.prepared_cache:
            log.info("qmilora: MoE preparations are not cached yet (4-bit expert stacks have no file format here)")
        model = _wrap(base, cfg, factors=factors, excluded=skel.peft_excluded)
    else:
        def save(base_dir: str, adapter_dir: str) -> None:
            nonlocal model
            interop.save_on_this_process(base, base_dir)  # before PEFT wraps (and so changes) its modules
            if not os.path.isfile(os.path.join(base_dir, "config.json")):  # never an entry without its base
                raise QMiLoRAError(f"the prepared base model was not written to {base_dir}")
            model = _wrap(base, cfg, factors=factors, excluded=skel.peft_excluded)
            model.save_pretrained(adapter_dir)

        model = None
        meta = {"source": os.path.abspath(directory), "source_identity": identity, "source_weak": source.weak(),
                "config": cfg.to_dict(), "stats": {k: v for k, v in asdict(stats).items() if k != "from_cache"}}
        expected = _bytes_of(base) + sum(a.nbytes + b.nbytes for a, b in factors.values())
        entry_for(identity).write(save, meta, expected_bytes=expected)
    model.qmilora_source_identity = identity
    return model, stats


def recipe_of(cfg: QMiLoRAConfig) -> dict:
    """Everything that changes the prepared tensors besides the source: the cache key's and a run's recipe."""
    return {**cfg.result_fields(), "calibration": calibrate.identity(cfg)}


def _bytes_of(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in model.state_dict().values())


def load_prepared(entry: cache.Entry, cfg: QMiLoRAConfig) -> PeftModel:
    """Reload a cached prepared model (transformers' 4-bit format + PEFT adapter): no SVD, no quantization."""
    base = AutoModelForCausalLM.from_pretrained(entry.base, device_map={"": cfg.resolved_device},
                                                dtype=cfg.torch_compute_dtype)
    if cfg.quantize:
        interop.finish_loaded(base, None)
    return _wrap(base, cfg, adapter_dir=entry.adapter)


def _calibrate(load_model, tokenizer_source: str, cfg: QMiLoRAConfig) -> dict[str, torch.Tensor] | None:
    """Input Hessians of every linear layer but the head of `load_model()`, on the calibration text (None without
    calibration). The text is read first, so a bad file stops before any model loads."""
    if cfg.calibration_data is None:
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError) as e:
        raise QMiLoRAError(f"calibration needs the model's tokenizer, which {tokenizer_source!r} does not provide: {e}") from None
    batches = calibrate.windows(cfg, tokenizer)
    model = load_model()
    names = set(linear_layers(model))
    t = time.perf_counter()
    found = calibrate.hessians(model, names, batches)
    log.info("qmilora: calibration Hessians of %d layers in %.1fs", len(found), time.perf_counter() - t)
    return found


@dataclass
class Skeleton:
    """What a preparation will do, resolved on the meta device before any weight is read: the linear layers that go
    through QMiLoRA (4-bit layers, or all linear ones unquantized), which of them get a minor adapter (rank checked
    against each), and the layers "all-linear" leaves out because they are too small for the rank."""
    job: interop.LoadJob
    targets: set[str]
    excluded: list[str]
    stacks: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # MoE expert stacks: (experts, out, in)
    routers: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # linear layers left as they are (routers)
    unadaptable: list[str] = field(default_factory=list)  # layers PEFT would not adapt (interop.peft_unadaptable)

    @property
    def peft_excluded(self) -> list[str]:
        """Linear layers that must get no LoRA layer from PEFT's "all-linear"."""
        return self.excluded + self.kept + self.unadaptable


def skeleton(hf_config, cfg: QMiLoRAConfig) -> Skeleton:
    dtype = cfg.torch_compute_dtype
    job = interop.LoadJob(quantize=cfg.quantize, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                          dtype=dtype, storage=cfg.torch_quant_storage)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    stacks = experts.expert_params(model)  # refuses 3-D weights transformers cannot route
    job.keep = experts.router_layers(model)
    if cfg.quantize:
        # the surgery from_pretrained will do (transformers' own, plus linear subclasses)
        interop.install_4bit_layers(model, job, cfg.resolved_device)
        layers = {n for n, m in model.named_modules() if quantize.is_4bit_linear(m)}
    else:
        layers = set(linear_layers(model)) - job.keep
    job.layers, job.experts = layers, set(stacks)
    targets, excluded = resolve_targets(model, layers, cfg.target_modules, cfg.rank, stacks)
    why = interop.peft_unadaptable(model, sorted(targets - set(stacks)))
    unadaptable = sorted(why)
    if unadaptable and cfg.target_modules != ["all-linear"]:
        raise QMiLoRAError(f"{unadaptable[0]} cannot carry an adapter: {why[unadaptable[0]]}; leave it out of "
                           "--target_modules")
    if cfg.quantize:
        uneven = next((n for n, (_, out_f, in_f) in stacks.items() if (out_f * in_f) % cfg.blocksize), None)
        if uneven:
            raise QMiLoRAError(f"each expert of {uneven} holds {stacks[uneven][1]}x{stacks[uneven][2]} weights, not a "
                               f"whole number of --blocksize {cfg.blocksize} blocks; choose a smaller blocksize")
    kept = sorted({n for n, m in model.named_modules() if interop.opaque_linear(m)} | job.keep)
    return Skeleton(job, targets - set(unadaptable), excluded, stacks, routers(model, layers), kept, unadaptable)


def routers(model: torch.nn.Module, layers: set[str]) -> list[str]:
    """Weights a MoE keeps beside its experts that are neither linear layers nor embeddings (its routers): they stay
    in the compute dtype, unadapted."""
    if not experts.experts_modules(model):
        return []
    skip = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    skip |= {id(model.get_submodule(n).weight) for n in layers}
    skip |= {id(p) for m in experts.experts_modules(model).values() for p in m.parameters()}
    return sorted(n for n, p in model.named_parameters() if p.dim() == 2 and id(p) not in skip)


def resolve_targets(model: torch.nn.Module, layers: set[str], target_modules: list[str], rank: int,
                    stacks: dict[str, tuple[int, int, int]] | None = None) -> tuple[set[str], list[str]]:
    """(layers and expert stacks that get a minor adapter, those "all-linear" leaves out as too small for `rank`).
    Under all-linear (which covers MoE expert stacks too) a weight with min(out, in) <= rank is quantized as QLoRA
    would and named in the summary; named explicitly, it is an error. Both are decided here, before any weight is
    read."""
    stacks = stacks or {}
    shape = lambda n: stacks[n][1:] if n in stacks else interop.out_in(model.get_submodule(n))  # noqa: E731
    if target_modules != ["all-linear"]:
        targets = select_targets(model, target_modules, layers, stacks)
        check_rank(targets, rank, shape)
        return targets, []
    candidates = set(layers) | set(stacks)
    excluded = sorted(n for n in candidates if min(shape(n)) <= rank)
    if len(excluded) == len(candidates):
        raise QMiLoRAError(f"rank {rank} is too large for every linear layer of this model; lower --rank")
    return candidates - set(excluded), excluded


def _load(load_kwargs: dict, skel: Skeleton, cfg: QMiLoRAConfig, hessians: dict[str, torch.Tensor] | None = None):
    """transformers' `from_pretrained` with each of `skel`'s layers' weights converted on its way in. Returns
    (base model, {layer: (A, B)} on the host, stats). With `hessians`, the 4-bit codes of those layers are chosen
    by `calibrate.gptq_codes` instead of rounding to nearest."""
    device, svd_device, dtype = cfg.resolved_device, cfg.resolved_svd_device, cfg.torch_compute_dtype
    threads = torch.get_num_threads()  # prepare_model set it from cfg.threads
    if cfg.svd_device == "auto" and skel.targets:
        svd_device, why = cpu.solver_device(device, threads, cfg.svd_solver, cfg.rank)
        log.info("qmilora: SVDs on %s: %s", svd_device, why)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    stats = PrepareStats(too_small=list(skel.excluded), routers=list(skel.routers),
                         unadaptable=list(skel.unadaptable))
    kwargs = dict(quant_type=cfg.quant_type, blocksize=cfg.blocksize, double_quant=cfg.double_quant, out_dtype=dtype,
                  storage=cfg.torch_quant_storage)

    def split(weight: torch.Tensor) -> decompose.MinorSplit:
        t = time.perf_counter()
        result = decompose.minor_split(weight, cfg.rank, cfg.scaling, solver=cfg.svd_solver, threads=threads)
        stats.svd_seconds += time.perf_counter() - t
        stats.minor_energy.append(decompose.minor_energy(result, cfg.scaling, weight.square().sum().item()))
        return result

    def convert_stack(name: str, stack: torch.Tensor) -> torch.Tensor:
        """A MoE expert stack (experts, out, in): each expert split on its own, the residuals stored as one stack."""
        stack = _checked(name, stack).to(svd_device, torch.float32)
        if name in skel.targets:
            splits = [split(w) for w in stack]
            A = torch.stack([s.lora_A for s in splits]).cpu()
            B = torch.stack([s.lora_B for s in splits]).cpu()
            factors[name] = experts.to_peft_layout(A, B)
            stack = torch.stack([s.residual for s in splits])
            del splits
            stats.stacks_decomposed += 1
        stats.expert_stacks += 1
        stats.experts += stack.shape[0]
        stack = stack.to(device)
        if not cfg.quantize:
            return stack.to(dtype)
        param = quantize.quantize_experts(stack, **kwargs)
        err = (quantize.dequantize(param).float() - stack).norm() / stack.norm().clamp_min(1e-30)
        stats.nf4_rel_error.append(err.item())
        checkpoint.release_host_memory()
        return param

    def convert(layer: str, value: torch.Tensor) -> torch.Tensor:
        if value.dim() == 3:
            return convert_stack(layer, value)
        weight = _checked(layer, value).to(svd_device, torch.float32)
        if layer in skel.targets:
            minor = split(weight)
            factors[layer] = (minor.lora_A.cpu(), minor.lora_B.cpu())
            weight = minor.residual
            del minor
            stats.decomposed += 1
        weight = weight.to(device)
        if not cfg.quantize:
            return weight.to(dtype)
        if hessians is not None and layer in hessians:
            param = quantize.quantize_calibrated(weight, hessians.pop(layer).to(weight.device), **kwargs)
            stats.calibrated += 1
        else:
            param = quantize.quantize(weight, **kwargs)
        err = (quantize.dequantize(param).float() - weight).norm() / weight.norm().clamp_min(1e-30)
        stats.nf4_rel_error.append(err.item())
        stats.layers += 1
        checkpoint.release_host_memory()
        return param

    skel.job.convert = convert
    try:
        # float32 in: each weight reaches `convert` exactly as stored (bf16/fp16 upcast is exact)
        model, info = interop.from_pretrained(skel.job, **load_kwargs, dtype=torch.float32, device_map={"": device})
    except RuntimeError as err:
        if "size mismatch" in str(err) or "shape" in str(err):
            raise QMiLoRAError(f"the checkpoint's tensors and config.json do not belong together: "
                               f"{str(err).strip().splitlines()[0]}") from None
        raise
    if info["mismatched_keys"]:
        raise QMiLoRAError(f"checkpoint tensor {sorted(info['mismatched_keys'])[0]} has another shape than config.json "
                           "describes: the weights and the config do not belong together")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise QMiLoRAError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
    if info["unexpected_keys"]:
        unexpected = sorted(info["unexpected_keys"])
        log.warning("qmilora: ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[0])
    if info.get("error_msgs"):
        raise QMiLoRAError(f"loading the checkpoint failed: {info['error_msgs'][0]}")
    for name, param in model.named_parameters():
        if param.is_floating_point() and not quantize.is_4bit_param(param):
            if not torch.isfinite(param).all():
                raise QMiLoRAError(f"checkpoint tensor {name} holds NaN or Inf values: refusing to prepare (and "
                                   "train on) a broken model")
            param.data = param.data.to(dtype)  # what is not 4-bit lives in the compute dtype
    interop.finish_loaded(model, skel.job)
    experts.use_routed_forward(model)
    if set(factors) != skel.targets:
        raise QMiLoRAError(f"the checkpoint did not deliver the weights of {sorted(skel.targets - set(factors))[:1]}")
    model.eval()
    return model, factors, stats


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{name: layer} of every linear layer (nn.Linear or Conv1D) but the output head: what "all-linear" means
    (PEFT's rule too)."""
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if interop.linear_like(m) and m is not head}


def select_targets(model: torch.nn.Module, target_modules: list[str], linear: set[str],
                   stacks: dict | None = None) -> set[str]:
    """Names of the `linear` layers and expert `stacks` that get a minor adapter, with PEFT's matching rule (name or
    suffix); naming a MoE experts module selects all its stacks."""
    if target_modules == ["all-linear"]:
        return linear | set(stacks or {})
    matches = lambda n, t: n == t or n.endswith("." + t)  # noqa: E731
    chosen = set()
    for target in target_modules:
        hits = {n for n, _ in model.named_modules() if matches(n, target)}
        in_stacks = {s for s in stacks or {} if matches(s, target) or matches(s.rpartition(".")[0], target)}
        chosen |= in_stacks
        hits -= {s.rpartition(".")[0] for s in in_stacks}  # the experts modules themselves
        if in_stacks and not hits:
            continue
        if not hits:
            kinds = sorted({n.rpartition(".")[2] for n in linear})
            raise QMiLoRAError(f"target module {target!r} matches no layer; linear layers are named {', '.join(kinds)}")
        if not hits <= linear:
            raise QMiLoRAError(f"target module {target!r} matches {sorted(hits - linear)[0]}, which is not a linear layer QMiLoRA can decompose")
        chosen |= hits
    return chosen


def check_rank(targets: set[str], rank: int, shape) -> None:
    """Every target must have min(out, in) > rank (the minor band must leave a principal part); checked before
    any SVD, naming the first layer that is too small. `shape(name)` is a target's (out, in)."""
    for name in sorted(targets):
        out_features, in_features = shape(name)
        if rank >= min(out_features, in_features):
            raise QMiLoRAError(f"rank {rank} is too large for {name} ({out_features}x{in_features}): it must be below "
                               f"{min(out_features, in_features)}; lower --rank or leave that layer out of --target_modules")


def visit_target_weights(directory: str, cfg: QMiLoRAConfig, visit, on_start=None) -> None:
    """Call `visit(layer, W)` with every target weight (out, in, float32) of a checkpoint, as transformers' loader
    places it (renamed, converted, oriented), one at a time; the 4-bit model built alongside is dropped.
    `on_start(number of targets)` runs once everything is validated, before the first weight is read."""
    hf_config = AutoConfig.from_pretrained(directory)
    checkpoint.refuse_quantized_config(hf_config)
    checkpoint.refuse_quantized_tensors(checkpoint.tensor_dtypes(checkpoint.shard_files(directory)))
    skel = skeleton(hf_config, cfg)

    def convert(layer: str, value: torch.Tensor) -> torch.Tensor:
        weight = _checked(layer, value).float()
        if layer in skel.targets:
            for name, w in ([(f"{layer}.{e}", w) for e, w in enumerate(weight)] if weight.dim() == 3
                            else [(layer, weight)]):  # a MoE stack: one matrix per expert
                visit(name, w)
        if not cfg.quantize:
            return weight
        fn = quantize.quantize_experts if weight.dim() == 3 else quantize.quantize
        return fn(weight, quant_type=cfg.quant_type, blocksize=cfg.blocksize, double_quant=cfg.double_quant,
                  out_dtype=torch.float32)

    skel.job.convert = convert
    if on_start is not None:
        on_start(sum(skel.stacks[n][0] if n in skel.stacks else 1 for n in skel.targets))  # matrices to visit
    interop.from_pretrained(skel.job, AutoModelForCausalLM, pretrained_model_name_or_path=directory,
                            dtype=torch.float32, device_map={"": "cpu"})


def _checked(key: str, value: torch.Tensor) -> torch.Tensor:
    """`value` refused unless it is finite floating point; `key` is a layer (whose tensor is key.weight) or, for a
    MoE expert stack, the parameter's own name."""
    name = key if value.dim() == 3 else f"{key}.weight"
    weight = _check_float(name, value)
    if not torch.isfinite(weight).all():
        raise QMiLoRAError(f"checkpoint tensor {name} holds NaN or Inf values: refusing to prepare (and "
                           "train on) a broken model")
    return weight


def _check_float(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise QMiLoRAError(f"tensor {name} is {tensor.dtype}, not floating point: the checkpoint looks quantized, and "
                           "QMiLoRA needs full-precision weights")
    return tensor


def _wrap(base: PreTrainedModel, cfg: QMiLoRAConfig, *, factors=None, excluded: list[str] | None = None,
          adapter_dir: str | None = None) -> PeftModel:
    """PEFT's bitsandbytes LoRA layers on the 4-bit base: fresh with the minor factors, or loaded from `adapter_dir`."""
    quantize.keep_training_layout(base)
    # Not PEFT's prepare_model_for_kbit_training: it upcasts every frozen non-4-bit tensor (embeddings, head, norms)
    # to float32, twice their memory in bf16. They stay in the compute dtype; only the adapters are float32.
    for param in base.parameters():
        param.requires_grad_(False)
    if base.supports_gradient_checkpointing:  # not every architecture does (e.g. CTRL); training then goes without
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    stacks = experts.expert_params(base)
    classes = {type(m): experts.ExpertsLora for m in experts.experts_modules(base).values()}
    dropout = cfg.lora_dropout
    if adapter_dir is None:
        stack_targets = sorted(set(factors) & set(stacks))
        if stack_targets and dropout:
            log.warning("qmilora: lora_dropout %s → 0: PEFT's LoRA on MoE expert parameters has no dropout (and "
                        "plain PEFT loads such an adapter only with lora_dropout 0)", dropout)
            dropout = 0.0
        # A MoE gets the resolved layer names: PEFT resolves "all-linear" on some MoE families to their routers too
        # (its transformers-v4 compatibility), and routers stay unadapted.
        linear_targets = sorted(set(factors) - set(stacks)) if stacks else cfg.peft_target_modules
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=dropout, bias="none",
                          target_modules=linear_targets,
                          exclude_modules=None if stacks else excluded or None,
                          target_parameters=stack_targets or None, task_type="CAUSAL_LM", init_lora_weights=False)
        if stack_targets:
            lora._register_custom_module(classes)
        model = get_peft_model(base, lora)
    else:
        lora = LoraConfig.from_pretrained(adapter_dir)
        lora.lora_dropout = 0.0 if lora.target_parameters else dropout
        if lora.target_parameters:
            lora._register_custom_module(classes)
        model = PeftModel.from_pretrained(base, adapter_dir, config=lora, is_trainable=True)
    stack_layers = experts.lora_layers(model)
    layers = {**interop.lora_layers(model), **stack_layers}
    expected = set(factors) if factors is not None else set(layers)
    not_4bit = [n for n, m in layers.items() if cfg.quantize and n not in stack_layers and (
        not quantize.is_4bit_linear(m.get_base_layer()) or not interop.is_bnb_lora(m))]
    not_4bit += [n for n, m in stack_layers.items() if not isinstance(m, experts.ExpertsLora)]
    if stacks and set(layers) != expected:
        raise QMiLoRAError(f"PEFT placed adapters on {sorted(set(layers) ^ expected)[0]} unlike the decomposition: PEFT "
                           f"rewrites LoRA targets of {base.config.model_type} models named like its transformers-v4 "
                           "expert layers; name the targets with --target_modules (e.g. attention and experts)")
    if set(layers) != expected or not_4bit:
        raise RuntimeError(f"PEFT wrapped {sorted(set(layers) ^ expected) or not_4bit} "
                           "unlike the decomposition; this is a bug in qmilora")
    if factors is not None:
        with torch.no_grad():
            for name, (A, B) in factors.items():
                layer = layers[name]
                layer.lora_A["default"].weight.copy_(A)
                layer.lora_B["default"].weight.copy_(B)
    model.eval()
    return model


def _record_peaks(stats: PrepareStats, device: torch.device) -> None:
    stats.peak_rss_gb = checkpoint.peak_rss_gb()
    if device.type == "cuda":
        stats.peak_gpu_gb = torch.cuda.max_memory_allocated(device) / 2**30
