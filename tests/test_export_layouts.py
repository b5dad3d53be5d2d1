"""--to merged on a layout unlike Llama's: GPT-2's Conv1D stores weights (in, out) and its layers carry biases; the
as-trained merge must still equal the trained model."""
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_tokenizer
from test_architectures import build, rel


def test_merged_gpt2_is_the_trained_model(tmp_path):
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
                       "--max_steps", "3", "--learning_rate", "5e-2", "--max_seq_length", "48",
                       "--save_strategy", "no", "--disable_tqdm", "true"]) == 0
    assert export_main(["--adapter", str(out), "--to", "merged", "--dtype", "float32", "--output",
                        str(tmp_path / "m"), "--measure_rows", "0"]) == 0
    ids = torch.randint(1, len(tok), (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()(ids).logits
        trained = load_trained(str(out), lora_dropout=0.0).eval()(input_ids=ids).logits
        original = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()(ids).logits
    assert rel(merged, trained) < 1e-5 and rel(trained, original) > 1e-3
