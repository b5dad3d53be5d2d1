"""README's commands stay true, and the CPU thread defaults do what qmilora.cpu says."""
import json
import os
import re
import shlex

import pytest
import torch

from qmilora import cpu

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_lines():
    """(argv, comment) of every command line in README's bash blocks that runs a qmilora command."""
    text = open(README).read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            command, _, comment = line.partition("  #")
            for part in command.split("&&"):
                argv = shlex.split(part.strip())
                if any(a.startswith("qmilora") for a in argv):
                    found.append((argv, comment.strip()))
    return found


def readme_commands():
    """The qmilora command of each of those lines, as argv (a launcher's line, `torchrun ... qmilora-train ...`,
    from the qmilora command on)."""
    return [argv[next(i for i, a in enumerate(argv) if a.startswith("qmilora")):] for argv, _ in readme_lines()]


def test_readme_has_commands():
    verbs = {argv[0] if argv[0] != "qmilora" else f"qmilora-{argv[1]}" for argv in readme_commands()}
    assert {"qmilora-train", "qmilora-export", "qmilora-generate", "qmilora-eval", "qmilora-plan",
            "qmilora-inspect"} <= verbs


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_flags_exist(argv, capsys):
    """Each documented command names a real entry point and only flags its --help lists."""
    from qmilora.cli.main import VERBS, main

    verb = argv[1] if argv[0] == "qmilora" else argv[0].removeprefix("qmilora-")
    assert verb in VERBS, argv
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (a.split("=")[0] for a in argv if a.startswith("--") and a != "--config"):
        assert re.search(rf"(^|\s|\[){re.escape(flag)}(\s|,|$|\])", help_text, re.M), (flag, argv)


def test_solver_pools_are_limited_together():
    from threadpoolctl import threadpool_info

    torch.set_num_threads(2)
    with cpu.solver_limits((576, 1536), threads=2) as n:
        assert n == 1 and torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert torch.get_num_threads() == 2
    with cpu.solver_limits((4096, 4096), threads=2) as n:
        assert n == 2


def test_thread_count_resolution(monkeypatch):
    monkeypatch.setenv("QMILORA_THREADS", "3")
    assert cpu.resolve(None) == 3 and cpu.resolve(1) == 1
    monkeypatch.setenv("QMILORA_THREADS", "x")
    with pytest.raises(ValueError, match="QMILORA_THREADS"):
        cpu.resolve(None)
    monkeypatch.delenv("QMILORA_THREADS")
    monkeypatch.setattr(cpu, "busy_cores", lambda: cpu.available_cores() + 5.0)
    assert cpu.resolve(None) == 1  # a fully busy machine: one thread
    monkeypatch.setattr(cpu, "busy_cores", lambda: 0.0)
    assert cpu.resolve(None) == cpu.available_cores()
    assert cpu.busy_cores() >= 0


def test_prepare_restores_the_callers_threads(tiny_ckpt, tmp_path):
    from qmilora import prepare_model

    torch.set_num_threads(2)
    prepare_model(tiny_ckpt[0], rank=4, threads=1, cache_dir=str(tmp_path))
    assert torch.get_num_threads() == 2


def tiny_inputs(argv, model):
    """A README command, run on tiny inputs: the model is the tiny checkpoint, the rank fits it, training stops
    after one step; everything else stays as documented."""
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a == "--model":
            out[i + 1] = model
        if a == "--rank":
            out[i + 1] = "4"
    verb = out[out.index("qmilora") + 1] if "qmilora" in out else next(a for a in out if a.startswith("qmilora-"))
    if verb.endswith(("train", "plan", "inspect")) and "--rank" not in out and "--config" not in out:
        out += ["--rank", "4"]
    if verb.endswith("train"):
        out += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]
    if verb.endswith("generate"):
        out += ["--max_new_tokens", "4"]
    return out


@pytest.mark.slow
def test_readme_commands_run_as_written_on_tiny_inputs(tiny_llm, tmp_path, monkeypatch):
    """Every README command runs, in README's order, in one folder (a user's session), on the tiny model. Left
    out: the quick start's demo run (tests/test_demo.py runs it) and launches that need GPUs or several hosts."""
    import shutil
    import subprocess
    import sys

    from qmilora.data import BUNDLED

    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "heldout.jsonl"):
        shutil.copy(BUNDLED, name)
    (tmp_path / "run.yaml").write_text(f"model: {tiny_llm}\noutput_dir: out-yaml\nrank: 4\n")
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "TQDM_DISABLE": "1",
           "QMILORA_CACHE": str(tmp_path / "cache")}
    ran = []
    for argv, comment in readme_lines():
        if argv[0] == "python" or "--output_dir qmilora-demo" in " ".join(argv):
            continue
        if argv[0] in ("accelerate", "torchrun") and "CPU" not in comment:
            continue  # needs several GPUs or hosts
        if argv[0] == "qmilora" and argv[1] == "train":  # `--model ... --data ...` placeholders
            argv = ["qmilora", "train", "--model", "...", "--data", "train.jsonl", "--output_dir", "out-verb"]
        argv = tiny_inputs(argv, tiny_llm)
        if argv[0] == "torchrun":
            argv = [os.path.join(bin_dir, "torchrun"), *argv[1:]]
            argv[argv.index("--output_dir") + 1] = "out-ddp"
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        ran.append(argv[0].rsplit("/", 1)[-1] + (" " + argv[1] if argv[0] == "qmilora" else ""))
    assert {"qmilora-train", "qmilora train", "qmilora-export", "qmilora-generate", "qmilora-eval", "qmilora-plan",
            "qmilora-inspect", "torchrun"} <= set(ran), ran
    assert (tmp_path / "out-lora" / "adapter_config.json").exists() and (tmp_path / "report").is_dir()
    assert json.load(open(tmp_path / "out-ddp" / "qmilora.json"))["summary"]["processes"] == 2
