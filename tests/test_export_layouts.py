"""Every export on a layout unlike Llama's: GPT-2's Conv1D stores weights (in, out) and its layers carry biases.
With the residual quantized (4-bit layers hold (out, in)) and without (the Conv1D layers stay (in, out)), --to merged
must equal the trained model, and the original-base exports must agree with each other."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import one_line_error, tiny_tokenizer
from test_architectures import build, rel


@pytest.mark.parametrize("quantize", [True, False])
def test_gpt2_exports(tmp_path, quantize, capsys):
    from qmilora.cli.export import main as export_main
    from qmilora.cli.train import main as train_main
    from qmilora.train import load_trained

    tok = tiny_tokenizer()
    d = tmp_path / "gpt2"
    build("gpt2", d, vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
          pad_token_id=tok.pad_token_id)
    tok.save_pretrained(d)
    out = tmp_path / "run"
    assert train_main(["--model", str(d), "--output_dir", str(out), "--cache_dir", str(tmp_path / "c"), "--rank", "4",
                       "--quantize", str(quantize).lower(), "--compute_dtype", "float32", "--max_steps", "3",
                       "--learning_rate", "5e-2", "--max_seq_length", "48", "--save_strategy", "no",
                       "--disable_tqdm", "true"]) == 0
    for kind, extra in (("merged", ["--dtype", "float32"]), ("original-merged", []), ("original-lora", [])):
        assert export_main(["--adapter", str(out), "--to", kind, "--output", str(tmp_path / kind),
                            "--measure_rows", "0", *extra]) == 0
    ids = torch.randint(1, len(tok), (1, 10), generator=torch.Generator().manual_seed(2))
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    with torch.no_grad():
        trained = load_trained(str(out), lora_dropout=0.0).eval()(input_ids=ids).logits
        merged = load(tmp_path / "merged")(ids).logits
        original_merged = load(tmp_path / "original-merged")(ids).logits
        with_lora = PeftModel.from_pretrained(load(d), str(tmp_path / "original-lora")).eval()(input_ids=ids).logits
        original = load(d)(ids).logits
    assert rel(trained, original) > 1e-3  # training moved the model, so the comparisons below are not vacuous
    assert rel(merged, trained) < 1e-5
    assert rel(original_merged, with_lora) < 1e-5
    if not quantize:  # no rounding between W_res + s·B A and W + s·(B A − B₀ A₀): every export is the trained model
        assert rel(original_merged, trained) < 1e-5
        # ... and no 4-bit rounding for --correction_rank to correct: refused in one line, nothing written
        assert export_main(["--adapter", str(out), "--to", "original-lora", "--output", str(tmp_path / "corrected"),
                            "--correction_rank", "2"]) == 1
        assert "nothing to correct" in one_line_error(capsys, "qmilora-export")
        assert not (tmp_path / "corrected").exists()
    else:  # ... while with NF4 the original-base exports miss the residual's rounding
        assert rel(original_merged, trained) > 1e-4


def test_as_trained_unquantized_square_conv1d(tmp_path):
    """A square Conv1D kept unquantized: an (out, in) update added to its (in, out) weight would fit the shape and
    give a wrong model without an error (it did, by 37% of the logits)."""
    from qmilora import prepare_model
    from qmilora.export import as_trained
    from qmilora.interop import lora_layers

    build("gpt2", tmp_path / "gpt2")
    model = prepare_model(str(tmp_path / "gpt2"), rank=4, quantize=False, target_modules=["attn.c_proj"],
                          compute_dtype="float32", cache_dir=str(tmp_path / "c"))
    layers = lora_layers(model)
    assert layers and all(layer.get_base_layer().weight.shape == (64, 64) for layer in layers.values())
    g = torch.Generator().manual_seed(3)
    for layer in layers.values():  # B = 0 would make any orientation right: move both factors
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.data += 0.05 * torch.randn(p.shape, generator=g)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
        plain = as_trained(model, torch.float32)
        assert rel(plain(ids).logits, trained) < 1e-5
        unadapted = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32).eval()(ids).logits
    assert rel(trained, unadapted) > 1e-2
