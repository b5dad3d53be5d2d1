"""README's commands stay true, and the CPU thread defaults do what qmilora.cpu says."""
import os
import re
import shlex

import pytest
import torch

from qmilora import cpu

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_commands():
    """Every `qmilora...` line inside README's bash blocks, as argv lists (comments dropped); a launcher's line
    (`torchrun ... qmilora-train ...`) from the qmilora command on."""
    text = open(README).read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                argv = shlex.split(part.strip())
                start = next((i for i, a in enumerate(argv) if a.startswith("qmilora")), None)
                if start is not None:
                    lines.append(argv[start:])
    return lines


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
