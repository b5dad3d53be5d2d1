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
                     "--disable_tqdm", "true", "--save_steps", "5"])
    assert rc == 0
    return str(out)


def reference_logits(tiny_llm, run_dir):
    """float64: W + s·(B A − B₀ A₀) on every target of the original weights."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float64).eval()
    cfg = json.load(open(os.path.join(run_dir, "residual_adapter", "adapter_config.json")))
    s = cfg["lora_alpha"] / cfg["r"]
    trained = load_file(os.path.join(run_dir, "residual_adapter", "adapter_model.safetensors"))
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


def test_original_lora_export_loads_in_plain_peft_and_matches_float64(trained, tiny_llm, tmp_path):
    out = tmp_path / "lora"
    assert export_main(["--adapter", trained, "--to", "original-lora", "--output", str(out)]) == 0
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


def test_original_merged_export_is_a_plain_checkpoint(trained, tiny_llm, tmp_path):
    out = tmp_path / "merged"
    assert export_main(["--adapter", trained, "--to", "original-merged", "--output", str(out)]) == 0
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
        (["--adapter", str(full), "--output", str(tmp_path / "o"), "--to", "merged"], "no qmilora.json"),
        (["--adapter", trained, "--model", str(other), "--output", str(tmp_path / "o"), "--to", "original-lora"],
         "content differs"),
        (["--adapter", trained, "--model", str(other), "--output", str(tmp_path / "o"), "--to", "merged"],
         "content differs"),
        (["--adapter", trained, "--output", str(full), "--to", "merged"], "exists and is not empty"),
        (["--adapter", trained, "--output", str(tmp_path / "o"), "--to", "gguf"], "invalid choice"),
        (["--adapter", trained, "--output", str(tmp_path / "o"), "--to", "lora"], "is now --to original-lora"),
        (["--adapter", trained, "--output", str(tmp_path / "o")], "required"),
        (["--adapter", trained, "--output", str(tmp_path / "o"), "--to", "original-lora", "--dtype", "float32"],
         "applies to --to merged only"),
        (["--adapter", trained, "--output", str(tmp_path / "o"), "--to", "merged", "--dtype", "int4"],
         "invalid choice"),
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
        export.to_original_merged(trained, str(tmp_path / "m"))
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


def trained_reference(run_dir, tiny_llm):
    """float64: what the trained model multiplies with, NF4-dequantized residual (+ s·B A where adapted) in every
    4-bit layer, as (model with those weights, model with the residuals only)."""
    from qmilora import quantize
    from qmilora.interop import lora_layers
    from qmilora.train import load_trained

    trained = load_trained(run_dir, lora_dropout=0.0)
    loras = lora_layers(trained)
    full, residual = (AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float64).eval() for _ in range(2))
    layers = 0
    for name, module in trained.get_base_model().named_modules():
        if quantize.is_4bit_linear(module):
            owner = name.removesuffix(".base_layer")
            w = quantize.dequantize(module.weight, torch.float32).double()
            residual.get_submodule(owner).weight.data = w.clone()
            if owner in loras:
                lora = loras[owner]
                w += lora.scaling["default"] * (lora.lora_B["default"].weight.double() @
                                                lora.lora_A["default"].weight.double())
            full.get_submodule(owner).weight.data = w
            layers += 1
    assert layers == 14 and len(loras) == 14
    return trained, full, residual


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def test_merged_export_is_the_trained_model(trained, tiny_llm, tmp_path, capsys):
    """--to merged: the dequantized NF4 residual plus s·B A; its logits equal load_trained's (float32: to rounding),
    both equal the float64 reference; bf16 weights are the reference cast once. Measured: 100% top-1 agreement."""
    model, ref, _ = trained_reference(trained, tiny_llm)
    expected = logits(ref)
    torch.testing.assert_close(logits(model), expected, atol=2e-5, rtol=1e-5)
    out, report = export.to_merged(trained, str(tmp_path / "m32"), dtype="float32")
    got = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got, logits(model), atol=2e-5, rtol=1e-5)
    assert (got - logits(AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32))).abs().max() > 1e-3
    assert report["top1_agreement"] == 1.0 and report["loss"] == pytest.approx(report["trained_loss"], abs=1e-4)
    assert "merged: loss" in capsys.readouterr().err
    card = (tmp_path / "m32" / "README.md").read_text()
    assert "100.0%" in card and f"{report['trained_loss']:.4f}" in card

    assert export_main(["--adapter", trained, "--to", "merged", "--output", str(tmp_path / "m16"),
                        "--measure_rows", "0"]) == 0  # bf16 by default
    weights = {k: v for f in os.listdir(tmp_path / "m16") if f.endswith(".safetensors")
               for k, v in load_file(tmp_path / "m16" / f).items()}
    name = "model.layers.1.mlp.down_proj.weight"
    assert weights[name].dtype == torch.bfloat16
    assert torch.equal(weights[name], ref.get_submodule(name.removesuffix(".weight")).weight.to(torch.bfloat16))
    assert not (tmp_path / "m16" / "README.md").read_text().count("|")  # nothing measured, no table


def test_every_run_artifact_in_plain_peft(trained, tiny_llm, tmp_path):
    """What plain PEFT / transformers users load from a run folder: the folder itself gives the original-base model
    (documented, with its card); the residual-form adapters (final, initial, checkpoint) name the residual base, so
    AutoPeftModel refuses them, and on that base (here a plain checkpoint of the dequantized residual) the final one
    gives the trained model."""
    from peft import AutoPeftModelForCausalLM

    model, ref, residual = trained_reference(trained, tiny_llm)
    original = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32).eval()
    top = json.load(open(os.path.join(trained, "adapter_config.json")))
    assert top["base_model_name_or_path"] == tiny_llm and top["r"] == 8
    assert "not the trained model" in open(os.path.join(trained, "README.md")).read()
    on_original = logits(PeftModel.from_pretrained(original, trained).eval())
    torch.testing.assert_close(on_original, reference_logits(tiny_llm, trained), atol=2e-5, rtol=1e-5)
    assert (on_original - logits(model)).abs().max() > 1e-3  # not the trained model: that is what the card says

    for sub in ("residual_adapter", "initial_adapter", "checkpoint-5"):
        cfg = json.load(open(os.path.join(trained, sub, "adapter_config.json")))
        assert cfg["base_model_name_or_path"].startswith("qmilora residual base NF4(W - s*B0*A0) of "), sub
        with pytest.raises((OSError, ValueError), match="qmilora residual base"):
            AutoPeftModelForCausalLM.from_pretrained(os.path.join(trained, sub))
    assert "load_trained" in open(os.path.join(trained, "residual_adapter", "README.md")).read()
    residual.to(torch.float32).save_pretrained(tmp_path / "residual-base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "residual-base", dtype=torch.float32).eval()
    on_residual = logits(PeftModel.from_pretrained(base, os.path.join(trained, "residual_adapter")).eval())
    torch.testing.assert_close(on_residual, logits(model), atol=2e-5, rtol=1e-5)


def test_original_base_exports_measure_their_distance(trained, tmp_path, capsys):
    """The original-base exports are not the trained model; each says by how much, on the run's own rows."""
    _, report = export.to_original_lora(trained, str(tmp_path / "l"), measure_rows=4)
    err = capsys.readouterr().err
    assert "original-lora: loss" in err and "top-1 agreement" in err and "4 rows of the first training rows" in err
    assert report["tokens"] > 0 and abs(report["loss"] - report["trained_loss"]) > 1e-6
    card = (tmp_path / "l" / "README.md").read_text()
    assert f"{report['loss']:.4f}" in card and "--max-lora-rank >= 8" in card
    _, merged = export.to_original_merged(trained, str(tmp_path / "om"), measure_rows=4)
    assert merged["loss"] == pytest.approx(report["loss"], abs=1e-4)  # the same model on the same rows


