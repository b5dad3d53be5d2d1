r"""Take a trained QMiLoRA model away where QMiLoRA is not installed. Two different models can leave a run:

- the TRAINED model, NF4(W_res) + s·B A with W_res = W − s·B₀A₀: what training optimized and qmilora-eval measures.
  `to_merged` writes it as a plain checkpoint: every 4-bit weight dequantized (in float32) plus s·B A where adapted,
  cast once to the dtype asked for. Its logits equal `load_trained`'s to that dtype's rounding.
- the ORIGINAL-BASE model, W + s·(B A − B₀ A₀) = W + s·[B, −B₀]·[A; A₀]: the same update on the original 16-bit
  weights, without the NF4 rounding of the residual that training saw. It differs from the trained model by that
  rounding, which the adapter learned around; each export measures by how much (`fidelity`).
  - `to_original_lora`: a standard rank-2r LoRA for the original base: A' = [A; A₀] (2r × in), B' = [B, −B₀]
    (out × 2r), r and lora_alpha doubled so s is unchanged (PEFT's PiSSA→LoRA conversion,
    `LoraModel.subtract_mutated_init`, done here on state dicts: it needs no model in memory). For a MoE expert stack
    (PEFT's parameter LoRA: lora_A (r·E, in), lora_B (out, r·E), expert e in rows e·r…e·r+r−1 of A and columns
    e, E+e, … of B) the same holds per expert, so the concatenation runs per expert. What vLLM's LoRA serving
    (--max-lora-rank >= 2r) and adapter merging tools need.
  - `to_original_merged`: W + s·(B A − B₀ A₀) for every target weight, from the original full-precision weights,
    streamed shard by shard and saved as a standard safetensors checkpoint. A MoE goes through transformers'
    loader instead (its checkpoint stores experts apart, the adapter holds them fused) and is saved by transformers
    in its own layout; that route holds the model once in host memory.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import cards, checkpoint, fidelity, files, quantize
from .config import QMiLoRAError
from .runfolder import ADAPTER_CONFIG, ADAPTER_FILE, INITIAL, RunFolder

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

_TOKENIZER_FILES = checkpoint.TOKENIZER_FILES + ("generation_config.json",)


def _source(adapter_dir: str, model: str | None, cache_dir: str | None,
            correction_rank: int = 0) -> tuple[dict, str]:
    """A finished run's record and its original checkpoint, verified by content (`correction_rank` checked first)."""
    from .inference import read_run
    from .train import config_of_run, verified_source

    meta = read_run(adapter_dir)
    _check_correction_rank(correction_rank, adapter_dir)
    directory = verified_source(meta, model, config_of_run(meta, cache_dir=cache_dir).resolved_cache_dir)
    return meta, directory


def _check_correction_rank(rank: int, adapter_dir: str) -> None:
    """A correction rank beyond the widest adapted layer's min(out, in) would only pad the LoRA with zeros (each
    layer's rounding error has no more directions): refused with the largest useful value, before any slow work."""
    if not rank:
        return
    with safe_open(os.path.join(RunFolder(adapter_dir).residual_adapter(), ADAPTER_FILE), framework="pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    widest = max((min(shapes[name.replace(".lora_A.", ".lora_B.")][0], shape[-1]) for name, shape in shapes.items()
                  if ".lora_A." in name), default=0)
    if rank > widest:
        raise QMiLoRAError(f"--correction_rank {rank} is more than the adapted layers can hold: at {widest} (the "
                           "largest min(out, in) of an adapted layer) it already carries every layer's whole 4-bit "
                           f"rounding error; pass --correction_rank {widest} or less")


def _check_output(output: str, overwrite: bool, adapter_dir: str, model: str | None, cache_dir: str | None) -> None:
    """Before any work: the output may replace only an earlier export (with --overwrite), and may not be, contain or
    lie inside the run, the original checkpoint or the cache."""
    from .config import default_cache_dir

    files.check_disjoint(output, {"the run directory": adapter_dir, "the original checkpoint": model,
                                  "the qmilora cache": os.path.expanduser(cache_dir) if cache_dir
                                  else default_cache_dir()})
    checkpoint.fresh_output(output, overwrite)


