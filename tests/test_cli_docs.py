"""The documented commands stay true (README.md and docs/*.md), and the CPU thread defaults do what qmilora.cpu says."""
import json
import os
import re
import shlex

import pytest
import torch

from qmilora import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def doc_pages() -> list[str]:
    """README.md, then the docs/ pages in the order README links them, then any other page."""
    docs = os.path.join(ROOT, "docs")
    pages = sorted(os.path.join(d, f) for d, _, fs in os.walk(docs) for f in fs if f.endswith(".md"))
    linked = [os.path.normpath(os.path.join(ROOT, link)) for link in re.findall(r"\]\((docs/[^)#]+\.md)", open(README).read())]
    ordered = [p for p in dict.fromkeys(linked) if p in pages]
    return [README] + ordered + [p for p in pages if p not in ordered]


def doc_lines():
    """(argv, comment) of every command line in the documentation's bash blocks that runs a qmilora command."""
    found = []
    for page in doc_pages():
        for block in re.findall(r"```bash\n(.*?)```", open(page).read(), re.S):
            for line in block.splitlines():
                command, _, comment = line.partition("  #")
                for part in command.split("&&"):
                    argv = shlex.split(part.strip())
                    if any(a.startswith("qmilora") for a in argv):
                        found.append((argv, comment.strip()))
    return found


def doc_commands():
    """The qmilora command of each of those lines, as argv (a launcher's line, `torchrun ... qmilora-train ...`,
    from the qmilora command on)."""
    return [argv[next(i for i, a in enumerate(argv) if a.startswith("qmilora")):] for argv, _ in doc_lines()]


def test_docs_have_commands():
    verbs = {argv[0] if argv[0] != "qmilora" else f"qmilora-{argv[1]}" for argv in doc_commands()}
    assert {"qmilora-train", "qmilora-export", "qmilora-generate", "qmilora-eval", "qmilora-plan",
            "qmilora-inspect"} <= verbs


@pytest.mark.parametrize("argv", doc_commands(), ids=lambda a: " ".join(a)[:60])
def test_documented_command_flags_exist(argv, capsys):
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


def test_documented_files_exist():
    """Every file a documented command reads (examples/..., a --config) ships with the repository."""
    for argv in doc_commands():
        for a in argv:
            if a.startswith("examples/"):
                assert os.path.isfile(os.path.join(ROOT, a)), (a, argv)


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
    """A documented command, run on tiny inputs: the model is the tiny checkpoint (the demo model where none is
    named: it would take minutes), the rank fits it, training stops after one step; everything else stays as
    written. qmilora-plan runs exactly as written: it reads config.json only (shipped for the families it names)."""
    out = list(argv)
    verb = out[out.index("qmilora") + 1] if "qmilora" in out else next(a for a in out if a.startswith("qmilora-"))
    if verb.endswith("plan"):
        return out
    for i, a in enumerate(out[:-1]):
        if a == "--model":
            out[i + 1] = model
        if a == "--rank":
            out[i + 1] = "4"
    if verb.endswith(("train", "inspect")) and "--model" not in out:
        out += ["--model", model]
    if verb.endswith(("train", "inspect")) and "--rank" not in out:
        out += ["--rank", "4"]
    if verb.endswith("train"):
        out += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]
    if verb.endswith("generate"):
        out += ["--max_new_tokens", "4"]
    return out


