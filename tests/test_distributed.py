"""Data-parallel training with torchrun on CPU (gloo): two real processes, as the README documents."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from qmilora.cli.train import main

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
pytestmark = pytest.mark.slow


def flags(model, out, cache, batch, *extra):
    return ["--model", model, "--output_dir", str(out), "--cache_dir", cache, "--rank", "4", "--lora_dropout", "0",
            "--per_device_train_batch_size", str(batch), "--max_seq_length", "48", "--logging_steps", "1",
            "--learning_rate", "1e-2", "--disable_tqdm", "true", "--seed", "7", *extra]


def torchrun(args, tmp_path, **env):
    digests = tmp_path / "digests"
    digests.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, *args]
    return subprocess.run(cmd, capture_output=True, text=True, start_new_session=True, timeout=300,
                          env={**os.environ, "DIGEST_DIR": str(digests), **env})


def adapter(out, name="residual_adapter/adapter_model.safetensors"):
    """The adapter as trained (the top-level one is its rank-2r form for the original base)."""
    return load_file(os.path.join(out, name))


def losses(out, step):
    state = json.load(open(os.path.join(out, f"checkpoint-{step}", "trainer_state.json")))
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_two_processes_equal_one_with_the_same_global_batch(tiny_llm, tmp_path, cache):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()  # a first run into an empty folder
    common = ("--max_steps", "3", "--save_steps", "3")
    proc = torchrun(flags(tiny_llm, ddp, cache, 2, *common), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("qmilora-train: steps")]
    assert len(summaries) == 1 and "processes 2" in summaries[0], proc.stdout[-2000:]
    # every rank starts from the same bytes: 4-bit blocks, quantization constants and adapters
    digests = {p.name: p.read_text() for p in (tmp_path / "digests").iterdir()}
    assert sorted(digests) == ["rank0", "rank1"] and len(set(digests.values())) == 1
    meta = json.load(open(ddp / "qmilora.json"))
    assert meta["state"] == "complete" and meta["summary"]["processes"] == 2
    assert not [n for n in os.listdir(ddp) if n.startswith(".")]  # no temporaries left by a second writer
    state = json.load(open(ddp / "checkpoint-3" / "trainer_state.json"))
    assert meta["summary"]["tokens"] == state["num_input_tokens_seen"]  # gathered over both processes

    assert main(flags(tiny_llm, single, cache, 4, *common)) == 0
    a, b, init = adapter(ddp), adapter(single), adapter(ddp, "initial_adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        moved = (b[k] - init[k]).abs().max()
        assert moved > 0 and (a[k] - b[k]).abs().max() <= 1e-4 * moved, k
    assert losses(ddp, 3) == pytest.approx(losses(single, 3), rel=1e-5)


def test_resume_after_sigkill_of_every_process_matches_an_uninterrupted_run(tiny_llm, tmp_path, cache):
    common = ("--max_steps", "6", "--save_steps", "2")
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert torchrun(flags(tiny_llm, full, cache, 2, *common), tmp_path).returncode == 0
    proc = torchrun(flags(tiny_llm, killed, cache, 2, *common), tmp_path, KILL_AT="4")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (killed / "checkpoint-4" / ".complete").exists() and not (killed / "adapter_model.safetensors").exists()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(killed / "checkpoint-4"))
    proc = torchrun(flags(tiny_llm, killed, cache, 2, *common, "--resume_from_checkpoint", "true"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = adapter(full), adapter(killed)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6 * a[k].abs().max(), k
    assert losses(full, 6)[-2:] == pytest.approx(losses(killed, 6)[-2:], rel=1e-6)


def test_tiled_mlp_under_ddp_and_resume_matches_the_untiled_run(tiny_llm, tmp_path, cache):
    """--tiled_mlp (tiles of 8 tokens) with two processes, killed at step 4 and resumed: the same losses and adapter
    as the untiled two-process run."""
    common = ("--max_steps", "6", "--save_steps", "2")
    plain, tiled = tmp_path / "plain", tmp_path / "tiled"
    assert torchrun(flags(tiny_llm, plain, cache, 2, *common), tmp_path).returncode == 0
    proc = torchrun(flags(tiny_llm, tiled, cache, 2, *common, "--tiled_mlp", "true"), tmp_path, KILL_AT="4",
                    TILE_TOKENS="8")
    assert proc.returncode == -9, proc.stderr[-3000:]
    proc = torchrun(flags(tiny_llm, tiled, cache, 2, *common, "--tiled_mlp", "true", "--resume_from_checkpoint", "true"),
                    tmp_path, TILE_TOKENS="8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "position-wise blocks tiled over the sequence" in proc.stderr
    assert json.load(open(tiled / "qmilora.json"))["summary"]["tiled_mlp"] is True
    a, b = adapter(plain), adapter(tiled)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-4 * a[k].abs().max(), k
    assert losses(tiled, 6) == pytest.approx(losses(plain, 6), rel=1e-5)


def test_every_process_writes_a_whole_cache_entry(tiny_llm, tmp_path):
    """Multi-node torchrun: each node's main process prepares into its node's cache, but transformers'
    save_pretrained writes only on global rank 0 once torch.distributed is up (silently: an entry with an empty
    base that then failed to load, on every later run). Each process here writes its own entry and reloads it."""
    worker = os.path.join(os.path.dirname(__file__), "cache_rank_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, tiny_llm,
           str(tmp_path / "cache"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        found = json.load(open(tmp_path / f"rank{rank}.json"))
        assert "config.json" in found["base_files"] and any(f.endswith(".safetensors") for f in found["base_files"])
        assert found["reloaded_same"], found["error"]