def lora_delta(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """Rank-2r state dict: lora_A → [A; A₀] (2r, in), lora_B → [B, −B₀] (out, 2r), expert by expert where a tensor
    holds E = rows / r experts' factors (E = 1 for a linear layer)."""
    if trained.keys() != initial.keys():
        raise QMiLoRAError("the trained and initial adapters hold different layers")
    out = {}
    for name, value in trained.items():
        if value.shape != initial[name].shape:
            raise QMiLoRAError(f"the trained and initial adapters differ in shape at {name}")
        if "lora_A" in name:  # (r·E, in) → (E, r, in): [A_e; A₀_e] per expert
            A, A0 = (t.reshape(-1, r, t.shape[-1]) for t in (value, initial[name]))
            out[name] = torch.cat([A, A0], dim=1).reshape(-1, value.shape[-1]).contiguous()
        elif "lora_B" in name:  # (out, r·E) → (out, r, E): [B_e, −B₀_e] per expert
            B, B0 = (t.reshape(t.shape[0], r, -1) for t in (value, initial[name]))
            out[name] = torch.cat([B, -B0], dim=1).reshape(value.shape[0], -1).contiguous()
        else:
            raise QMiLoRAError(f"unexpected adapter tensor {name}")
    return out


def original_lora(residual_dir: str, initial_dir: str, base_name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, adapter config) of the rank-2r LoRA for the original base, from the residual-form adapter and
    the initial one; `base_name` is what its config names as the base (the original checkpoint)."""
    with open(os.path.join(residual_dir, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    state = lora_delta(load_file(os.path.join(residual_dir, ADAPTER_FILE)),
                       load_file(os.path.join(initial_dir, ADAPTER_FILE)), config["r"])
    config.update(r=2 * config["r"], lora_alpha=2 * config["lora_alpha"], init_lora_weights=True,
                  base_model_name_or_path=base_name)
    return state, config


def write_run_adapters(directory: str, residual_dir: str, initial_dir: str, meta: dict) -> None:
    """A run folder's final adapters beside the residual-form one: at the top, where PEFT looks, the rank-2r LoRA
    for the original base; each with a card saying which model it gives."""
    state, config = original_lora(residual_dir, initial_dir, base_name(meta, meta["source"]["path"]))
    write_adapter(directory, state, config)
    cards.write(directory, "original-lora", meta, rank=config["r"])
    cards.write(residual_dir, "residual", meta)


def base_name(meta: dict, directory: str) -> str:
    """The original checkpoint as an adapter config names it: its Hub id, or its local directory."""
    model = meta["source"]["model"]
    return os.path.abspath(directory) if model.startswith("demo:") or os.path.isdir(model) else model


def write_adapter(directory: str, state: dict[str, torch.Tensor], config: dict) -> None:
    save_file(state, os.path.join(directory, ADAPTER_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def to_original_lora(adapter_dir: str, output: str, model: str | None = None, overwrite: bool = False,
                     measure_rows: int = 8, correction_rank: int = 0, calibration_rows: int = 32,
                     cache_dir: str | None = None) -> tuple[str, dict | None]:
    """The rank-2r LoRA for the original base; with `correction_rank` k, rank 2r + k holding also the activation-
    aware rank-k approximation of the residual's NF4 error (`correction`), calibrated on training rows. `cache_dir`:
    where the prepared base is cached (default: the current default cache)."""
    _check_output(output, overwrite, adapter_dir, model, cache_dir)
    meta, directory = _source(adapter_dir, model, cache_dir, correction_rank)
    _check_output(output, overwrite, adapter_dir, directory, cache_dir)
    if correction_rank and not meta["qmilora"].get("quantize", True):
        raise QMiLoRAError("--correction_rank corrects the 4-bit rounding of the residual, and this run kept it in "
                           "full precision (quantize false): there is nothing to correct; pass --correction_rank 0")
    state, config = original_lora(RunFolder(adapter_dir).residual_adapter(), os.path.join(adapter_dir, INITIAL),
                                  base_name(meta, directory))
    answers, found = _from_trained(adapter_dir, meta, model, cache_dir, measure_rows, correction_rank,
                                   calibration_rows)
    if correction_rank:
        from . import correction

        correction.add_to_lora(state, config, found, config["lora_alpha"] / config["r"])
    with _output(output, overwrite) as tmp:
        write_adapter(tmp, state, config)
        _copy_tokenizer(adapter_dir, tmp)
        report = _report("original-lora", answers, lambda: _original_with_lora(directory, tmp, meta))
        cards.write(tmp, "original-lora", meta, report, rank=config["r"],
                    correction=_correction_note(correction_rank, calibration_rows))
    return output, report


def _correction_note(rank: int, rows: int) -> str:
    return (f" It also holds a rank-{rank} approximation of the residual's NF4 rounding error, weighted by the "
            f"inputs of {rows} training rows (--correction_rank): closer to the trained model." if rank else "")


def _original_with_lora(directory: str, adapter: str, meta: dict):
    """The original base in the run's compute dtype with the LoRA applied by plain PEFT, as a user would load it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[meta["qmilora"].get("compute_dtype") or "float32"]
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map={"": _device(meta)})
    return PeftModel.from_pretrained(base, adapter)


