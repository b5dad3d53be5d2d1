"""Run by torchrun in tests (2 CPU processes, gloo): each process prepares into a cache of its own, as each node's
main process does under multi-node torchrun, then loads that entry back. Writes what it found for the test.

    torchrun --nproc_per_node 2 tests/cache_rank_worker.py MODEL CACHE_PREFIX OUT
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from qmilora import QMiLoRAConfig, prepare_model

model_dir, prefix, out = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = QMiLoRAConfig(rank=4, lora_dropout=0.0, cache_dir=f"{prefix}{rank}", device="cpu")
ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
fresh = prepare_model(model_dir, cfg)
entries = [os.path.join(cfg.cache_dir, e) for e in os.listdir(cfg.cache_dir) if os.path.isdir(os.path.join(cfg.cache_dir, e, "base"))]
base_files = sorted(os.listdir(os.path.join(entries[0], "base"))) if entries else []
try:
    again = prepare_model(model_dir, cfg)
    with torch.no_grad():
        same = again.qmilora_stats.from_cache and torch.equal(fresh(input_ids=ids).logits, again(input_ids=ids).logits)
    error = ""
except Exception as e:  # noqa: BLE001 - reported to the test
    same, error = False, f"{type(e).__name__}: {e}"
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"base_files": base_files, "reloaded_same": bool(same), "error": error}, f)
dist.barrier()
dist.destroy_process_group()
