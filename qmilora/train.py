"""Finetuning on transformers' Trainer: defaults, resumable checkpoints, a run summary. The output directory's
layout and record belong to `runfolder`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback,
                          TrainingArguments)

from . import cache, checkpoint, checks, console, cpu, files as qfiles, interop, loss as lm_loss
from .config import QMiLoRAConfig, QMiLoRAError
from .data import PACKED_MASK_TOKENS, DataConfig, build_dataset, check_file, show_example
from .runfolder import ADAPTER_FILE, RESIDUAL, RunFolder

log = logging.getLogger("qmilora")


@dataclass
class RunConfig:
    _argument_group_name = "run"
    model: str | None = field(default=None, metadata={"help": "Full-precision checkpoint directory or Hub id. Default: the bundled demo model SmolLM2-135M-Instruct.", "aliases": ["--model_name_or_path"]})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start a new run in an --output_dir that holds an earlier run's results, removing what that run wrote (never other files)."})
    chunked_loss: bool = field(default=True, metadata={"help": "Compute the loss in chunks of the supervised tokens, never holding full-vocabulary logits (checked against the model's own loss before training; off by itself where they differ, and under --use_liger_kernel)."})
    offload_activations: bool = field(default=False, metadata={"help": "Keep the activation checkpoints in pinned host memory until backward (for long sequences on a GPU; slower)."})
    tiled_mlp: bool = field(default=False, metadata={"help": "Compute each decoder layer's MLP (found by a check: any block that acts on each token alone) over the sequence in tiles of hidden-size tokens, each recomputed in backward: one tile's MLP activations alive instead of the whole sequence's, for long context; one more MLP forward per step."})
    fused_lora: bool = field(default=True, metadata={"help": "Run each 4-bit LoRA layer as one autograd function (outputs and gradients equal to PEFT's layer; keeps less for backward). Off under FSDP, DeepSpeed and torch_compile."})


class TrainerArguments(TrainingArguments):
    """transformers' TrainingArguments under a heading of their own, after QMiLoRA's groups in qmilora-train --help."""
    _argument_group_name = "Trainer (every transformers.TrainingArguments field; --resume_from_checkpoint takes true, last or a path)"


def training_defaults() -> dict:
    """QLoRA-style defaults; every one can be overridden by YAML or flags."""
    cuda = torch.cuda.is_available()
    return dict(learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, activation_checkpointing=True,
                activation_checkpointing_kwargs={"use_reentrant": False},
                optim="paged_adamw_8bit" if cuda else "adamw_torch", bf16=cuda and torch.cuda.is_bf16_supported(),
                # without it, transformers runs torchrun's CPU processes undistributed: each on all the data
                use_cpu=not cuda,
                per_device_train_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=1, logging_steps=5,
                save_strategy="steps", save_steps=200, save_total_limit=2, report_to="none", eval_strategy="no",
                include_num_input_tokens_seen=True, remove_unused_columns=False,
                # every trainable tensor (the adapters) takes part in each forward: DDP need not search for unused
                # ones (PEFT models are not PreTrainedModels, so Trainer would ask it to, and torch warns each run)
                ddp_find_unused_parameters=False)


class _Progress(TrainerCallback):
    """Marks each checkpoint complete once Trainer has fully written it (transformers logs tokens/s itself)."""

    def __init__(self, folder: RunFolder, keep: int | None = None):
        self.folder, self.keep = folder, keep
        self.start = time.perf_counter()
        self.tokens_at_start = None

    def on_train_begin(self, args, state, control, **kw):
        self.start, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        # DefaultFlowCallback (first in the list) has decided by now whether Trainer saves after this step
        if control.should_save and state.is_world_process_zero:
            self.folder.start_checkpoint(state.global_step)

    def on_save(self, args, state, control, **kw):
        if args.world_size > 1:  # Trainer does not wait: each process must have written its part (RNG state)
            from accelerate import PartialState

            PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            self.folder.mark_complete_checkpoint(state.global_step)
            self.folder.rotate(self.keep, state.best_model_checkpoint)


class _Trainer(Trainer):
    """transformers' Trainer with QMiLoRA's loss options (`qmilora.loss`), stopping at the first non-finite loss:
    its default NaN filter would log the running mean instead and train on (exit 0, `train_loss 0.0`). Raised
    before the optimizer step; the update that made the loss non-finite came a step earlier, so the last complete
    checkpoint may hold it already. The last step's own update is checked by `check_trained`."""

    def __init__(self, *args, chunked_loss: bool = False, offload_activations: bool = False, **kwargs):
        if chunked_loss:
            kwargs["compute_loss_func"] = self._chunked_loss
        if getattr(kwargs.get("args"), "include_num_input_tokens_seen", "no") == "all":
            # the run's `tokens` count real input tokens; "all" (what True means to transformers) counts padding too
            kwargs["args"].include_num_input_tokens_seen = "non_padding"
        super().__init__(*args, **kwargs)
        self.offload_activations = offload_activations

    def _chunked_loss(self, outputs, labels, num_items_in_batch=None):
        head = self.model.get_output_embeddings()
        return lm_loss.chunked_causal_lm_loss(head, self._last_hidden.value, labels,
                                              self.model.config.get_text_config().vocab_size, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        last = contextlib.nullcontext()
        if self.compute_loss_func is not None:
            labels = inputs.get("labels")
            inputs = {**lm_loss.hidden_state_inputs(inputs), "labels": labels}  # Trainer pops the labels
            last = self._last_hidden = lm_loss.LastHidden(self.model)  # self.model: unwrapped from DDP
        with last, lm_loss.offload(self.offload_activations and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    supervised_tokens = 0  # this session's, this process's: positions whose next token is trained on

    def training_step(self, model, inputs, num_items_in_batch=None):
        if inputs.get("labels") is not None:  # a label's first position is never a target (the shift)
            self.supervised_tokens += int((inputs["labels"][..., 1:] != -100).sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            last = RunFolder(self.args.output_dir).last_complete_checkpoint()
            raise QMiLoRAError(f"the training loss became {loss.item()} at step {self.state.global_step + 1}; stopped "
                               f"(last complete checkpoint: {last or 'none'}, saved after an earlier update that may "
                               f"have diverged already); {checks.DIVERGED}")
        return loss


def _use_chunked_loss(run: RunConfig, args: TrainingArguments, model, collator, train_set) -> bool:
    """The chunked loss where asked for and where it equals the model's own on the first training rows."""
    if not run.chunked_loss or args.use_liger_kernel:
        return False
    if args.label_smoothing_factor:  # Trainer's label smoother works on the model's logits; the chunked loss has none
        log.info("qmilora: --label_smoothing_factor: using the model's loss (Trainer's label smoothing)")
        return False
    batch = collator(checks.check_rows(train_set))
    device = next(p.device for p in model.parameters())
    agree, own, ours = lm_loss.matches_model_loss(model, {k: v.to(device) for k, v in batch.items()})
    if not agree:
        log.warning("qmilora: the chunked loss (%.6g) differs from the model's own (%.6g) on this architecture; "
                    "using the model's loss (full-vocabulary logits)", ours, own)
    return agree


def train(run: RunConfig, qcfg: QMiLoRAConfig, dcfg: DataConfig, args: TrainingArguments):
    """Prepare, train, and write the outputs; returns (trained PeftModel, run summary). The main process holds the
    output folder's lock throughout: a second training into it is refused."""
    checks.refuse_hub_push(args)
    checks.check_schedule(args)
    folder = RunFolder(args.output_dir)
    with folder.lock(enabled=args.process_index == 0):
        try:
            return _train(folder, run, qcfg, dcfg, args)
        except BaseException:
            folder.discard_unstarted()  # no half-written run record: a run that failed while preparing
            raise


def _train(folder: RunFolder, run: RunConfig, qcfg: QMiLoRAConfig, dcfg: DataConfig, args: TrainingArguments):
    """`train` inside the folder's lock.

    Under torchrun / `accelerate launch` (data parallel): the main process of each node prepares the model first and
    caches it, the other processes then load that cached preparation (identical bytes on every rank); only the
    global main process writes to --output_dir; the summary's tokens are global (transformers gathers them)."""
    from .demo import demo_model_dir
    from .prepare import prepare_model, recipe_of

    main = args.process_index == 0
    fsdp = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if fsdp and (args.use_cpu or not torch.cuda.is_available()):
        # accelerate builds no FSDP plugin without an accelerator: Trainer would train unsharded copies instead
        how = ("drop --fsdp" if args.fsdp else "launch without the FSDP accelerate config (distributed_type: FSDP)")
        raise QMiLoRAError(f"FSDP needs GPUs (accelerate shards only on accelerators); on CPUs {how} and run data "
                           "parallel (torchrun, or accelerate launch --multi_gpu)")
    if fsdp:
        if qcfg.quant_storage == "uint8":
            # FSDP1 flattens float tensors only, and mixed precision casts what it gathers to the compute dtype:
            # the packed 4-bit codes are viewed as that dtype instead (same bytes), as in the FSDP-QLoRA recipe
            qcfg.quant_storage = qcfg.compute_dtype
            log.info("qmilora: FSDP: 4-bit weights stored as %s (quant_storage) so that they shard", qcfg.compute_dtype)
        if qcfg.device == "auto":
            # the whole prepared model waits in host memory; FSDP moves each process's shards to its GPU
            qcfg.device = "cpu"
            if qcfg.svd_device == "auto":
                qcfg.svd_device = str(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    if args.world_size > 1 and not qcfg.prepared_cache:
        raise QMiLoRAError("with several processes the ranks share one preparation through the cache: drop "
                           "--prepared_cache false")
    if not main:
        log.setLevel(logging.WARNING)
    if args.use_cpu and qcfg.device == "auto":
        qcfg.device = "cpu"
    threads, threads_reason = cpu.choose(qcfg.threads)
    cpu.apply(threads)  # for the whole run: preparation and training
    log.info("qmilora: %d CPU thread%s: %s", threads, "" if threads == 1 else "s", threads_reason)
    if run.overwrite_output_dir and args.resume_from_checkpoint not in (None, "", "false", "False"):
        raise QMiLoRAError("--resume_from_checkpoint continues the run in --output_dir and --overwrite_output_dir "
                           "replaces it: pass one of them")
    _absolute_paths(dcfg)  # a run record names files another working directory finds too
    check_file(dcfg)  # a wrong --data path, before anything slow
    demo = run.model in (None, "demo")
    directory = None if demo else checkpoint.resolve(run.model)
    read = checks.read_files(qcfg, dcfg)
    if directory is not None:  # (the demo model lives in the cache)
        checks.check_cache_place(qcfg.resolved_cache_dir, directory)
    cache.memo(qcfg.resolved_cache_dir)  # a cache refused before anything is written
    if demo:
        with args.main_process_first(local=True, desc="the demo model"):  # built once per node, then read by others
            directory = checkpoint.resolve(demo_model_dir(qcfg.cache_dir))
    files = checkpoint.shard_files(directory)
    resume = folder.resolve_resume(args.resume_from_checkpoint)
    if main:
        qfiles.check_disjoint(args.output_dir, {"the model checkpoint": directory, **read,
                                                "the qmilora cache": qcfg.resolved_cache_dir}, "--output_dir")
        folder.claim(resume=resume is not None, overwrite=run.overwrite_output_dir)  # before any slow step
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise QMiLoRAError(f"cannot load the tokenizer of {directory}: {str(err).strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set, eval_set, fmt = build_dataset(dcfg, tokenizer)  # bad data stops here, before the model loads
    checks.check_data_fits(directory, [train_set] + ([eval_set] if eval_set is not None else []))
    if main:  # what the model will read: the chat template and system prompt in effect, the trained span marked
        log.info("qmilora: first training example ([[...]] is trained on):\n%s", show_example(train_set[0], tokenizer))
    if eval_set is None and args.eval_strategy != "no":
        raise QMiLoRAError("evaluation was requested (--eval_strategy) but there is no eval split: set --val_size")
    if eval_set is not None and args.eval_strategy == "no":
        args.eval_strategy = "steps"
        args.eval_steps = args.eval_steps or args.logging_steps
    recipe = recipe_of(qcfg)
    if resume and dcfg.packing is None:  # automatic: a resume batches as the run it continues did (runs recorded
        recorded = ((folder.meta() or {}).get("resume_recipe") or {}).get("data.packing")  # before: packing false)
        dcfg.packing = recorded if isinstance(recorded, bool) else None
    again = resume_recipe(qcfg, dcfg, args, directory)
    longer = {}
    if resume and main:
        longer = folder.check_resume(resume, checkpoint.identity(directory, files, cache.memo(qcfg.resolved_cache_dir)),
                                     recipe, again)
    if resume:
        checks.check_not_finished(resume, args)
        adapter = os.path.join(resume, ADAPTER_FILE)
        if os.path.isfile(adapter):
            checks.check_finite_adapter(adapter, f"the checkpoint {resume}")
        for key, (was, now) in longer.items():
            log.warning("qmilora: training longer than recorded (%s %s -> %s); the learning-rate schedule now spans "
                        "the new length from the step it resumes at", key.split(".")[1], was, now)

    meta = {"source": {"model": _model_name(run.model), "path": os.path.abspath(directory),
                       "identity": None}, "recipe": recipe, "resume_recipe": again, "resumed_from": resume, "longer": longer, "qmilora": qcfg.to_dict(), "data": asdict(dcfg),
            "training": args.to_dict(), "versions": _versions()}
    if main:
        folder.begin(meta, resume=resume is not None)
    with args.main_process_first(local=True, desc="QMiLoRA preparation"):
        model = prepare_model(directory, qcfg)
    meta["source"]["identity"] = model.qmilora_source_identity
    if args.activation_checkpointing and not model.get_base_model().supports_gradient_checkpointing:
        log.warning("qmilora: %s does not support activation checkpointing; training without it (more memory)",
                    type(model.get_base_model()).__name__)
        args.activation_checkpointing = False
    if main:
        folder.write_initial(model)
        folder.update(source=meta["source"], state="training")
    # checkpoints are rotated by the run folder, which removes only their recorded files (Trainer deletes folders)
    keep, args.save_total_limit = args.save_total_limit, None
    progress = _Progress(folder, keep)
    collator, packed = choose_collator(model, tokenizer, dcfg.packing, train_set,
                                       args.per_device_train_batch_size * dcfg.max_seq_length)
    # not under FSDP or DeepSpeed (sharded parameters are gathered by hooks on the modules the fused function
    # bypasses) nor torch.compile (untested)
    fused = run.fused_lora and not (fsdp or args.deepspeed or args.torch_compile)
    if fused:
        log.info("qmilora: %d 4-bit LoRA layers fused", interop.use_fused_lora(model))
    if run.tiled_mlp:
        from .tiled import tile_position_wise

        tiled = tile_position_wise(model)
        if tiled:
            log.info("qmilora: %d position-wise blocks tiled over the sequence", len(tiled))
        else:
            log.warning("qmilora: --tiled_mlp: %s has no dense position-wise block to tile (mixture-of-experts "
                        "blocks stay whole); training without tiling", type(model.get_base_model()).__name__)
    chunked = _use_chunked_loss(run, args, model, collator, train_set)
    if chunked and fsdp:  # it reads the head's weight outside the forward, where FSDP keeps it sharded
        log.warning("qmilora: FSDP: using the model's own loss (the chunked loss reads the unsharded head)")
        chunked = False
    trainer = _Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator,
                       processing_class=tokenizer, callbacks=[progress], chunked_loss=chunked,
                       offload_activations=run.offload_activations)
    console.use_lines(trainer)
    if resume:
        log.info("qmilora: resuming from %s", resume)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - t0

    tokens = int(trainer.state.num_input_tokens_seen)  # all processes' non-padding input tokens, whole run
    supervised = int(trainer.accelerator.reduce(torch.tensor(trainer.supervised_tokens, device=args.device), "sum"))
    summary = {"steps": trainer.state.global_step, "tokens": tokens, "wall_seconds": round(wall, 2),
               "train_loss": result.training_loss, "resumed_from": resume, "processes": args.world_size,
               "threads": threads, "threads_reason": threads_reason,
               # this session's supervised tokens over this session's time (a resumed run did the rest earlier):
               # prompt and padding tokens cost compute but are not what a run is sized by
               "supervised_tokens": supervised,
               "tokens_per_second": round(supervised / max(wall, 1e-9), 1),
               "tokens_per_second_counts": "supervised tokens (labelled, not padding) of this session",
               "peak_memory_gb": round(_peak_gb(args), 3), "data_format": fmt, "train_rows": len(train_set),
               "eval_rows": len(eval_set) if eval_set is not None else 0,
               "loss": "chunked" if chunked else ("liger" if args.use_liger_kernel else "model"), "packing": packed,
               "fused_lora": bool(fused), "tiled_mlp": run.tiled_mlp}
    if not fsdp:  # FSDP's shards are checked by no single process, and its forward needs the wrapped model
        checks.check_trained(model, collator, train_set, trainer.state.global_step)
    if eval_set is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]  # every process takes part
    # under FSDP every process takes part in gathering the full weights; the main process writes them
    state = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None

    def write_files(tmp):
        from . import export

        # the adapter as trained belongs to the NF4 residual base (its config names that base); what plain PEFT
        # loads from the run folder itself is the adapter for the original base (`export.write_run_adapters`)
        model.save_pretrained(os.path.join(tmp, RESIDUAL), state_dict=state)
        export.write_run_adapters(tmp, os.path.join(tmp, RESIDUAL), folder.initial, meta)
        tokenizer.save_pretrained(tmp)
        _plot_loss(trainer.state.log_history, os.path.join(tmp, "loss.png"))

    if main:
        folder.finish(write_files, {**meta, "summary": summary})
    if args.world_size > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # the run is over for every process once its outputs exist
    return model, summary


def _absolute_paths(dcfg: DataConfig) -> None:
    for name in ("data", "chat_template"):
        value = getattr(dcfg, name)
        if value and os.path.exists(os.path.expanduser(value)):
            setattr(dcfg, name, os.path.abspath(os.path.expanduser(value)))


def choose_collator(model, tokenizer, packing: bool | None, train_set, row_tokens: int = 0):
    """(collator, packed). Padding-free packing (one row per batch, no padding; the model separates the examples by
    their position ids) where asked for or, by default, where the model keeps packed examples apart; padded
    batches otherwise. Both give each batch the same examples and supervised tokens. By default also padded where a
    packed row could reach `row_tokens` > PACKED_MASK_TOKENS and the attention is not FlashAttention's: transformers
    then builds a T×T mask for the packed row (17 GB at 128k tokens), which padded batches of whole examples avoid."""
    padded = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8)
    if packing is False:
        return padded, False
    if packing is None and row_tokens > PACKED_MASK_TOKENS and not interop.packs_without_mask(model):
        log.info("qmilora: padded batches, not packed ones: a packed row of up to %d tokens needs a %d x %d attention "
                 "mask with %s attention (--packing true packs anyway)", row_tokens, row_tokens, row_tokens,
                 getattr(model.config, "_attn_implementation", None))
        return padded, False
    flattening = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    why = packing_mixes(model, flattening, train_set)
    if why is None:
        return flattening, True
    if packing:
        raise QMiLoRAError(f"--packing: {why}; train without --packing")
    log.info("qmilora: padded batches, not packed ones: %s", why)
    return padded, False


def packing_mixes(model, collator, train_set) -> str | None:
    """Why packing would not keep examples apart on this model, or None where it does: the logits of two examples
    flattened into one row must equal their logits alone (transformers builds per-example masks from the position
    ids for the architectures it has moved to its masking utilities; others would mix examples silently)."""
    rows = checks.check_rows(train_set)
    if len(rows) < 2:
        return None
    device = next(p.device for p in model.parameters())
    flat = collator(rows)
    name = type(model.get_base_model()).__name__
    was_training = model.training
    model.eval()  # dropout off (prepared models never enter bitsandbytes' CPU inference layout: no-grad is safe)
    try:
        # no cache, as in training: with one, transformers does not derive the per-example mask
        with torch.no_grad():
            packed = model(input_ids=flat["input_ids"].to(device), position_ids=flat["position_ids"].to(device),
                           use_cache=False).logits[0]
            alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]], device=device),
                                     use_cache=False).logits[0] for r in rows])
    except (TypeError, ValueError) as err:  # e.g. a model without position ids (out of memory is not caught)
        return f"{name} does not take packed rows ({str(err).strip().splitlines()[0][:120]})"
    finally:
        model.train(was_training)
    gap = (packed.float() - alone.float()).abs().max().item()
    if gap > 1e-2 * alone.float().abs().max().item() + 1e-4:
        return f"{name} lets packed examples attend to each other (logits differ by {gap:.3g} from the examples alone)"
    return None