def _device(meta: dict) -> str:
    from .train import config_of_run

    return str(config_of_run(meta).resolved_device)


def _plain(directory: str, meta: dict):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, device_map={"": _device(meta)})


@dataclass
class _Answers:
    """All that a measurement keeps of the trained model: its loss and top-1 tokens on the measuring rows."""
    rows: fidelity.Rows
    tokenizer: object
    loss: float
    tops: list[torch.Tensor]


def _from_trained(adapter_dir: str, meta: dict, model: str | None, cache_dir: str | None, measure_rows: int,
                  correction_rank: int = 0, calibration_rows: int = 0, convert=None) -> tuple[_Answers | None, object]:
    """Everything an export needs from the trained model, from one load of it and one build of the run's data:
    its answers on `measure_rows` rows of that data (None when 0 or the data is gone), the `correction_rank`
    factors on `calibration_rows` training rows ({} when 0), or instead `convert(trained)`'s result. The trained
    model is released before this returns, so that the artifact is written and loaded with no second model held.
    A trained model whose outputs are not finite (a diverged run) is refused before anything is computed from it."""
    from transformers import AutoTokenizer

    from .train import load_trained

    answers = rows = calibration = None
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir) if measure_rows > 0 or correction_rank else None
    built = fidelity.run_data(adapter_dir, meta, tokenizer) if tokenizer is not None else None
    if correction_rank:
        from . import correction

        calibration = correction.calibration(built, calibration_rows)  # refused before the slow load
    if built is not None and measure_rows > 0:
        rows = fidelity.take(built, measure_rows)
        rows = rows if rows.tokens else None
    del built
    if rows is None and not correction_rank and convert is None:
        return None, {}
    trained = load_trained(adapter_dir, model=model, lora_dropout=0.0, cache_dir=cache_dir)
    fidelity.require_finite(trained)
    # the model as loaded first (calibration in its own mode), then put in eval mode by the measurement
    if convert is not None:
        result = convert(trained)
    elif correction_rank:
        result = correction.factors(adapter_dir, model, correction_rank, calibration, trained, cache_dir)
    else:
        result = {}
    if rows is not None:
        answers = _Answers(rows, tokenizer, *fidelity.reference(trained, rows, tokenizer))
    del trained
    gc.collect()
    return answers, result


