"""qmilora-plan: expected peak GPU memory for preparing and training a model, from its config.json alone."""
from __future__ import annotations

import sys

from . import parse_flags, run
from ..config import QMiLoRAConfig
from ..plan import PlanConfig, plan


def main(argv: list[str] | None = None) -> int:
    def body():
        from transformers import AutoConfig

        from ..checkpoint import refuse_quantized_config, resolve_config

        cfg, qcfg = parse_flags("qmilora-plan", (PlanConfig, QMiLoRAConfig), sys.argv[1:] if argv is None else argv,
                                __doc__)
        hf_config = AutoConfig.from_pretrained(resolve_config(cfg.model))
        refuse_quantized_config(hf_config)
        p = plan(cfg, qcfg, hf_config)
        rows = [("4-bit weights + quant states + fp32 rest", p["quantized_weights_gb"]),
                ("adapters (fp32)", p["adapters_gb"]), ("adapter grads + optimizer state", p["grads_and_optimizer_gb"]),
                ("activations", p["activations_gb"]), ("logits", p["logits_gb"]),
                ("one weight's SVD workspace (prepare)", p["svd_workspace_gb"])]
        for label, gb in rows:
            print(f"{label:<42} {gb:8.2f} GB")
        print(f"{'peak while preparing':<42} {p['prepare_peak_gb']:8.2f} GB")
        print(f"{'peak while training':<42} {p['train_peak_gb']:8.2f} GB")
        verdict = "fits" if p["fits"] else "does NOT fit"
        per = f" per GPU, on each of {p['num_gpus']} (data parallel: {p['global_batch_tokens']:,} tokens per step)" \
            if p["num_gpus"] > 1 else ""
        print(f"{p['adapter_params']:,} trainable parameters; {verdict} in {p['gpu_gb']:.0f} GB{per}")

    return run("qmilora-plan", body)


if __name__ == "__main__":
    sys.exit(main())