# TrainingArguments that only change what is logged, saved or evaluated, or how fast: a resume may change them.
# Every other field, and every data field, must be as recorded.
_RESUMABLE = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir", "logging_steps",
              "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "report_to", "run_name", "project",
              "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "disable_tqdm", "log_level",
              "log_level_replica", "log_on_each_node", "save_steps", "save_strategy", "save_total_limit",
              "save_on_each_node", "save_only_model", "eval_steps", "eval_strategy", "eval_delay", "eval_on_start",
              "eval_accumulation_steps", "eval_do_concat_batches", "eval_use_gather_object", "per_device_eval_batch_size",
              "batch_eval_metrics", "prediction_loss_only", "include_for_metrics", "do_eval", "do_predict", "do_train",
              "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
              "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "push_to_hub", "hub_model_id",
              "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "skip_memory_metrics",
              "local_rank", "ddp_timeout", "debug", "torch_empty_cache_steps", "enable_jit_checkpoint",
              "activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
              "gradient_checkpointing_kwargs", "torch_compile", "torch_compile_backend", "torch_compile_mode"}


def resume_recipe(qcfg: QMiLoRAConfig, dcfg: DataConfig, args: TrainingArguments, directory: str) -> dict:
    """What a resume must continue unchanged besides the preparation recipe: the training schedule and optimizer,
    the adapters' dropout (trained with, though not part of the prepared tensors), the data (its settings and the
    content of a data file), and the tokenizer (its files' content)."""
    training = {f"training.{k}": v for k, v in args.to_dict().items() if k not in _RESUMABLE}
    training["qmilora.lora_dropout"] = qcfg.lora_dropout
    data = {f"data.{k}": v for k, v in asdict(dcfg).items()}
    template = os.path.expanduser(dcfg.chat_template or "")
    if os.path.isfile(template):
        data["data.chat_template.sha256"] = checkpoint.file_digest(template)
    path = os.path.expanduser(dcfg.data) if dcfg.data else None
    if path and os.path.isfile(path):
        data["data.sha256"] = checkpoint.file_digest(path)
    elif not dcfg.data:
        from .data import BUNDLED

        data["data.sha256"] = checkpoint.file_digest(BUNDLED)
    tokenizer = sorted((n, checkpoint.file_digest(os.path.join(directory, n))) for n in checkpoint.TOKENIZER_FILES
                       if os.path.isfile(os.path.join(directory, n)))
    return json.loads(json.dumps({**training, **data, "tokenizer.sha256": tokenizer}, default=str))


