"""qmilora-generate and qmilora-eval on a CPU run the trained model merged into float32 weights: the same model to
float32 rounding; they say how they run it, stream the answer on a terminal, and keep the 4-bit layers where the
merged weights would not fit."""
import io
import json

import pytest
import torch

from qmilora import inference


@pytest.fixture(scope="module")
def run_dir(tiny_llm, tmp_path_factory):
    from qmilora.cli.train import main

    out = tmp_path_factory.mktemp("inference") / "run"
    assert main(["--model", tiny_llm, "--output_dir", str(out), "--rank", "4", "--max_steps", "3",
                 "--learning_rate", "5e-2", "--save_strategy", "no", "--disable_tqdm", "true"]) == 0
    return str(out)


def test_merged_model_is_the_trained_model(run_dir):
    from qmilora.train import load_trained

    merged, how = inference.load(run_dir)
    assert "merged float32" in how and not any(p.dtype == torch.uint8 for p in merged.parameters())
    trained = load_trained(run_dir, lora_dropout=0.0).eval()
    ids = torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    kept, how = inference.load(run_dir, merge_on_cpu=False)
    assert "4-bit" in how and any(p.dtype == torch.uint8 for p in kept.parameters())


def test_four_bit_layers_stay_when_merged_weights_would_not_fit(run_dir, monkeypatch):
    monkeypatch.setattr(inference, "available_memory", lambda: 1000)
    model, how = inference.load(run_dir)
    assert how.startswith("4-bit layers: merged float32 weights would take")
    assert any(p.dtype == torch.uint8 for p in model.parameters())


def test_generate_streams_and_says_how_it_runs(run_dir, caplog):
    from qmilora.cli.generate import GenerateArgs, generate

    stream = io.StringIO()
    with caplog.at_level("INFO", logger="qmilora"):
        answer = generate(GenerateArgs(adapter=run_dir, prompt="What is 3 + 4?", max_new_tokens=6), stream=stream)
    assert stream.getvalue() == answer + "\n"
    assert any("qmilora-generate: merged float32" in r.message for r in caplog.records)
    assert any("CPU thread" in r.message for r in caplog.records)


def test_eval_merged_equals_four_bit(run_dir, tmp_path, capsys):
    from qmilora.cli.eval import main

    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a} + 4?", "output": f"{a} + 4 = {a + 4}."}) + "\n"
                            for a in range(5)))
    results = []
    for merge in ("true", "false"):
        assert main(["--adapter", run_dir, "--data", str(data), "--base", "false", "--merge_on_cpu", merge]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
