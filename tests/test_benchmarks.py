"""The benchmark scripts run end to end at tiny shapes on CPU (the same scripts take 7B/13B shapes on a GPU)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses that each import the stack again

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_gpu_suite_runs_at_tiny_shapes_on_cpu(tmp_path):
    """benchmarks/gpu_suite.sh --tiny: every GPU-suite step (solver, preparation, training, plan check) at tiny
    shapes, so the suite a GPU session runs cannot rot."""
    # the suite's deadline (520 s) budgets a GPU session; on a loaded CPU it would skip steps: only the test's own
    # timeout below bounds this run
    env = {**os.environ, "QMILORA_BENCH_RESULTS": str(tmp_path), "TQDM_DISABLE": "1", "QMILORA_GPU_BUDGET_S": "1150",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = subprocess.run(["bash", os.path.join(BENCH, "gpu_suite.sh"), "--tiny"], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {f: json.load(open(tmp_path / f)) for f in os.listdir(tmp_path)}
    assert set(results) == {"cli-smoke-cpu.json", "decompose-cpu.json", "prepare-tiny-cpu.json", "train-tiny-cpu.json",
                            "train-tinymoe-cpu.json", "plan-check-cpu.json"}, sorted(results)
    for name, result in results.items():
        assert result["rows"] and result["machine"]["torch"] and result["machine"]["command"], name
    for name in ("train-tiny-cpu.json", "train-tinymoe-cpu.json"):
        methods = [r["method"] for r in results[name]["rows"]]
        assert methods[:3] == ["qlora", "qmilora-model-loss", "qmilora"], name
    assert {r["method"] for r in results["plan-check-cpu.json"]["rows"]} == {"qmilora", "qmilora-model-loss",
                                                                          "qmilora-auto"}
    assert out.stdout.count("| ") > 10 and "FAILED" not in out.stdout and "SKIPPED" not in out.stdout


def test_quality_runs(tmp_path, tiny_llm):
    """quality.py end to end on the tiny chat Llama: three methods, one seed, two steps, pydoc text only."""
    env = {**os.environ, "QMILORA_BENCH_RESULTS": str(tmp_path), "TQDM_DISABLE": "1"}
    args = ["--model", tiny_llm, "--methods", "qlora,qmilora,qpissa", "--seeds", "0", "--steps", "2", "--batch", "2",
            "--rank", "4", "--train_rows", "8", "--test_rows", "4", "--text", "pydoc", "--windows", "2", "--tag", "t",
            "--threads", "1"]
    out = subprocess.run([sys.executable, os.path.join(BENCH, "quality.py"), *args], cwd=BENCH, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.load(open(tmp_path / "quality-t.json"))
    assert [r["method"] for r in result["rows"]] == ["qlora", "qmilora", "qpissa"]
    assert all(r["base_4bit_layers"].split("/")[0] == r["base_4bit_layers"].split("/")[1] != "0" for r in result["rows"])
    assert [a["method"] for a in result["summary"]] == ["qlora", "qmilora", "qpissa"]
    assert result["base"]["ppl_pydoc"] > 1 and result["machine"]["command"]
    assert "| qpissa |" in out.stdout and (tmp_path / "quality-t.png").is_file()
    # --combine pools result files (seeds run in parallel processes) without training
    out = subprocess.run([sys.executable, os.path.join(BENCH, "quality.py"), "--combine", str(tmp_path / "quality-t.json"),
                          str(tmp_path / "quality-t.json"), "--tag", "both"], cwd=BENCH, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    both = json.load(open(tmp_path / "quality-both.json"))
    assert len(both["rows"]) == 6 and [a["seeds"] for a in both["summary"]] == [2, 2, 2] and both["complete"]


def test_init_gap_runs(tmp_path, tiny_llm):
    env = {**os.environ, "QMILORA_BENCH_RESULTS": str(tmp_path), "TQDM_DISABLE": "1"}
    args = ["--model", tiny_llm, "--rank", "4", "--text", "pydoc", "--windows", "2", "--calibration_samples", "4",
            "--variants", "qlora,qmilora,dither,qmilora-cal", "--tag", "t"]
    out = subprocess.run([sys.executable, os.path.join(BENCH, "init_gap.py"), *args], cwd=BENCH, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.load(open(tmp_path / "t.json"))
    assert [r["variant"] for r in result["rows"]] == ["fp32", "qlora", "qmilora", "dither", "qmilora-cal"]
    errors = {r["variant"]: r for r in result["output_error_vs_qlora"]}
    # calibrated rounding lowers the calibration-weighted output error of every projection type
    assert all(errors["qmilora-cal"][t] < errors["qmilora"][t] for t in ("q_proj", "v_proj", "down_proj"))



def test_quality_tasks_split_disjoint_and_fixed():
    """Each quality.py task: a test set independent of the training-set size and the seed, disjoint from training,
    answers that fit the decoding budget; the bundled task covers every skill of the bundled data."""
    sys.path.insert(0, BENCH)
    try:
        import quality
    finally:
        sys.path.remove(BENCH)
    from transformers import AutoTokenizer

    from qmilora.demo import demo_model_dir

    tok = AutoTokenizer.from_pretrained(demo_model_dir())
    for task in quality.TASKS.values():
        train, test = task.rows(160, 80)
        assert len(train) == 160 and len(test) == 80 and task.rows(40, 80)[1] == test
        key = lambda r: r["messages"][0]["content"]  # noqa: E731
        assert not {key(r) for r in train} & {key(r) for r in test}, task.id
        answers = [r["messages"][1]["content"] for r in train + test]
        assert max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers) < task.max_new_tokens
    _, test = quality.TASKS["bundled"].rows(160, 80)
    skills = {r["messages"][0]["content"].split("\n")[0].split()[0] for r in test}
    assert skills == {"What", "Sort", "Spell", "Which"}
    with pytest.raises(SystemExit, match="too many"):
        quality.TASKS["bundled"].rows(160, 100)


def test_speed_runs(tmp_path):
    """speed.py end to end on CPU at the tiny shape: a warm-up that prepares, the qmilora-train default, one option
    flipped, and the QLoRA baseline, each in its own process; both sides train on the same supervised tokens. With
    --gpu_cap the rows run qmilora-train's main under the cap (a no-op without CUDA)."""
    env = {**os.environ, "QMILORA_BENCH_RESULTS": str(tmp_path), "TQDM_DISABLE": "1"}
    args = ["--shape", "tiny", "--seq", "32", "--steps", "2", "--batch", "2", "--rank", "4", "--repeat", "1",
            "--options", "chunked_loss", "--gpu_cap", "23"]
    out = subprocess.run([sys.executable, os.path.join(BENCH, "speed.py"), *args], cwd=BENCH, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.load(open(tmp_path / "speed-tiny-cpu.json"))
    assert [r["row"] for r in result["rows"]] == ["default", "chunked_loss=false", "qlora"]
    runs = {r["row"]: r for r in result["runs"]}
    assert all(r["rc"] == 0 and r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 for r in runs.values()), runs
    assert runs["default"]["loss"] == "chunked" and runs["chunked_loss=false"]["loss"] == "model"
    assert "--chunked_loss false" in runs["chunked_loss=false"]["command"]
    assert "--child qlora" in runs["qlora"]["command"]
    assert "--child train" in runs["default"]["command"] and result["settings"]["gpu_cap_gib"] == 23
    assert runs["qlora"]["supervised_tokens"] == runs["default"]["supervised_tokens"] > 0  # the same batches
    assert runs["qlora"]["packing"] == runs["default"]["packing"] is not None
    assert result["rows"][2]["speed_vs_qlora"] == 1 and result["rows"][0]["speed_vs_default"] == 1
    assert result["machine"]["commit"] and result["machine"]["torch"] and result["machine"]["peft"]
    assert "| qlora |" in out.stdout
