"""MoE adapters on the routed tokens (X·Aᵀ then ·Bᵀ, three grouped GEMMs) against adding s·B·A to each dequantized
expert stack (the previous grouped path), in one process on one prepared model: fwd+bwd step time, the bytes autograd
keeps, and the loss (equal). Activation checkpointing off, so the kept bytes are the whole step's.

    python benchmarks/moe_adapter.py                 # a CPU-sized Qwen3-MoE (32 experts, top 4), 1024 tokens
    python benchmarks/moe_adapter.py --tokens 2048 --repeat 6

Writes benchmarks/results/moe-adapter-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from common import table, write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=4, help="steps per path, alternating; the first of each is dropped")
    args = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    import qmilora.experts as experts
    from qmilora import QMiLoRAConfig, prepare_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as d:
        cfg = AutoConfig.for_model("qwen3_moe", hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                   num_experts=32, num_experts_per_tok=4, vocab_size=1000, max_position_embeddings=4096,
                                   tie_word_embeddings=False)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        model = prepare_model(d, QMiLoRAConfig(rank=args.rank, lora_dropout=0.0, prepared_cache=False)).train()
    model.gradient_checkpointing_disable()
    ids = torch.randint(0, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(1)).to(device)
    routed = experts._routable_lora
    paths = {"routed-tokens": routed, "stack-plus-BA": lambda lora, hidden: False}

    def step():
        model.zero_grad(set_to_none=True)
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, sum(kept.values()) / 2**20, loss.item()

    runs = {name: [] for name in paths}
    for i in range(args.repeat):
        for name in (list(paths) if i % 2 == 0 else list(paths)[::-1]):
            experts._routable_lora = paths[name]
            runs[name].append(step())
    experts._routable_lora = routed
    rows = [{"path": name, "step_s": statistics.median(r[0] for r in v[1:]), "kept_mb": v[-1][1], "loss": v[-1][2]}
            for name, v in runs.items()]
    rows[0]["speedup"] = rows[1]["step_s"] / rows[0]["step_s"]
    print(table(rows, ["path", "step_s", "kept_mb", "loss", "speedup"]))
    print("wrote", write(f"moe-adapter-{device}", rows, {"settings": vars(args),
                                                          "command": "python benchmarks/moe_adapter.py " + " ".join(sys.argv[1:])}))


if __name__ == "__main__":
    main()
