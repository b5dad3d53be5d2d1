import os

# The tests are CPU tests (float32 references, inputs built on the CPU). On a GPU host, where "auto" would put the
# prepared model on the GPU, they ran 60 failures on an H200 for that reason alone; they hide the GPU there and
# pass as here. GPU paths are measured by benchmarks/gpu_suite.sh. QMILORA_TEST_GPU=1 leaves the GPU visible.
# Set before torch is imported, so that CUDA (initialized lazily) never sees the device; subprocesses inherit it.
if not os.environ.get("QMILORA_TEST_GPU"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Tests never write outside temporary folders: every cache a test (or a command it starts) could fill, qmilora's
# prepared models and demo checkpoint, datasets' Arrow files, the Hub's and matplotlib's, points into one
# temporary folder per test process, removed when it exits. Set unconditionally (not setdefault): a developer's
# own $QMILORA_CACHE must not be written by tests either.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

TEST_CACHES = tempfile.mkdtemp(prefix="qmilora-test-caches-")
atexit.register(shutil.rmtree, TEST_CACHES, ignore_errors=True)
for _var, _sub in (("QMILORA_CACHE", "qmilora"), ("HF_HOME", "huggingface"), ("HF_DATASETS_CACHE", "datasets"),
                   ("MPLCONFIGDIR", "matplotlib")):
    os.environ[_var] = os.path.join(TEST_CACHES, _sub)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a model hub


def tiny_config(**kw) -> LlamaConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **kw})


def save_tiny(directory, seed=0, shard="40KB", **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**kw)).eval()
    model.save_pretrained(directory, max_shard_size=shard)
    return model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(directory, fp32 model) of a 2-layer Llama saved as sharded safetensors."""
    d = tmp_path_factory.mktemp("tiny")
    model = save_tiny(d)
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 1
    return str(d), model


@pytest.fixture()
def cache(tmp_path):
    return str(tmp_path / "cache")


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tiny_tokenizer():
    """A word-level tokenizer trained on the bundled data (no hub), with a chat template."""
    import json as _json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qmilora.data import BUNDLED

    rows = [_json.loads(line) for line in open(BUNDLED)]
    text = [" ".join(r.values()) for r in rows] + ["Below is an instruction that describes a task . Write a response "
                                                  "that appropriately completes the request ### Instruction Input Response"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<unk>", "<pad>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(text, trainers.WordLevelTrainer(special_tokens=special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def train_and_export(tmp_path, directory, tok):
    """Train a checkpoint (holding `tok`) 3 steps through the CLI and export it both original-base ways. Returns
    logits on the same ids of (--to original-merged, the original base + --to original-lora through plain PEFT, the
    untouched original) and the run folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qmilora.cli.export import main as export_main
    from qmilora.cli.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["--model", str(directory), "--output_dir", str(out), "--cache_dir", str(tmp_path / "c"),
                       "--rank", "4", "--max_steps", "3", "--learning_rate", "5e-2", "--max_seq_length", "48",
                       "--save_strategy", "no", "--disable_tqdm", "true"]) == 0
    assert export_main(["--adapter", str(out), "--to", "original-merged", "--output", str(tmp_path / "merged")]) == 0
    assert export_main(["--adapter", str(out), "--to", "original-lora", "--output", str(tmp_path / "lora")]) == 0
    ids = torch.randint(1, len(tok), (1, 10), generator=torch.Generator().manual_seed(2))
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    with_lora = PeftModel.from_pretrained(load(directory), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        logits = (load(tmp_path / "merged")(ids).logits, with_lora(input_ids=ids).logits, load(directory)(ids).logits)
    return (*logits, ids, out)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """A tiny Llama checkpoint with a tokenizer and chat template: what qmilora-train needs, without the hub."""
    d = tmp_path_factory.mktemp("tiny_llm")
    tok = tiny_tokenizer()
    save_tiny(d, vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=2,
              num_key_value_heads=1, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    tok.save_pretrained(d)
    return str(d)


def one_line_error(capsys, prog="qmilora-train") -> str:
    """The one error line a command printed (exactly one: no second report, no traceback lines of its own)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith(f"{prog}: error")]
    assert len(err) == 1 and err[0].startswith(f"{prog}: error:"), err
    return err[0]