def _report(kind: str, answers: _Answers | None, load_artifact) -> dict | None:
    """The artifact's loss and top-1 agreement against the trained model's `answers` (None without them)."""
    if answers is None:
        return None
    artifact = load_artifact()
    result = fidelity.score(kind, artifact, answers.rows, answers.tokenizer, answers.tops)
    del artifact
    gc.collect()
    if not math.isfinite(result.loss):  # the trained model's was finite (`fidelity.reference`)
        raise QMiLoRAError(f"the {kind} export gives non-finite outputs (NaN/Inf) on {answers.rows.where}, where the "
                           "trained model does not; nothing was written"
                           + ("; try --dtype float32" if kind == "merged" else
                              "; it is measured in the run's compute dtype: --measure_rows 0 writes it unmeasured"))
    print(f"qmilora-export: trained model: loss {answers.loss:.4f} on {answers.rows.tokens} supervised tokens of "
          f"{answers.rows.where}", file=sys.stderr)
    print(f"qmilora-export: {result.line(answers.loss)}", file=sys.stderr)
    return {**result.to_dict(), "trained_loss": answers.loss}


def to_merged(adapter_dir: str, output: str, model: str | None = None, overwrite: bool = False,
              dtype: str = "bfloat16", measure_rows: int = 8, cache_dir: str | None = None) -> tuple[str, dict | None]:
    """The trained model as a plain checkpoint: dequantized NF4 residual + s·B A, cast once to `dtype`. The trained
    model is released once converted (its answers on the measuring rows kept), before the written checkpoint loads
    to be measured."""
    _check_output(output, overwrite, adapter_dir, model, cache_dir)
    meta, directory = _source(adapter_dir, model, cache_dir)
    _check_output(output, overwrite, adapter_dir, directory, cache_dir)
    if dtype not in DTYPES:
        raise QMiLoRAError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    shards = checkpoint.shard_files(directory)
    checkpoint.check_free_space(os.path.dirname(os.path.abspath(output)), sum(map(os.path.getsize, shards)),
                                "the merged model")
    answers, plain = _from_trained(adapter_dir, meta, model, cache_dir, measure_rows,
                                   convert=lambda trained: as_trained(trained, DTYPES[dtype]))
    with _output(output, overwrite) as tmp:
        plain.save_pretrained(tmp)
        del plain
        gc.collect()
        _copy_tokenizer(adapter_dir, tmp)
        report = _report("merged", answers, lambda: _plain(tmp, meta))
        cards.write(tmp, "merged", meta, report, dtype=dtype)
    return output, report


