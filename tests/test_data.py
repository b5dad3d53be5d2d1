import json

import pytest

from qmilora import QMiLoRAError
from qmilora.data import IGNORE, DataConfig, build_dataset, check_file

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


def ids_of(path, **kw):
    train, _, _ = build_dataset(DataConfig(data=str(path), **kw), tiny_tokenizer())  # a template flag sets its own
    return [row["input_ids"] for row in train]


@pytest.mark.parametrize("template", ["model", "none"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_numbers_in_text_fields_are_their_text_on_every_path(tmp_path, fmt, template):
    """A number in a text field is rendered as its text, with the model's template as without one (the template path
    dropped a non-string input), and a CSV column of numbers with an empty cell is not read as floats ("7.0")."""
    rows = [{"instruction": "What is 3 + 4?", "input": 7, "output": 7},
            {"instruction": "What is 5 + 4?", "input": None, "output": 9}]
    as_text = [{k: (None if v is None else str(v)) for k, v in r.items()} for r in rows]
    if fmt == "csv":  # a CSV has no null: an empty cell
        rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    got = ids_of(write(tmp_path / f"n.{fmt}", rows, fmt), chat_template=template)
    assert got == ids_of(write(tmp_path / "s.jsonl", as_text), chat_template=template)
    assert TOK.decode(got[0]).split().count("7") == 2  # the input's and the output's


def test_file_values_are_read_as_written(tmp_path):
    # a CSV answer of digits is the answer, as written ("007" is not 7); a JSONL mixing string and number outputs
    # keeps each (datasets made the column one type, turning "2" into 2, and blamed row 1)
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("instruction,output\nWhat is 3 + 4 ?,7\nWhat is 3 + 4 ?,007\n")
    as_jsonl = write(tmp_path / "t.jsonl", [{"instruction": "What is 3 + 4 ?", "output": o} for o in ("7", "007")])
    got = ids_of(csv_file)
    assert got == ids_of(as_jsonl) and got[0] != got[1]
    mixed = write(tmp_path / "m.jsonl", [{"instruction": "What is 3 + 4 ?", "output": "7"},
                                         {"instruction": "What is 3 + 4 ?", "output": 7}])
    train, _, _ = build_dataset(DataConfig(data=mixed), TOK)
    assert [response_text(r).split() for r in train] == [["7", "</s>"]] * 2
    pretty = tmp_path / "p.json"  # a JSON number's spelling is kept too: 3.50, not 3.5
    pretty.write_text('{"instruction": "What is 3 + 4 ?",\n "output": 3.50}\n')
    spelt = [write(tmp_path / f"{o}.jsonl", [{"instruction": "What is 3 + 4 ?", "output": o}]) for o in ("3.50", "3.5")]
    assert ids_of(pretty) == ids_of(spelt[0]) != ids_of(spelt[1])


@pytest.mark.parametrize("row, match", [
    ({"instruction": "a", "output": True}, "row 2: output is the boolean true"),
    ({"instruction": "a", "input": ["x"], "output": "b"}, "row 2: input must be text"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     r"row 2: a chat row \(messages\) where the rows are alpaca .*one format"),
])
def test_rows_that_cannot_be_text_or_of_another_format_are_named(tmp_path, row, match):
    path = write(tmp_path / "d.jsonl", [ALPACA[0], row])
    with pytest.raises(QMiLoRAError, match=match) as err:
        build_dataset(DataConfig(data=path), TOK)
    assert "\n" not in str(err.value)


def test_an_assistant_turn_that_only_calls_tools(tmp_path):
    """OpenAI's form: content null beside tool_calls; the template renders the calls."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 40, "b": 2}}}
    turns = [{"role": "user", "content": "40 + 2?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}]
    rows, _, _ = build_dataset(DataConfig(data=write(tmp_path / "c.jsonl", [{"messages": turns}])), TOK)
    assert len(rows) == 1


def test_unknown_chat_roles_are_refused(tmp_path):
    turns = [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write(tmp_path / "c.jsonl", [{"messages": turns}])
    with pytest.raises(QMiLoRAError, match="row 1: message 1 has role 'wizard'; use system, user, assistant, tool, developer, ipython or function"):
        build_dataset(DataConfig(data=path), TOK)


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{{ m.content \n", "t.jinja: not a valid Jinja template: unexpected end of template"),
    ("static text only\n", r"row 1: the chat template .*t.jinja leaves out part of message 1 \(user\)"),
    ("  \n", "t.jinja is empty; pass a Jinja chat template file, or --chat_template none"),
    ("{{ raise_exception('roles must alternate') }}", "row 1: the chat template refuses it: roles must alternate"),
])
def test_template_files_that_cannot_render_the_rows(tmp_path, template, match):
    (tmp_path / "t.jinja").write_text(template)
    data = write(tmp_path / "d.jsonl", ALPACA)
    with pytest.raises(QMiLoRAError, match=match) as err:
        build_dataset(DataConfig(data=data, chat_template=str(tmp_path / "t.jinja")), tiny_tokenizer())
    assert "\n" not in str(err.value)


def test_json_and_csv_layouts(tmp_path):
    """The layouts the file readers take: JSON Lines with a byte-order mark, blank lines and a tab in a string, a
    JSON array, quoted CSV cells over several lines; a broken line is named."""
    lines = tmp_path / "a.jsonl"
    tab = json.dumps(ALPACA[1]).replace("word ", "word\t")
    lines.write_text("\ufeff" + json.dumps(ALPACA[0]) + "\n\n" + tab + "\n")
    assert len(ids_of(lines)) == 2 and ids_of(lines) == ids_of(write(tmp_path / "a.json", ALPACA, "json"))
    csv_file = tmp_path / "q.csv"
    csv_file.write_text('instruction,output\n"What is 3 + 4?\nSay it, briefly.",7\n\n')
    assert TOK.decode(ids_of(csv_file)[0]).count(",") == 1
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps(ALPACA[0]) + "\n" + '{"instruction": "a",\n')
    with pytest.raises(QMiLoRAError, match="could not be read as jsonl: line 2: "):
        build_dataset(DataConfig(data=str(broken)), TOK)
    wide = tmp_path / "w.csv"
    wide.write_text("instruction,output\na,b,c\n")
    with pytest.raises(QMiLoRAError, match="line 2: 3 cells where the header has 2"):
        build_dataset(DataConfig(data=str(wide)), TOK)


def test_a_split_of_a_data_file_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(QMiLoRAError, match="--data_split test picks a split of a datasets hub name"):
        check_file(DataConfig(data=path, data_split="test"))
    check_file(DataConfig(data=path))
