import json

import pytest

from qmilora import QMiLoRAError
from qmilora.data import IGNORE, DataConfig, build_dataset

from conftest import tiny_tokenizer

TOK = tiny_tokenizer()


def write(path, rows, fmt="jsonl"):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def response_text(example):
    return TOK.decode([t for t in example["labels"] if t != IGNORE])


ALPACA = [{"instruction": "What is 3 + 4?", "input": "", "output": "3 + 4 = 7."},
          {"instruction": "Spell this word backwards.", "input": "river", "output": "revir"}]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_alpaca_files_label_only_the_response(tmp_path, fmt):
    path = write(tmp_path / f"d.{fmt}", ALPACA, fmt)
    train, val, detected = build_dataset(DataConfig(data=path), TOK)
    assert detected == "alpaca" and val is None and len(train) == 2
    assert response_text(train[0]).split() == "3 + 4 = 7 . </s>".split()
    first = train[0]
    assert first["labels"][0] == IGNORE and len(first["labels"]) == len(first["input_ids"])


def test_train_on_prompt(tmp_path):
    train, _, _ = build_dataset(DataConfig(data=write(tmp_path / "d.jsonl", ALPACA), train_on_prompt=True), TOK)
    assert train[0]["labels"] == train[0]["input_ids"]


def test_chat_multi_turn_labels_every_assistant_turn(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"},
                          {"role": "user", "content": "What is 5 + 4?"}, {"role": "assistant", "content": "9"}]}]
    train, _, fmt = build_dataset(DataConfig(data=write(tmp_path / "c.jsonl", rows)), TOK)
    assert fmt == "chat"
    assert response_text(train[0]).split() == ["7", "</s>", "9", "</s>"]


def test_prompt_completion_and_text(tmp_path):
    pc = write(tmp_path / "pc.jsonl", [{"prompt": "What is 3 + 4?", "completion": "7"}])
    train, _, fmt = build_dataset(DataConfig(data=pc), TOK)
    assert fmt == "prompt_completion" and response_text(train[0]).split() == ["7", "</s>"]
    txt = tmp_path / "t.txt"
    txt.write_text("apple river mountain\ncloud garden window\n")
    train, _, fmt = build_dataset(DataConfig(data=str(txt)), TOK)
    assert fmt == "text" and len(train) == 2 and train[0]["labels"] == train[0]["input_ids"]


def test_forced_format_truncation_packing_and_val(tmp_path):
    path = write(tmp_path / "d.jsonl", ALPACA * 10)
    train, val, _ = build_dataset(DataConfig(data=path, val_size=0.25), TOK)
    assert len(train) == 15 and len(val) == 5
    packed, _, _ = build_dataset(DataConfig(data=path, packing=True, max_seq_length=32), TOK)
    assert len(packed) == 20  # packing happens per batch, in the collator: the examples stay whole
    short, _, _ = build_dataset(DataConfig(data=path, max_seq_length=12, data_format="alpaca"), TOK)
    assert max(len(x["input_ids"]) for x in short) == 12
    with pytest.raises(QMiLoRAError, match="format text needs field"):
        build_dataset(DataConfig(data=path, data_format="text"), TOK)


@pytest.mark.parametrize("content, name, match", [
    (None, "missing.jsonl", "does not exist"),
    ("", "empty.jsonl", "is empty"),
    ('{"question": "a", "answer": "b"}\n', "odd.jsonl", r"unknown fields \['answer', 'question'\]"),
    ('{"instruction": "a", "output": ""}\n', "noresp.jsonl", "row 1: no response"),
    ('{"instruction": "a", "output": "b"\n', "broken.jsonl", "could not be read as jsonl"),
    ("a,b\n", "data.xml", "unsupported extension"),
])
def test_bad_data_is_one_clear_error_naming_the_file(tmp_path, content, name, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(QMiLoRAError, match=match) as err:
        build_dataset(DataConfig(data=str(path)), TOK)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_everything_truncated_away(tmp_path):
    long = [{"instruction": " ".join(["apple"] * 50), "output": "river"}]
    with pytest.raises(QMiLoRAError, match="truncation"):
        build_dataset(DataConfig(data=write(tmp_path / "l.jsonl", long), max_seq_length=16), TOK)


def test_bundled_data_is_the_default():
    train, _, fmt = build_dataset(DataConfig(), TOK)
    assert fmt == "alpaca" and len(train) == 300
