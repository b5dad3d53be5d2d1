"""Memory plan for preparing and training a model, from its config alone (no weights are read).

The model is built on the meta device, so every architecture transformers knows is counted from its real
modules: linear weights and MoE expert stacks (4-bit), the rest (frozen, in the compute dtype), adapters r·(in+out)
per target (per expert for a stack).

    bytes per 4-bit weight:  1/2 (codes) + absmax: 4/blocksize, or with double quantization
                             1/blocksize (8-bit absmax) + 4/(256·blocksize) (their fp32 scales, blocks of 256)
    training:  weights + adapters·(4 param + 4 grad + optimizer state) + activations + logits
               (+ adapters·4 on each of several data-parallel GPUs: DDP's gradient buckets)
    FSDP over n GPUs: weights, adapters, gradients and optimizer state / n, plus two gathered decoder layers;
               the prepared model sits in host memory first (prepare: only the solver's workspace on the GPU)
    activations (per micro-batch token): checkpointed layer inputs L·h·2 bytes (in host memory with
               offload), plus one layer recomputed: ≈ 10·h + 9·m bytes per token (m: the MLP's width, top-k ×
               an expert's for MoE; + 5·heads·T without fused attention). At Llama-2-7B's shape this is the
               34·h measured on an H200; the MLP part (gate, up, their product and the fused LoRA masks, 9·m) is
               modelled from what autograd keeps. With --tiled_mlp only one tile's MLP part is alive (tiles of h
               tokens per sequence), plus its input kept per token (2·h)
    packing:   a packed micro-batch (several examples in one row, SDPA or eager attention) carries a T×T mask for
               the whole step, T = batch · max_seq_length: T² bytes (booleans; eager: the compute dtype's size);
               FlashAttention's varlen path needs none (not modelled: the plan assumes qmilora-train's SDPA). By
               default qmilora-train packs only up to data.PACKED_MASK_TOKENS per row
    logits:    float32, ×3 (logits, log-softmax, their gradient): T·vocab·4 bytes each with the model's loss,
               one chunk (loss.CHUNK_BYTES) with the chunked loss; with checkpointing only the larger of the logits
               and the recomputed layer counts (one is alive at the end of forward, the other in backward)
    MoE:       the routed experts' dequantized weights of one layer, kept for its backward: min(experts, T·top-k)
               experts × one expert's parameters (all its stacks) × compute-dtype bytes

QLoRA's column is the same model as PEFT + transformers train it: the frozen rest upcast to float32 by
prepare_model_for_kbit_training, the model's loss, adapters on the same targets.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from . import interop, loss as lm_loss
from .config import QMiLoRAConfig, QMiLoRAError
from .data import PACKED_MASK_TOKENS

GB = 2**30
MAX_LAYERS = 1024  # the meta model of 1024 Llama layers builds in about 1.5 s
_OPTIMIZER_BYTES = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "adamw_bnb_8bit": 2, "adamw_torch": 8,
                    "adamw_torch_fused": 8, "paged_adamw_32bit": 8, "sgd": 0}


@dataclass
class PlanConfig:
    model: str = field(metadata={"help": "A checkpoint directory, a config.json file, a Hub id, or a family qmilora ships the config.json of (llama-2-7b, llama-2-13b, llama-3-8b, mistral-7b, qwen2.5-7b, qwen3-30b-a3b, gpt-oss-20b, or their Hub ids): only config.json is read.", "aliases": ["--model_name_or_path"]})
    max_seq_length: int = field(default=2048, metadata={"help": "Tokens per sequence.", "aliases": ["--max_length"]})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Micro-batch size."})
    activation_checkpointing: bool = field(default=True, metadata={"help": "Activation checkpointing per layer, as qmilora-train --activation_checkpointing.", "aliases": ["--gradient_checkpointing"]})
    optim: str = field(default="paged_adamw_8bit", metadata={"help": "Optimizer, as in TrainingArguments."})
    fused_attention: bool = field(default=True, metadata={"help": "SDPA/flash attention (no T×T score matrices kept)."})
    gpu_memory: str = field(default="24GB", metadata={"help": "Card size to check the plan against, e.g. 24GB."})
    chunked_loss: bool = field(default=True, metadata={"help": "The chunked loss (qmilora-train's default): one chunk of float32 logits instead of all."})
    offload_activations: bool = field(default=False, metadata={"help": "Activation checkpoints in host memory (qmilora-train --offload_activations)."})
    tiled_mlp: bool = field(default=False, metadata={"help": "Each layer's MLP over the sequence in tiles (qmilora-train --tiled_mlp)."})
    packing: bool | None = field(default=None, metadata={"help": "As qmilora-train --packing (default: automatic, packed rows up to 16,384 tokens). A packed micro-batch of several examples carries a (batch·max_seq_length)² mask under SDPA."})
    num_gpus: int = field(default=1, metadata={"help": "Data-parallel processes (torchrun / accelerate launch): each GPU holds the whole 4-bit model plus DDP's gradient buckets."})
    fsdp: bool = field(default=False, metadata={"help": "Sharded over the num_gpus processes (qmilora-train --fsdp): each GPU holds 1/num_gpus of the weights, adapters and optimizer state plus two gathered decoder layers; the model is prepared in host memory."})

    def __post_init__(self) -> None:
        for name in ("max_seq_length", "per_device_train_batch_size", "num_gpus"):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        parse_size(self.gpu_memory)


def bytes_per_4bit_weight(blocksize: int, double_quant: bool) -> float:
    absmax = 1 / blocksize + 4 / (256 * blocksize) if double_quant else 4 / blocksize
    return 0.5 + absmax


def count(hf_config, target_modules: list[str], rank: int) -> dict:
    """Parameter counts of the model built on meta: 4-bit linear weights, expert stacks, other params, adapter
    (in+out) sums, MoE shape. Memoized per (config, targets, rank): building a large MoE on meta takes seconds."""
    return dict(_count(hf_config.to_json_string(), type(hf_config), tuple(target_modules), rank))


@functools.lru_cache(maxsize=16)
def _count(config_json: str, config_class: type, target_modules: tuple[str, ...], rank: int) -> dict:
    import json

    hf_config = config_class.from_dict(json.loads(config_json))
    target_modules = list(target_modules)
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from . import experts
    from .prepare import linear_layers, resolve_targets

    _check_buildable(hf_config)
    # include_buffers: every tensor is created on meta. Without it accelerate moves each parameter to meta only
    # once the module has allocated it in host memory: a config with hidden_size 10**7 asked for gigabytes.
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(hf_config)
    stacks = experts.expert_params(model)  # refuses what preparation refuses
    layers = linear_layers(model)
    targets, _ = resolve_targets(model, set(layers), target_modules, rank, stacks)
    linear, adapter, largest = 0, 0, (0, 0)
    quantized_ids = set()
    for name, module in layers.items():
        linear += module.weight.numel()
        quantized_ids.add(id(module.weight))
        out_f, in_f = interop.out_in(module)
        largest = max(largest, (out_f, in_f), key=lambda s: s[0] * s[1])
        if name in targets:
            adapter += in_f + out_f
    expert_numel, per_expert, num_experts = 0, {}, 0
    for name, (e, out_f, in_f) in stacks.items():
        expert_numel += e * out_f * in_f
        owner = name.rpartition(".")[0]
        per_expert[owner] = per_expert.get(owner, 0) + out_f * in_f
        num_experts = max(num_experts, e)
        if name in targets:
            adapter += e * (in_f + out_f)
        largest = max(largest, (out_f, in_f), key=lambda s: s[0] * s[1])
    stack_ids = {id(p) for m in experts.experts_modules(model).values() for p in m.parameters(recurse=False)
                 if experts.is_stack(p)}
    other = sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids | stack_ids)
    cfg = model.config
    top_k = next((getattr(c, a) for c in (cfg, getattr(cfg, "text_config", None)) if c is not None
                  for a in ("num_experts_per_tok", "moe_topk", "top_k") if isinstance(getattr(c, a, None), int)),
                 num_experts)
    expert_layers = len(per_expert)
    one_expert = max(per_expert.values(), default=0)
    total = linear + expert_numel + other
    active = total - expert_numel + expert_layers * min(top_k, num_experts) * one_expert if stacks else total
    text = cfg.get_text_config()
    width = getattr(text, "moe_intermediate_size", None) if stacks else None
    width = top_k * width if isinstance(width, int) else getattr(text, "intermediate_size", None)
    return {"linear": linear, "experts": expert_numel, "other": other, "adapter_in_out": adapter,
            "mlp_width": width if isinstance(width, int) and width > 0 else 0,
            "largest_linear": largest, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads, "vocab": cfg.vocab_size, "num_experts": num_experts, "top_k": top_k,
            "expert_params": one_expert, "total_params": total, "active_params": active}


def _check_buildable(hf_config) -> None:
    """Refuse, before building, a depth whose module objects alone would take minutes and gigabytes of host memory
    (a meta tensor holds no data, but every layer is still a few Python modules): far beyond any released model."""
    configs = [hf_config, *(c for c in (hf_config.get_text_config(),) if c is not hf_config)]
    for c in configs:
        depth = getattr(c, "num_hidden_layers", None)
        if isinstance(depth, int) and depth > MAX_LAYERS:
            raise QMiLoRAError(f"num_hidden_layers {depth}: qmilora-plan builds the model's layers (on the meta "
                               f"device, no weights) and stops at {MAX_LAYERS}; no released model has more than "
                               "a few hundred")


def plan(cfg: PlanConfig, qcfg: QMiLoRAConfig, hf_config) -> dict:
    """The memory plan of training `hf_config`'s model as `qcfg` decomposes it, with `cfg`'s training settings;
    `qlora_*` keys: QLoRA (PEFT's k-bit preparation, the model's loss) on the same settings."""
    c = count(hf_config, qcfg.target_modules, qcfg.rank)
    four_bit = (c["linear"] + c["experts"]) * bytes_per_4bit_weight(qcfg.blocksize, qcfg.double_quant)
    weights = four_bit + c["other"] * qcfg.torch_compute_dtype.itemsize
    adapter_params = qcfg.rank * c["adapter_in_out"]
    optimizer_bytes = _OPTIMIZER_BYTES.get(cfg.optim, 8)
    adapters = adapter_params * 4
    grads_and_optimizer = adapter_params * (4 + optimizer_bytes + (4 if cfg.num_gpus > 1 and not cfg.fsdp else 0))
    tokens = cfg.max_seq_length * cfg.per_device_train_batch_size
    h, m = c["hidden"], c["mlp_width"] or 24 * c["hidden"] // 9  # no width in the config: the calibrated 34·h
    attention = 0 if cfg.fused_attention else 5 * c["heads"] * cfg.max_seq_length
    untiled = tokens * (10 * h + 9 * m + attention)
    per_layer = untiled
    if cfg.tiled_mlp and not c["num_experts"]:  # expert blocks stay whole (`tiled`)
        tile = min(cfg.max_seq_length, h) * cfg.per_device_train_batch_size
        per_layer = tokens * (10 * h + 2 * h + attention) + tile * 9 * m
    checkpoints = c["layers"] * tokens * c["hidden"] * 2 if cfg.activation_checkpointing else 0
    packs = cfg.packing if cfg.packing is not None else tokens <= PACKED_MASK_TOKENS
    # one example per row needs no mask: its position ids are one causal sequence
    mask = tokens * tokens * (1 if cfg.fused_attention else qcfg.torch_compute_dtype.itemsize) \
        if packs and cfg.per_device_train_batch_size > 1 else 0
    kept = lambda layer: layer if cfg.activation_checkpointing else c["layers"] * layer  # noqa: E731 (one recomputed)
    layers_kept = kept(per_layer)
    routed = min(c["num_experts"], tokens * c["top_k"]) * c["expert_params"] * qcfg.torch_compute_dtype.itemsize
    full_logits = 3 * tokens * c["vocab"] * 4
    logits = 3 * min(tokens * c["vocab"] * 4, max(lm_loss.CHUNK_BYTES, c["vocab"] * 4)) if cfg.chunked_loss else full_logits
    # With checkpointing the logits (end of forward) and the recomputed layer (backward) are never alive together:
    # the larger of the two counts. Measured on an H200, Llama-2-7B shape at 2048 tokens (issue 15): the sum
    # over-planned the model's loss by 13%, the larger of the two is within 10% for both losses.
    transient = max(layers_kept, logits) if cfg.activation_checkpointing else layers_kept + logits
    activations = transient + routed + mask + (0 if cfg.offload_activations else checkpoints)
    out_f, in_f = c["largest_linear"]
    k = min(out_f, in_f)
    # one weight on the device during preparation: fp32 copy, float64 copy, Gram matrix and eigensolver work
    svd_workspace = out_f * in_f * (4 + 8 + 4) + k * k * 8 * 3
    prepare_peak = weights + adapters + svd_workspace
    host_weights = 0.0
    if cfg.fsdp:
        # every process holds the whole prepared model in host memory until FSDP moves its shards to the GPU; a
        # GPU then holds its 1/n of everything but the activations, plus two gathered decoder layers (the one
        # running and the one prefetched)
        host_weights, n = weights + adapters, cfg.num_gpus
        weights = weights / n + 2 * weights / max(1, c["layers"])
        adapters, grads_and_optimizer = adapters / n, grads_and_optimizer / n
        prepare_peak = svd_workspace  # only the solver runs on the GPU
    train_peak = weights + adapters + grads_and_optimizer + activations
    # QLoRA's float32 embeddings keep the residual stream (the checkpointed layer inputs) in float32
    # (transformers' bitsandbytes path leaves MoE expert stacks unquantized: upcast to float32 with the rest)
    qlora_four_bit = c["linear"] * bytes_per_4bit_weight(qcfg.blocksize, qcfg.double_quant)
    qlora_kept = kept(untiled)  # QLoRA tiles nothing
    qlora_transient = max(qlora_kept, full_logits) if cfg.activation_checkpointing else qlora_kept + full_logits
    qlora_static = qlora_four_bit + (c["other"] + c["experts"]) * 4
    if cfg.fsdp:  # sharded the same way (adapters and grads_and_optimizer are per GPU already)
        qlora_static = qlora_static / cfg.num_gpus + 2 * qlora_static / max(1, c["layers"])
    qlora_train_peak = qlora_static + adapters + grads_and_optimizer + 2 * checkpoints + qlora_transient + mask
    return {"quantized_weights_gb": weights / GB, "adapter_params": adapter_params, "adapters_gb": adapters / GB,
            "grads_and_optimizer_gb": grads_and_optimizer / GB, "activations_gb": activations / GB,
            "offloaded_gb": (checkpoints if cfg.offload_activations else 0) / GB,
            "logits_gb": logits / GB, "packing_mask_gb": mask / GB,
            "checkpoints_gb": (0 if cfg.offload_activations else checkpoints) / GB,
            "transient_gb": transient / GB, "svd_workspace_gb": svd_workspace / GB, "prepare_peak_gb": prepare_peak / GB,
            "train_peak_gb": train_peak / GB, "qlora_train_peak_gb": qlora_train_peak / GB,
            "gpu_gb": parse_size(cfg.gpu_memory) / GB, "routed_experts_gb": routed / GB,
            "total_params": c["total_params"], "active_params": c["active_params"], "num_experts": c["num_experts"],
            "top_k": c["top_k"],
            "num_gpus": cfg.num_gpus, "global_batch_tokens": tokens * cfg.num_gpus, "fsdp": cfg.fsdp,
            "host_weights_gb": host_weights / GB,
            "fits": max(prepare_peak, train_peak) <= parse_size(cfg.gpu_memory)}


def parse_size(text: str) -> float:
    units = {"TB": 2**40, "GB": 2**30, "GIB": 2**30, "MB": 2**20, "MIB": 2**20}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)]) * factor
            except ValueError:
                break
            if 0 < value < float("inf"):
                return value
            break
    raise ValueError(f"memory size must look like 24GB or 800MB, got {text!r}")
