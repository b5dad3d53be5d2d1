"""qmilora-plan beside measured peaks: for each train/prepare result file given, the plan of the same shape and
settings, and measured / planned. The goal is within 10% (issue 15); the ratios calibrate the plan's activation
and logits terms.

    python benchmarks/plan_check.py results/train-llama2-7b-cuda.json results/prepare-llama2-7b-cuda.json

Writes benchmarks/results/plan-check-<device>.json.
"""
from __future__ import annotations

import json
import sys
import tempfile

from transformers import LlamaConfig

from common import SHAPES, table, write
from qmilora import QMiLoRAConfig
from qmilora.plan import PlanConfig, plan


def planned(shape: str, rank: int, seq: int, batch: int, compute_dtype: str, chunked: bool) -> dict:
    with tempfile.TemporaryDirectory() as d:
        LlamaConfig(**SHAPES[shape], tie_word_embeddings=False).save_pretrained(d)
        cfg = PlanConfig(model=d, max_seq_length=seq, per_device_train_batch_size=batch, chunked_loss=chunked)
        return plan(cfg, QMiLoRAConfig(rank=rank, compute_dtype=compute_dtype), LlamaConfig(**SHAPES[shape]))


def main() -> None:
    rows, device = [], "cpu"
    for path in sys.argv[1:]:
        result = json.load(open(path))
        st = result.get("settings", {})
        device = st.get("device", device)
        dtype = st.get("compute_dtype") or "bfloat16"
        for row in result["rows"]:
            # ratio rows, and variants the plan does not model (~cpu: the solver on the host, not on the device)
            if "/" in str(row.get("method")) or "~" in str(row.get("method")) or "peak_mb" not in row:
                continue
            if path.split("/")[-1].startswith("train") and row["method"].startswith("qmilora"):
                p = planned(st["shape"], st["rank"], st["seq"], st["batch"], dtype, row["method"] == "qmilora")
                key = "train_peak_gb"
            elif path.split("/")[-1].startswith("prepare") and row["method"].startswith("qmilora"):
                p = planned(st["shape"], st["rank"], 2048, 1, dtype, True)
                key = "prepare_peak_gb"
            else:
                continue
            # on a CPU the peak RSS includes the interpreter and libraries: compare the growth above them
            measured = (row.get("model_mb") if device == "cpu" and "model_mb" in row else row["peak_mb"]) / 1024
            rows.append({"file": path.split("/")[-1], "method": row["method"], "measured_gb": measured,
                         "planned_gb": p[key], "measured/planned": measured / p[key]})
    print(table(rows, ["file", "method", "measured_gb", "planned_gb", "measured/planned"]))
    print("wrote", write(f"plan-check-{device}", rows, {"sources": sys.argv[1:]}))


if __name__ == "__main__":
    main()
