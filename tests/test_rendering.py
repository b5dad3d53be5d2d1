"""Data rendering adds no text the user did not write (issue 27, item 4), shows what it renders, and the run's
tokens/s counts supervised tokens only."""
import json

import pytest

from conftest import CHAT_TEMPLATE, tiny_tokenizer
from qmilora.config import QMiLoRAError
from qmilora.data import DataConfig, apply_template, build_dataset, injected_system_prompt, show_example

# SmolLM2's habit, in the tiny tokenizer's markers: a conversation without a system message gets the template's own
INJECTING = ("{% if messages[0]['role'] != 'system' %}<|system|> You are a helpful bot </s> {% endif %}"
             + CHAT_TEMPLATE)
ROW = {"instruction": "What is 3 + 4?", "output": "3 + 4 = 7."}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def render(tok, messages, template=None):
    return tok.apply_chat_template(messages, tokenize=False, chat_template=template)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def conversation(system=None):
    turns = [{"role": "user", "content": ROW["instruction"]}, {"role": "assistant", "content": ROW["output"]}]
    return ([{"role": "system", "content": system}] if system is not None else []) + turns


def test_default_drops_the_templates_own_system_prompt(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = INJECTING
    assert injected_system_prompt(tok) == "You are a helpful bot"
    cfg = DataConfig(data=write(tmp_path / "a.jsonl", [ROW]))
    train, _, _ = build_dataset(cfg, tok)
    # an empty system turn, exactly as the template renders an explicit empty system message: no words added
    expected = render(tok, conversation(""), CHAT_TEMPLATE)
    assert "helpful" not in expected and train[0]["input_ids"] == ids(tok, expected)
    # the template in effect stays on the tokenizer (the run saves it): generation renders prompts the same way
    prompt = tok.apply_chat_template(conversation()[:1], tokenize=False, add_generation_prompt=True)
    assert "helpful" not in prompt and prompt.startswith("<|system|>")
    before = tok.chat_template
    apply_template(tok, cfg)  # what qmilora-eval and the export's measurement do with the saved tokenizer
    assert tok.chat_template == before and injected_system_prompt(tok) is None


def test_system_prompt_only_when_asked_and_rows_keep_their_own(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = INJECTING
    chat = {"messages": conversation("Be exact")}
    cfg = DataConfig(data=write(tmp_path / "c.jsonl", [chat, {"messages": conversation()}]), system_prompt="Be brief")
    train, _, _ = build_dataset(cfg, tok)
    assert train[0]["input_ids"] == ids(tok, render(tok, conversation("Be exact"), CHAT_TEMPLATE))
    assert train[1]["input_ids"] == ids(tok, render(tok, conversation("Be brief"), CHAT_TEMPLATE))
    with pytest.raises(QMiLoRAError, match="needs a chat template"):
        build_dataset(DataConfig(data=cfg.data, chat_template="none", system_prompt="Be brief"), tiny_tokenizer())


def test_no_template_and_template_file(tmp_path):
    data = write(tmp_path / "a.jsonl", [ROW])
    tok = tiny_tokenizer()
    train, _, _ = build_dataset(DataConfig(data=data, chat_template="none"), tok)
    prompt = "### Instruction:\nWhat is 3 + 4?\n\n### Response:\n"  # Alpaca's markers, not its preamble sentence
    assert train[0]["input_ids"][: len(tok(prompt)["input_ids"])] == tok(prompt)["input_ids"]
    assert tok.chat_template is None
    with pytest.raises(QMiLoRAError, match="chat format but there is no chat template"):
        build_dataset(DataConfig(data=write(tmp_path / "c.jsonl", [{"messages": conversation()}]),
                                 chat_template="none"), tiny_tokenizer())
    template = tmp_path / "t.jinja"
    template.write_text(INJECTING)
    train, _, _ = build_dataset(DataConfig(data=data, chat_template=str(template)), tok)  # a file: as written
    assert train[0]["input_ids"] == ids(tok, render(tok, conversation(), INJECTING))
    with pytest.raises(ValueError, match="neither"):
        DataConfig(chat_template=str(tmp_path / "missing.jinja"))


def test_first_example_shows_the_supervised_span():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    from qmilora.data import encode

    row = encode(ROW, "alpaca", tok, DataConfig())
    shown = show_example(row, tok)
    supervised = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert shown.count("[[") == 1 and shown.endswith(f"[[{tok.decode(supervised)}]]")
    assert shown.startswith(tok.decode(row["input_ids"][: row["labels"].index(supervised[0])]))
    # a long-context row shows its ends, not every token
    n = len(row["input_ids"])
    long = {"input_ids": row["input_ids"] * 200, "labels": row["labels"] * 200}
    shown = show_example(long, tok, most=2 * n)
    assert f"[... {198 * n} tokens ...]" in shown and len(shown) < 4 * len(show_example(row, tok)) + 100


def test_summary_counts_supervised_tokens_only(tiny_llm, tmp_path):
    """One epoch of 8 rows in 2 batches: tokens/s counts the labelled positions (not prompt, not padding), and
    `tokens` counts real input tokens (transformers' "all" would add the padding to multiples of 8)."""
    from transformers import AutoTokenizer

    from qmilora.cli.train import main as train_main

    rows = [{"instruction": f"What is {i} + {i}?" + " Think." * i, "output": f"{i} + {i} = {2 * i}."} for i in range(8)]
    data = write(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    assert train_main(["--model", tiny_llm, "--output_dir", str(out), "--cache_dir", str(tmp_path / "c"), "--data", data,
                       "--rank", "4", "--max_steps", "2", "--per_device_train_batch_size", "4",
                       "--save_strategy", "no", "--disable_tqdm", "true"]) == 0
    summary = json.load(open(out / "qmilora.json"))["summary"]
    tok = AutoTokenizer.from_pretrained(out)
    built, _, _ = build_dataset(DataConfig(data=data), tok)
    supervised = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in built)
    assert summary["supervised_tokens"] == supervised
    assert summary["tokens"] == sum(len(r["input_ids"]) for r in built)
    assert summary["tokens_per_second"] == pytest.approx(supervised / summary["wall_seconds"], rel=0.05)
    assert "supervised" in summary["tokens_per_second_counts"]