def test_corrected_original_lora_reaches_the_trained_model_at_full_rank(trained, tiny_llm, tmp_path):
    """--correction_rank k adds the activation-weighted rank-k approximation of the residual's NF4 error: a rank-2r+k
    LoRA for the original base. At k >= every layer's width it holds all of the error, so plain PEFT on the original
    base gives the trained model itself; at k = 0 it does not (the test above). The tiny model's widest adapted
    layers are 32 wide (min(out, in)): the largest rank --correction_rank takes."""
    from qmilora.train import load_trained

    assert export_main(["--adapter", trained, "--to", "original-lora", "--output", str(tmp_path / "c"),
                        "--correction_rank", "32", "--calibration_rows", "16", "--measure_rows", "0"]) == 0
    cfg = json.load(open(tmp_path / "c" / "adapter_config.json"))
    assert cfg["r"] == 8 + 32 and cfg["lora_alpha"] / cfg["r"] == pytest.approx(2.0)
    assert "rank-32 approximation" in (tmp_path / "c" / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32).eval()
    got = logits(PeftModel.from_pretrained(base, str(tmp_path / "c")).eval())
    torch.testing.assert_close(got, logits(load_trained(trained, lora_dropout=0.0)), atol=1e-4, rtol=1e-4)
    assert export_main(["--adapter", trained, "--to", "merged", "--output", str(tmp_path / "x"),
                        "--correction_rank", "4"]) == 1


