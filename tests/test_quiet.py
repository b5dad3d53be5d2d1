"""What commands print besides their results: one readable line per training log, one error line per job, no
deprecation noise from the libraries' interplay."""
import os
import subprocess
import sys
import types

import pytest

from qmilora import console
from qmilora.cli import run


def test_log_line_is_readable():
    state = types.SimpleNamespace(global_step=5, max_steps=75)
    logs = {"loss": 2.3141, "grad_norm": 0.4213, "learning_rate": 0.0002, "epoch": 0.0667, "num_input_tokens_seen": 912,
            "train_runtime": 19.7, "train_tokens_per_second": 46.21}
    assert console.line(state, logs) == "step 5/75  loss 2.314  grad_norm 0.4213  lr 0.0002  epoch 0.0667  input tokens/s 46.21"
    assert console.line(state, {"train_loss": 2.2, "train_runtime": 90.0}) is None  # the summary says it


def test_training_logs_are_lines(tiny_llm, tmp_path, capsys):
    from qmilora.cli.train import main

    assert main(["--model", tiny_llm, "--output_dir", str(tmp_path / "o"), "--rank", "4", "--max_steps", "2",
                 "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
                 "--cache_dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"] and all("  loss " in line for line in lines)
    assert "{'" not in out and "'tokens_per_second'" not in out


def test_an_input_error_is_printed_by_the_main_process_only(monkeypatch, capsys):
    from qmilora.config import QMiLoRAError

    def bad_input():
        raise QMiLoRAError("data file x.jsonl does not exist")

    def crash():
        raise RuntimeError("boom")

    monkeypatch.setenv("RANK", "1")
    assert run("qmilora-train", bad_input) == 1 and capsys.readouterr().err == ""
    assert run("qmilora-train", crash) == 1
    assert capsys.readouterr().err.startswith("qmilora-train: error (process 1): unexpected RuntimeError: boom")
    monkeypatch.setenv("RANK", "0")
    assert run("qmilora-train", bad_input) == 1
    assert capsys.readouterr().err == "qmilora-train: error: data file x.jsonl does not exist\n"


@pytest.mark.parametrize("how, says", [(["--fsdp", "full_shard"], "drop --fsdp"),
                                       ([], "without the FSDP accelerate config")])
def test_fsdp_refusal_names_what_the_user_did(how, says, tiny_llm, tmp_path, monkeypatch, capsys):
    from qmilora.cli.train import main

    if not how:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    assert main(["--model", tiny_llm, "--output_dir", str(tmp_path / "o"), *how]) == 1
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert ("drop --fsdp" in err) == bool(how)


@pytest.mark.slow
def test_loading_a_model_prints_no_deprecation(tiny_ckpt, tmp_path):
    """Even with every FutureWarning shown (-W always), building the PEFT model says nothing about
    is_gradient_checkpointing."""
    code = (f"from qmilora import prepare_model\nprepare_model({tiny_ckpt[0]!r}, rank=4, cache_dir={str(tmp_path)!r})\n"
            "print('prepared')")
    proc = subprocess.run([sys.executable, "-W", "always::FutureWarning", "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0 and "prepared" in proc.stdout, proc.stderr[-1000:]
    assert "is_gradient_checkpointing" not in proc.stderr


def test_a_command_prints_no_library_noise():
    """qmilora-plan, on its own process: nothing on stderr. bitsandbytes logs a missing optional Hub kernel when it
    is first imported on AVX512-BF16 CPUs (PEFT imports it, before qmilora.quantize): filtered in the package's
    __init__, ahead of every import (fails without it on such a CPU)."""
    proc = subprocess.run([sys.executable, "-m", "qmilora", "plan", "--model", "llama-3-8b"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and "fits in 24 GB" in proc.stdout
    assert proc.stderr == ""
