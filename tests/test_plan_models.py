"""qmilora-plan by family name, offline: the shipped config.json files describe the real models, and the plan never
waits on a Hub it cannot reach."""
import glob
import os
import shutil

import pytest
from transformers import AutoConfig

from qmilora import configs
from qmilora.cli.plan import main as plan_main
from qmilora.plan import count

# parameter counts the model cards publish (all parameters, embeddings and head included)
PUBLISHED = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-3-8b": 8_030_261_248,
             "mistral-7b": 7_241_732_096, "qwen2.5-7b": 7_615_616_512, "qwen3-30b-a3b": 30_532_122_624,
             "gpt-oss-20b": 20_914_757_184}


def test_every_shipped_family_is_listed_and_named_in_help():
    shipped = {os.path.basename(f)[:-5] for f in glob.glob(os.path.join(configs.HERE, "*.json"))}
    assert shipped == set(configs.FAMILIES.values()) == set(PUBLISHED)
    from qmilora.plan import PlanConfig

    help_text = PlanConfig.__dataclass_fields__["model"].metadata["help"]
    assert all(name in help_text for name in shipped)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_config_is_the_real_model(name):
    """Built on meta from the shipped file, each family has exactly its published parameter count."""
    hf = AutoConfig.from_pretrained(configs.shipped(name))
    assert count(hf, ["all-linear"], 8)["total_params"] == PUBLISHED[name]


def no_network(monkeypatch):
    import socket

    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket, "create_connection", refuse)
    real = huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: real(*a, **k) if k.get("local_files_only") else refuse())


@pytest.mark.parametrize("model", ["meta-llama/Llama-2-13b-hf", "Llama-2-13b-hf", "LLAMA-2-13B"])
def test_plan_by_name_offline(model, monkeypatch, capsys):
    no_network(monkeypatch)
    assert plan_main(["--model", model, "--rank", "64"]) == 0
    out = capsys.readouterr().out
    assert "shipped with qmilora for llama-2-13b" in out and "peak while training" in out


def test_plan_reads_a_config_file_or_directory(tmp_path, capsys):
    shutil.copy(configs.shipped("llama-2-7b"), tmp_path / "mine.json")
    assert plan_main(["--model", str(tmp_path / "mine.json")]) == 0
    by_file = capsys.readouterr().out
    shutil.copy(configs.shipped("llama-2-7b"), tmp_path / "config.json")
    assert plan_main(["--model", str(tmp_path)]) == 0
    assert capsys.readouterr().out == by_file and "shipped" not in by_file
    assert plan_main(["--model", str(tmp_path), "--gradient_checkpointing", "false"]) == 0  # the older name
    no_ckpt = capsys.readouterr().out
    assert plan_main(["--model", str(tmp_path), "--activation_checkpointing", "false"]) == 0
    assert capsys.readouterr().out == no_ckpt != by_file


@pytest.mark.parametrize("offline", [True, False])
def test_unreachable_hub_is_one_line_at_once(offline, monkeypatch, capsys):
    """Not a family, not cached, and the Hub out of reach: one line naming what works instead, no retries."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(configs, "_reachable", lambda endpoint: False)
    no_network(monkeypatch)
    t0 = time.perf_counter()
    assert plan_main(["--model", "some-org/not-shipped-7b"]) == 1
    assert time.perf_counter() - t0 < 20  # retries would sleep 1+2+4+8+8 s
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "not reachable" in captured.err and "llama-2-13b" in captured.err
    assert captured.err.startswith("qmilora-plan: error: ")


@pytest.mark.parametrize("model, says", [("./missing", "does not exist"), ("missing.json", "does not exist")])
def test_bad_model_paths(model, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert plan_main(["--model", model]) == 1
    assert says in capsys.readouterr().err
    assert plan_main(["--model", str(tmp_path)]) == 1
    assert "has no config.json" in capsys.readouterr().err