def test_exports_hold_one_model_at_a_time(trained, tmp_path, monkeypatch):
    """The trained model loads once per export (with --correction_rank too), the run's data is built once, and the
    trained model is gone before the written artifact loads to be measured: never two models at once."""
    import gc
    import weakref

    import qmilora.data
    import qmilora.train

    loads, builds, alive = [], [], []
    load_trained, build_dataset, plain = qmilora.train.load_trained, qmilora.data.build_dataset, export._plain

    def counted_load(*args, **kwargs):
        model = load_trained(*args, **kwargs)
        loads.append(weakref.ref(model))
        return model

    def counted_build(*args, **kwargs):
        builds.append(1)
        return build_dataset(*args, **kwargs)

    def checked_plain(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in loads))
        return plain(*args, **kwargs)

    monkeypatch.setattr(qmilora.train, "load_trained", counted_load)
    monkeypatch.setattr(qmilora.data, "build_dataset", counted_build)
    monkeypatch.setattr(export, "_plain", checked_plain)
    _, report = export.to_merged(trained, str(tmp_path / "m"), dtype="float32", measure_rows=4)
    assert report["top1_agreement"] == 1.0 and (len(loads), len(builds), alive) == (1, 1, [0])
    loads.clear(), builds.clear(), alive.clear()
    _, report = export.to_original_merged(trained, str(tmp_path / "om"), measure_rows=4, correction_rank=4,
                                          calibration_rows=4)
    assert report["tokens"] > 0 and (len(loads), len(builds), alive) == (1, 1, [0])


def test_push_to_hub_is_refused_before_any_work(tiny_llm, tmp_path, capsys):
    """Trainer would upload the folder as it saves it, residual-form adapter on top: refused, pointing to exports."""
    assert train_main(["--model", tiny_llm, "--output_dir", str(tmp_path / "run"), "--push_to_hub", "true",
                       "--hub_model_id", "someone/x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "--push_to_hub would upload the residual-form adapter" in err[-1] and err[-1].startswith("qmilora-train: ")
    assert not (tmp_path / "run").exists()


def test_prepared_model_names_its_residual_base(tiny_llm, tmp_path):
    """The Python API too: save_pretrained of a prepared model writes an adapter that names the residual base, not
    the original checkpoint it was prepared from (and AutoPeftModel refuses it)."""
    from peft import AutoPeftModelForCausalLM

    from qmilora import prepare_model

    model = prepare_model(tiny_llm, rank=4, cache_dir=str(tmp_path / "c"))
    model.save_pretrained(tmp_path / "a")
    name = json.load(open(tmp_path / "a" / "adapter_config.json"))["base_model_name_or_path"]
    assert name == f"qmilora residual base NF4(W - s*B0*A0) of {tiny_llm}, built only by qmilora.train.load_trained"
    with pytest.raises((OSError, ValueError), match="qmilora residual base"):
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a"))
