import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qmilora.export as export
from qmilora.cli.eval import main as eval_main
from qmilora.cli.export import main as export_main
from qmilora.cli.generate import main as generate_main
from qmilora.cli.train import main as train_main

from conftest import save_tiny

IDS = torch.tensor([[3, 10, 7, 34, 12, 41, 9, 4, 20, 30]])


@pytest.fixture(scope="module")
def trained(tiny_llm, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    cache = str(tmp_path_factory.mktemp("cache"))
    rc = train_main(["--model", tiny_llm, "--output_dir", str(out), "--cache_dir", cache, "--rank", "4",
                     "--lora_alpha", "8", "--max_steps", "5", "--learning_rate", "5e-2", "--max_seq_length", "48",
                     "--disable_tqdm", "true", "--save_strategy", "no"])
    assert rc == 0
    return str(out)


def reference_logits(tiny_llm, run_dir):
    """float64: W + s·(B A − B₀ A₀) on every target of the original weights."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float64).eval()
    cfg = json.load(open(os.path.join(run_dir, "adapter_config.json")))
    s = cfg["lora_alpha"] / cfg["r"]
    trained = load_file(os.path.join(run_dir, "adapter_model.safetensors"))
    initial = load_file(os.path.join(run_dir, "initial_adapter", "adapter_model.safetensors"))
    moved = 0
    for name in trained:
        if ".lora_A." not in name:
            continue
        layer = name.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = name.replace("lora_A", "lora_B")
        delta = trained[b].double() @ trained[name].double() - initial[b].double() @ initial[name].double()
        moved += delta.abs().max() > 1e-4
        model.get_submodule(layer).weight.data += s * delta
    assert moved == 14  # training changed every layer, so the checks below are not vacuous
    with torch.no_grad():
        return model(IDS).logits


def test_lora_export_loads_in_plain_peft_and_matches_float64(trained, tiny_llm, tmp_path):
    out = tmp_path / "lora"
    assert export_main(["--adapter", trained, "--to", "lora", "--output", str(out)]) == 0
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    base = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(IDS).logits
        model = PeftModel.from_pretrained(base, str(out)).eval()
        got = model(IDS).logits
    ref = reference_logits(tiny_llm, trained)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    assert (plain.double() - ref).abs().max() > 1e-3


def test_residual_model_with_trained_adapter_matches_float64(trained, tiny_llm, tmp_path):
    from qmilora.train import load_trained

    model = load_trained(trained, quantize=False, lora_dropout=0.0, cache_dir=str(tmp_path)).eval()
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    torch.testing.assert_close(got.double(), reference_logits(tiny_llm, trained), atol=2e-5, rtol=1e-5)


def test_merged_export_is_a_plain_checkpoint(trained, tiny_llm, tmp_path):
    out = tmp_path / "merged"
    assert export_main(["--adapter", trained, "--to", "merged", "--output", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got.double(), reference_logits(tiny_llm, trained), atol=2e-5, rtol=1e-5)
    src = {k: v for f in os.listdir(tiny_llm) if f.endswith(".safetensors") for k, v in load_file(os.path.join(tiny_llm, f)).items()}
    dst = {k: v for f in os.listdir(out) if f.endswith(".safetensors") for k, v in load_file(out / f).items()}
    assert src.keys() == dst.keys()
    assert torch.equal(src["model.embed_tokens.weight"], dst["model.embed_tokens.weight"])
    assert not torch.equal(src["model.layers.0.mlp.down_proj.weight"], dst["model.layers.0.mlp.down_proj.weight"])
    assert (out / "tokenizer.json").exists()


def test_export_refuses_bad_inputs(trained, tmp_path, capsys):
    other = tmp_path / "other"
    save_tiny(other, seed=1, vocab_size=251, hidden_size=32, intermediate_size=64, num_attention_heads=2,
              num_key_value_heads=1)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    cases = [
        (["--adapter", str(tmp_path), "--output", str(tmp_path / "o")], "no qmilora.json"),
        (["--adapter", trained, "--model", str(other), "--output", str(tmp_path / "o")], "content differs"),
        (["--adapter", trained, "--output", str(full)], "exists and is not empty"),
        (["--adapter", trained, "--output", str(tmp_path / "o"), "--to", "gguf"], "invalid choice"),
    ]
    for argv, message in cases:
        try:
            rc = export_main(argv)
        except SystemExit as exit_:  # argparse's own one-line error for a bad choice
            rc = exit_.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and message in err[-1], (argv, err)
    assert (full / "x").read_text() == "keep me" and not (tmp_path / "o").exists()


def test_interrupted_export_leaves_no_output(trained, tmp_path, monkeypatch):
    calls = []

    def failing_save(*a, **k):
        calls.append(a)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        export.to_merged(trained, str(tmp_path / "m"))
    assert calls and not (tmp_path / "m").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".m.tmp")] == []


def test_generate_and_eval(trained, tmp_path, capsys):
    from transformers import AutoTokenizer

    from qmilora.train import load_trained

    tok = AutoTokenizer.from_pretrained(trained)
    model = load_trained(trained, lora_dropout=0.0).eval()
    prompt = "What is 3 + 4?"
    # greedy decoding by hand, from the trained model's logits: what qmilora-generate must print
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        for _ in range(5):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if nxt == tok.eos_token_id:
                break
    expected = tok.decode(ids[0, n:], skip_special_tokens=True).strip()
    capsys.readouterr()
    assert generate_main(["--adapter", trained, "--prompt", prompt, "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == expected

    data = tmp_path / "held.jsonl"
    data.write_text(json.dumps({"instruction": "What is 3 + 4?", "output": "3 + 4 = 7."}) + "\n")
    assert eval_main(["--adapter", trained, "--data", str(data)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 1 and result["loss"] > 0 and result["base_loss"] > 0
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    # the same example's loss from transformers' own loss (mean over labelled tokens), independently of mean_loss
    from qmilora.data import DataConfig, build_dataset

    meta = json.load(open(os.path.join(trained, "qmilora.json")))
    rows, _, _ = build_dataset(DataConfig(**{**meta["data"], "data": str(data), "val_size": 0.0, "packing": False}), tok)
    row = {k: torch.tensor([v]) for k, v in rows[0].items() if k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        assert result["loss"] == pytest.approx(model(**row).loss.item(), rel=1e-4)
