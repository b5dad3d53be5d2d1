"""benchmarks/export_fidelity.py runs end to end on a tiny run and records what the docs' table needs."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a subprocess that imports the stack again

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_export_fidelity_benchmark_runs(tiny_llm, tmp_path):
    from qmilora.cli.train import main as train_main

    run = tmp_path / "run"
    assert train_main(["--model", tiny_llm, "--output_dir", str(run), "--cache_dir", str(tmp_path / "c"), "--rank", "4",
                       "--max_steps", "3", "--learning_rate", "5e-2", "--max_seq_length", "48", "--val_size", "4",
                       "--save_strategy", "no", "--disable_tqdm", "true"]) == 0
    env = {**os.environ, "QMILORA_BENCH_RESULTS": str(tmp_path), "TQDM_DISABLE": "1", "QMILORA_CACHE": str(tmp_path / "c")}
    out = subprocess.run([sys.executable, os.path.join(BENCH, "export_fidelity.py"), "--run", str(run), "--name", "ef",
                          "--rows", "4", "--train_rows", "4", "--correction_ranks", "2", "32"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.load(open(tmp_path / "ef.json"))
    rows = {r["artifact"]: r for r in result["rows"]}
    assert result["machine"]["commit"] and result["machine"]["command"] and result["eval_tokens"] > 0
    assert rows["--to merged (float32)"]["top1_agreement"] == 1.0
    full = next(r for r in result["rows"] if "--correction_rank 32" in r["artifact"])  # the widest layer's min(out, in)
    assert full["top1_agreement"] == 1.0 and abs(full["loss_vs_trained"]) < 1e-4  # all of the error: the trained model