def as_trained(peft_model, dtype: torch.dtype):
    """A plain transformers model (no quantization, no adapter) whose weights are the trained model's: each 4-bit
    layer's dequantized weight plus s·B A where it is adapted, computed in float64 and cast once to `dtype`; every
    other tensor as the trained model holds it. PEFT's own merge does not fit: on a 4-bit layer it quantizes the
    merged weight again, losing the update to NF4 rounding."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from . import experts, interop

    if experts.lora_layers(peft_model) or experts.expert_params(peft_model.get_base_model()):
        raise QMiLoRAError("--to merged does not handle MoE expert stacks yet; use --to original-merged (the update "
                           "on the original weights) for this model")
    base = peft_model.get_base_model()
    loras = interop.lora_layers(peft_model)
    config = base.config.__class__.from_dict(base.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with init_empty_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for name, _ in plain.named_parameters():
        owner, _, leaf = name.rpartition(".")
        module = base.get_submodule(owner) if owner else base
        layer = module.get_base_layer() if owner in loras else module
        value = getattr(layer, leaf)
        if leaf != "weight" or (owner not in loras and not quantize.is_4bit_param(value)):
            state[name] = value.detach().to(dtype)  # as the trained model holds it, in the same module type
            continue
        # orientation follows each tensor's real storage, not the checkpoint's: a 4-bit layer holds (out, in) even
        # when transformers made it from a Conv1D, an unquantized Conv1D (quantize=False) still holds (in, out)
        if quantize.is_4bit_param(value):
            value = quantize.dequantize(value, torch.float32)
        elif isinstance(layer, Conv1D):
            value = value.T
        if owner in loras:  # (out, in) + s·B A (out, r)(r, in), in float64
            lora = loras[owner]
            B, A = lora.lora_B["default"].weight, lora.lora_A["default"].weight
            value = value.double() + lora.scaling["default"] * (B.double() @ A.double()).to(value.device)
        if isinstance(plain.get_submodule(owner), Conv1D):
            value = value.T  # back to Conv1D's (in, out)
        state[name] = value.detach().to(dtype).contiguous()
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    return plain.eval()


def to_original_merged(adapter_dir: str, output: str, model: str | None = None, overwrite: bool = False,
                       measure_rows: int = 8, correction_rank: int = 0, calibration_rows: int = 32,
                       cache_dir: str | None = None) -> tuple[str, dict | None]:
    """W + s·(B A − B₀ A₀) on the original weights, each tensor in its stored dtype (+ L_k with `correction_rank`,
    as in `to_original_lora`)."""
    _check_output(output, overwrite, adapter_dir, model, cache_dir)
    meta, directory = _source(adapter_dir, model, cache_dir, correction_rank)
    _check_output(output, overwrite, adapter_dir, directory, cache_dir)
    residual = RunFolder(adapter_dir).residual_adapter()
    with open(os.path.join(residual, ADAPTER_CONFIG)) as f:
        scaling = (cfg := json.load(f))["lora_alpha"] / cfg["r"]
    delta = _factors(load_file(os.path.join(residual, ADAPTER_FILE)),
                     load_file(os.path.join(adapter_dir, INITIAL, ADAPTER_FILE)))
    shards = checkpoint.shard_files(directory)
    checkpoint.check_free_space(os.path.dirname(os.path.abspath(output)), sum(map(os.path.getsize, shards)),
                                "the merged model")
    if cfg.get("target_parameters"):
        if correction_rank:  # refused before the slow work, as `correction.factors` refuses expert stacks
            raise QMiLoRAError("--correction_rank does not handle MoE expert stacks yet; pass --correction_rank 0")
        return _merged_through_loader(directory, adapter_dir, cfg, delta, scaling, output, overwrite), None
    answers, corrections = _from_trained(adapter_dir, meta, model, cache_dir, measure_rows, correction_rank,
                                         calibration_rows)
    stored_transposed, prefix = _layout(directory)
    with _output(output, overwrite) as tmp:
        for path in shards:  # one shard in memory at a time
            tensors = {}
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                for name in f.keys():
                    w = f.get_tensor(name)
                    stem = name.removesuffix(".weight")
                    # a checkpoint may store names without the base model's prefix (transformers adds it on load)
                    layer = stem if stem in delta else f"{prefix}.{stem}"
                    if name.endswith(".weight") and layer in delta:
                        (B, A), (B0, A0) = delta.pop(layer)
                        update = B.double() @ A.double() - B0.double() @ A0.double()  # (out, in)
                        if layer in corrections:
                            left, right = corrections[layer]
                            update = update + (left @ right) / scaling
                        if layer in stored_transposed:
                            update = update.T  # Conv1D stores (in, out)
                        w = (w.double() + scaling * update).to(w.dtype)
                    tensors[name] = w.contiguous()
            save_file(tensors, os.path.join(tmp, os.path.basename(path)), metadata={"format": "pt", **metadata})
            del tensors
        if delta:
            raise QMiLoRAError(f"the checkpoint lacks weights for adapter layers, e.g. {next(iter(delta))}")
        _copy_tokenizer(adapter_dir, tmp)  # the run's tokenizer first: the one it trained with, not --model's
        for name in os.listdir(directory):
            if name.endswith(".json") and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy2(os.path.join(directory, name), tmp)
        report = _report("original-merged", answers, lambda: _plain(tmp, meta))
        cards.write(tmp, "original-merged", meta, report,
                    correction=_correction_note(correction_rank, calibration_rows))
    return output, report


def _merged_through_loader(directory: str, adapter_dir: str, adapter_config: dict, delta: dict, scaling: float,
                           output: str, overwrite: bool) -> str:
    """`to_merged` for a MoE: each weight as transformers' loader places it (experts fused), plus its update, saved by
    transformers. The adapter's keys name PEFT's wrapper modules; PEFT itself, on a meta-device copy of the model,
    says which parameter each one wraps."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import experts, interop

    hf_config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(hf_config)
        lora = LoraConfig.from_pretrained(RunFolder(adapter_dir).residual_adapter())
        paths = experts.adapter_paths(get_peft_model(skeleton, lora))
    param_of = {path: name for name, path in paths.items()}
    delta = {param_of.get(layer, layer): factors for layer, factors in delta.items()}
    stacks = set(paths)

    def convert(name: str, weight: torch.Tensor) -> torch.Tensor:
        (B, A), (B0, A0) = delta.pop(name)
        if name in stacks:  # PEFT's layout → per expert (E, out, r) @ (E, r, in)
            r = adapter_config["r"]
            per = lambda b, a: b.double().reshape(b.shape[0], r, -1).permute(2, 0, 1) @ a.double().reshape(-1, r, a.shape[-1])  # noqa: E731
        else:
            per = lambda b, a: b.double() @ a.double()  # noqa: E731
        return (weight.double() + scaling * (per(B, A) - per(B0, A0))).to(weight.dtype)

    dtype = getattr(hf_config, "dtype", None) or torch.float32
    job = interop.LoadJob(quantize=False, quant_type="nf4", double_quant=False, dtype=dtype,
                          layers={n for n in delta if n not in stacks}, experts=stacks & set(delta), convert=convert)
    model, _ = interop.from_pretrained(job, AutoModelForCausalLM, pretrained_model_name_or_path=directory,
                                       dtype=dtype, device_map={"": "cpu"})
    interop.finish_loaded(model, job)
    if delta:
        raise QMiLoRAError(f"the checkpoint lacks weights for adapter layers, e.g. {next(iter(delta))}")
    with _output(output, overwrite) as tmp:
        model.save_pretrained(tmp)
        _copy_tokenizer(adapter_dir, tmp)
    return output