def _model_name(model: str | None) -> str:
    """The source as another working directory can find it: a local folder's absolute path, else the Hub id."""
    if model in (None, "demo"):
        return "demo:SmolLM2-135M-Instruct"
    path = os.path.expanduser(model)
    return os.path.abspath(path) if os.path.isdir(path) else model


def load_trained(output_dir: str, model: str | None = None, **overrides):
    """The trained model of a qmilora-train output dir: the prepared base (from the cache, or prepared again,
    deterministically, from the verified original checkpoint, or `model` when it moved) with the trained adapter
    weights (the residual-form adapter) loaded by PEFT."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .prepare import prepare_model

    folder = RunFolder(output_dir)
    meta = folder.read_complete()
    checks.check_finite_adapter(os.path.join(folder.residual_adapter(), ADAPTER_FILE),
                                f"the trained adapter of {output_dir}")
    qcfg = config_of_run(meta, **overrides)
    directory = verified_source(meta, model, qcfg.resolved_cache_dir)
    model = prepare_model(directory, qcfg)
    report = set_peft_model_state_dict(model, load_file(os.path.join(folder.residual_adapter(), ADAPTER_FILE)))
    missing = [k for k in report.missing_keys if "lora_" in k]
    if report.unexpected_keys or missing:
        raise QMiLoRAError(f"the adapter in {output_dir} does not fit the prepared model (e.g. "
                           f"{(report.unexpected_keys or missing)[0]})")
    return model


def config_of_run(meta: dict, **overrides) -> QMiLoRAConfig:
    """A run's recorded QMiLoRAConfig, except where its cache is: a run record never chooses the folder whose
    contents get loaded (the current default, or what the caller passes)."""
    return QMiLoRAConfig(**{**meta["qmilora"], "cache_dir": None, **overrides})


def verified_source(meta: dict, model: str | None, cache_dir: str) -> str:
    """The original checkpoint of a run, verified by content to be the one the adapter was trained on."""
    recorded = meta["source"]["path"]
    if model is None and not os.path.exists(recorded):
        raise QMiLoRAError(f"the run's original checkpoint {recorded} does not exist (moved or removed); pass "
                           "--model PATH with where it is now")
    directory = checkpoint.resolve(model or recorded)
    files = checkpoint.shard_files(directory)
    if checkpoint.identity(directory, files, cache.memo(cache_dir)) != meta["source"]["identity"]:
        raise QMiLoRAError(f"{directory} is not the checkpoint this adapter was trained on (its content differs); "
                           "pass the original with --model")
    return directory


def _plot_loss(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), marker="o" if label == "eval" or len(pts) == 1 else None, label=label)
            plotted = True
    if plotted:
        ax.legend()
    else:  # a run shorter than --logging_steps logged no loss
        ax.text(0.5, 0.5, "no loss logged (the run was shorter than --logging_steps)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _peak_gb(args: TrainingArguments) -> float:
    if torch.cuda.is_available() and not args.use_cpu:
        return torch.cuda.max_memory_allocated() / 2**30
    return checkpoint.peak_rss_gb()


def _versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    from . import __version__

    return {"qmilora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
