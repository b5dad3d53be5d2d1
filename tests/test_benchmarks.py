"""The benchmark scripts run end to end at tiny shapes on CPU (the same scripts take 7B/13B shapes on a GPU)."""
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.parametrize("script, args, rows", [
    ("train.py", ["--shape", "tiny", "--seq", "32", "--steps", "2", "--warmup", "1", "--rank", "8"], 3),
    ("prepare.py", ["--shape", "tiny", "--rank", "8"], 3),
    ("decompose.py", ["--shapes", "96x64", "--rank", "8", "--repeat", "1", "--model", "128,256,2"], 1),
])
def test_benchmark_runs(tmp_path, script, args, rows):
    env = {**os.environ, "QMILORA_BENCH_RESULTS": str(tmp_path), "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=BENCH, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = [json.load(open(tmp_path / f)) for f in os.listdir(tmp_path)]
    assert len(result["rows"]) == rows and result["machine"]["torch"] and result["machine"]["command"]
    assert "| " in out.stdout  # the markdown table
