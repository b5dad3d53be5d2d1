"""qmilora-plan: expected peak GPU memory for preparing and training a model, from its config.json alone, beside
QLoRA's for the same settings. It plans for a GPU: the compute dtype is bfloat16 unless --compute_dtype says."""
from __future__ import annotations

import sys

from . import parse_flags, run


def main(argv: list[str] | None = None) -> int:
    def body():
        from transformers import AutoConfig

        from ..checkpoint import refuse_quantized_config
        from ..config import QMiLoRAConfig, QMiLoRAError
        from ..configs import locate
        from ..plan import PlanConfig, plan

        def refuse(message):
            raise QMiLoRAError(message)

        args = sys.argv[1:] if argv is None else argv
        cfg, qcfg = parse_flags("qmilora-plan", (PlanConfig, QMiLoRAConfig), args, __doc__)
        if not any(a.split("=")[0] == "--compute_dtype" for a in args):
            qcfg.compute_dtype = "bfloat16"
        path, origin = locate(cfg.model, refuse)
        try:
            hf_config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as err:
            raise QMiLoRAError(f"{path} is not a config.json transformers can read ({type(err).__name__}: "
                               f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
        refuse_quantized_config(hf_config)
        if origin:
            print(origin)
        p = plan(cfg, qcfg, hf_config)
        rows = [(f"4-bit weights, quant states, rest in {qcfg.compute_dtype}", p["quantized_weights_gb"]),
                ("adapters (fp32)", p["adapters_gb"]), ("adapter grads + optimizer state", p["grads_and_optimizer_gb"]),
                ("checkpointed activations" + (f" ({p['offloaded_gb']:.2f} GB offloaded to host)"
                                                if cfg.offload_activations else ""), p["checkpoints_gb"]),
                (f"larger of: recomputed layer{' (tiled MLP)' if cfg.tiled_mlp else ''}, logits ({p['logits_gb']:.2f} GB, "
                 + ("chunked loss)" if cfg.chunked_loss else "model's loss)"), p["transient_gb"]),
                *([("routed experts' weights kept for one layer's backward", p["routed_experts_gb"])]
                  if p["num_experts"] else []),
                *([("packed row's attention mask (SDPA)", p["packing_mask_gb"])] if p["packing_mask_gb"] else []),
                ("one weight's SVD workspace (prepare)", p["svd_workspace_gb"])]
        for label, gb in rows:
            print(f"{label:<50} {gb:8.2f} GB")
        print(f"{'peak while preparing':<50} {p['prepare_peak_gb']:8.2f} GB")
        print(f"{'peak while training':<50} {p['train_peak_gb']:8.2f} GB")
        print(f"{'QLoRA, same settings (PEFT k-bit, fp32 rest)':<50} {p['qlora_train_peak_gb']:8.2f} GB")
        verdict = "fits" if p["fits"] else "does NOT fit"
        mode = "FSDP, sharded" if p["fsdp"] else "data parallel"
        per = f" per GPU, on each of {p['num_gpus']} ({mode}: {p['global_batch_tokens']:,} tokens per step)" \
            if p["num_gpus"] > 1 or p["fsdp"] else ""
        if p["fsdp"]:
            print(f"{'host memory per process (the prepared model)':<50} {p['host_weights_gb']:8.2f} GB")
        if p["num_experts"]:
            print(f"MoE: {p['num_experts']} experts per layer, {p['top_k']} routed per token; "
                  f"{p['total_params'] / 1e9:.2f}B parameters, {p['active_params'] / 1e9:.2f}B active per token")
        print(f"{p['adapter_params']:,} trainable parameters; {verdict} in {p['gpu_gb']:.0f} GB{per}")
        if not p["fits"]:
            print(advice(cfg, qcfg, hf_config))

    return run("qmilora-plan", body)


def advice(cfg, qcfg, hf_config) -> str:
    """What would fit: the memory options first, then the longest sequence (a power of two) with them."""
    from dataclasses import replace

    from ..plan import parse_size, plan

    lighter = {"chunked_loss": True, "packing": False, "offload_activations": True, "tiled_mlp": True}  # cheapest first
    options = replace(cfg, **lighter)
    flag = lambda n: f"--{n} {str(lighter[n]).lower()}"  # noqa: E731

    def useful(seq: int) -> list[str]:
        """The options, not already as `lighter` sets them, that lower this model's plan at `seq` (a MoE's expert
        blocks are not tiled; one example per row needs no packing mask)."""
        at = replace(options, max_seq_length=seq)
        best = plan(at, qcfg, hf_config)["train_peak_gb"]
        return [n for n in lighter if getattr(cfg, n) != lighter[n]
                and plan(replace(at, **{n: getattr(cfg, n)}), qcfg, hf_config)["train_peak_gb"] > best]

    if plan(options, qcfg, hf_config)["fits"]:
        names = useful(cfg.max_seq_length)
        for name in names:  # the cheapest single option that is enough
            if plan(replace(cfg, **{name: lighter[name]}), qcfg, hf_config)["fits"]:
                return f"fits with {flag(name)}"
        return "fits with " + " ".join(map(flag, names))
    seq = cfg.max_seq_length
    while seq > 1 and not plan(replace(options, max_seq_length=seq), qcfg, hf_config)["fits"]:
        seq //= 2
    if seq >= 1 and plan(replace(options, max_seq_length=seq), qcfg, hf_config)["fits"]:
        return f"fits with --max_seq_length {seq} " + " ".join(map(flag, useful(seq)))
    card = parse_size(cfg.gpu_memory)
    if plan(options, qcfg, hf_config)["quantized_weights_gb"] * 2**30 > card:
        return "does not fit at any sequence length: the weights alone exceed the card"
    rank = qcfg.rank
    while rank > 1 and not plan(replace(options, max_seq_length=1), replace(qcfg, rank=rank), hf_config)["fits"]:
        rank //= 2
    return (f"the adapters and their optimizer state do not fit: lower --rank (at most {rank} fits with short "
            "sequences) or adapt fewer weights (--target_modules)")


if __name__ == "__main__":
    sys.exit(main())