@pytest.mark.slow
def test_documented_commands_run_as_written_on_tiny_inputs(tiny_llm, tmp_path, monkeypatch):
    """Every documented command runs, in the documentation's order, in one folder holding what a fresh clone holds
    (a user's session), on the tiny model. Left out: installs, and launches that need GPUs or several hosts. The
    quick start's demo run trains the tiny model (tests/test_demo.py runs the real one) into the folder that the
    lines after it use."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(os.path.join(ROOT, "examples"), tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "TQDM_DISABLE": "1"}
    ran = []
    for argv, comment in doc_lines():
        if argv[0] in ("python", "pip"):
            continue
        if argv[0] in ("accelerate", "torchrun") and "CPU" not in comment:
            continue  # needs several GPUs or hosts
        argv = tiny_inputs(argv, tiny_llm)
        if argv[0] == "torchrun":
            argv = [os.path.join(bin_dir, "torchrun"), *argv[1:]]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        for noise in ("is_gradient_checkpointing` is deprecated", "find_unused_parameters=True", "{'loss'"):
            assert noise not in proc.stderr + proc.stdout, (argv, noise)
        ran.append(argv[0].rsplit("/", 1)[-1] + (" " + argv[1] if argv[0] == "qmilora" else ""))
    assert {"qmilora-train", "qmilora train", "qmilora-export", "qmilora-generate", "qmilora-eval", "qmilora-plan",
            "qmilora-inspect", "torchrun"} <= set(ran), ran
    assert list(tmp_path.glob("out-*lora*/adapter_config.json")) and (tmp_path / "report").is_dir()
    assert json.load(open(tmp_path / "out-cpu2" / "qmilora.json"))["summary"]["processes"] == 2
    # recorded absolute, so that a resume or an export from another folder reads the same file
    assert json.load(open(tmp_path / "out-recipe" / "qmilora.json"))["data"]["data"] == str(tmp_path / "examples" /
                                                                                            "chat.jsonl")
    assert (tmp_path / "qmilora-demo" / "qmilora.json").exists()


def test_documented_links_resolve():
    """Every relative link of README.md and docs/ names a file of the repository."""
    for page in doc_pages():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", open(page).read()):
            if "://" not in target:
                assert os.path.exists(os.path.normpath(os.path.join(os.path.dirname(page), target))), (page, target)


def test_user_docs_name_no_internal_issue_numbers():
    for page in doc_pages():
        assert not re.search(r"\bissue \d+|\(issue|issue \d+'s", open(page).read(), re.I), page


def test_thread_choice_says_why(monkeypatch):
    monkeypatch.delenv("QMILORA_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cpu, "available_cores", lambda: 4)
    monkeypatch.setattr(cpu, "busy_cores", lambda: 3.0)
    assert cpu.choose(None) == (1, "4 cores, 3 runnable threads of other processes at start")
    assert cpu.choose(2) == (2, "asked for (--threads)")
    assert cpu.choose(1000) == (1000, "asked for (--threads), more than the 4 cores here: expect it to be slower")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu.choose(None) == (2, "4 cores shared by the 2 processes started on this machine")
    monkeypatch.setenv("QMILORA_THREADS", "3")
    assert cpu.choose(None) == (3, "set by QMILORA_THREADS")
    monkeypatch.setenv("QMILORA_THREADS", "0")
    with pytest.raises(ValueError, match="QMILORA_THREADS"):
        cpu.choose(None)


def test_minor_split_applies_the_thread_policy(monkeypatch):
    """The public minor_split limits both pools itself (one thread for a small weight), and restores the caller's."""
    from threadpoolctl import threadpool_info

    from qmilora import decompose

    seen = []
    real = decompose._minor_gram

    def spy(weight, rank):
        seen.append((torch.get_num_threads(), {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}))
        return real(weight, rank)

    monkeypatch.setattr(decompose, "_minor_gram", spy)
    torch.set_num_threads(2)
    decompose.minor_split(torch.randn(96, 64), 4)
    assert seen == [(1, {1})] and torch.get_num_threads() == 2
    monkeypatch.setattr(cpu, "SOLVER_PARALLEL_MIN", 32)  # a "large" weight: the chosen count
    decompose.minor_split(torch.randn(96, 64), 4, threads=2)
    assert seen[-1][0] == 2


def test_training_records_the_thread_choice(tiny_llm, tmp_path, capsys):
    from qmilora.cli.train import main

    out = tmp_path / "out"
    assert main(["--model", tiny_llm, "--output_dir", str(out), "--rank", "4", "--max_steps", "1", "--threads", "1",
                 "--save_strategy", "no", "--disable_tqdm", "true", "--cache_dir", str(tmp_path / "c")]) == 0
    summary = json.load(open(out / "qmilora.json"))["summary"]
    assert (summary["threads"], summary["threads_reason"]) == (1, "asked for (--threads)")
    assert "threads 1, threads_reason asked for (--threads)" in capsys.readouterr().out