def _layout(directory: str) -> tuple[set[str], str]:
    """(names of layers whose checkpoint weight is stored (in, out), the base model prefix), from the model that
    config.json describes, built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .interop import is_conv1d

    with init_empty_weights(include_buffers=True):  # every tensor on meta: nothing allocated, whatever the width
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return {n for n, m in model.named_modules() if is_conv1d(m)}, model.base_model_prefix


def _factors(trained: dict, initial: dict) -> dict[str, tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """{layer name in the checkpoint: ((B, A), (B₀, A₀))} from PEFT adapter state dicts."""
    out = {}
    for name in trained:
        if ".lora_A." not in name:
            continue
        layer = name.removeprefix("base_model.model.").split(".lora_A.")[0]
        b_name = name.replace(".lora_A.", ".lora_B.")
        out[layer] = ((trained[b_name], trained[name]), (initial[b_name], initial[name]))
    return out


@contextlib.contextmanager
def _output(output: str, overwrite: bool):
    """A temporary that becomes `output`, with a record of its files (what a later --overwrite may replace);
    `_check_output` checked first that replacing is allowed, and the rename checks again (the output may have
    changed while the export ran)."""
    with files.atomic_dir(output, overwrite=overwrite, own_only="--overwrite") as tmp:
        yield tmp
        files.write_manifest(tmp, "qmilora-export")


def _copy_tokenizer(src: str, dst: str) -> None:
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)) and not os.path.exists(os.path.join(dst, name)):
            shutil.copy2(os.path.join(src, name), dst)
