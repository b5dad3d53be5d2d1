"""Training data: files or hub datasets (via `datasets`) → tokenized examples with response-only labels.

Formats, detected from the columns (or forced with `data_format`):
    alpaca             instruction, input (optional), output
    chat               messages: [{role, content}, ...]   (rendered with the chat template)
    prompt_completion  prompt, completion
    text               text                              (every token is trained on)
Every problem is a `QMiLoRAError` naming the file, found before any model is loaded. Values are read as the file
writes them: a number in a text field is its text, the same with or without a chat template (docs/data.md).

Rendering adds no text the user did not write unless asked (`chat_template`, `system_prompt`): the model's own chat
template is used, but a template that inserts a default system prompt into conversations without one (SmolLM2's
"You are a helpful AI assistant named SmolLM...") is given an empty system message instead. The template in effect
is set on the tokenizer, which the run saves, so generation and exports render prompts the same way.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from .config import QMiLoRAError

log = logging.getLogger("qmilora")
FORMATS = ("alpaca", "chat", "prompt_completion", "text")
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_alpaca.jsonl")
IGNORE = -100
# without a chat template: Alpaca's section markers, not its preamble sentence (text the user did not write)
_ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
TEMPLATES = ("model", "none")
# packed rows longer than this stay padded by default: SDPA and eager attention need a T×T mask (256 MB at this length)
PACKED_MASK_TOKENS = 16384
_SENTINEL_SYSTEM, _SENTINEL_USER = "QMILORASYSTEMSENTINEL", "QMILORAUSERSENTINEL"


@dataclass
class DataConfig:
    _argument_group_name = "data"
    data: str | None = field(default=None, metadata={"help": "Training data: a .json/.jsonl/.csv/.parquet/.txt file or a datasets hub name. Default: the small instruction set bundled with qmilora."})
    data_format: str = field(default="auto", metadata={"help": "auto, alpaca, chat, prompt_completion or text.", "choices": ("auto",) + FORMATS})
    data_split: str = field(default="train", metadata={"help": "Split to read from a hub dataset."})
    max_seq_length: int = field(default=512, metadata={"help": "Truncate examples to this many tokens.", "aliases": ["--max_length"]})
    train_on_prompt: bool = field(default=False, metadata={"help": "Also compute the loss on prompt tokens (default: response tokens only)."})
    packing: bool | None = field(default=None, metadata={"help": "Padding-free packing: each batch's examples in one row without padding, each attending only to itself (position ids restart per example; transformers' flattening collator), checked against the examples alone before training. Default: on where that check passes, else padded batches; true: refused where it fails; false: padded batches."})
    val_size: float = field(default=0.0, metadata={"help": "Held-out share (0-1) or row count (>=1) for evaluation loss."})
    chat_template: str = field(default="model", metadata={"help": "How rows become text: model (the tokenizer's own chat template, adding no system prompt the data does not hold: a template that inserts a default one gets an empty system message instead), none (no chat template: alpaca rows as '### Instruction: ... ### Response:', prompt_completion rows as written; chat rows are refused), or the path of a Jinja chat template file (used as written)."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message for rows that carry none (needs a chat template). Default: none."})

    def __post_init__(self) -> None:
        if self.data_format != "auto" and self.data_format not in FORMATS:
            raise ValueError(f"data_format must be auto or one of {', '.join(FORMATS)}, got {self.data_format!r}")
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length must be at least 2, got {self.max_seq_length}")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if self.val_size > 1 and self.val_size != int(self.val_size):
            raise ValueError(f"val_size is a share below 1 or a whole number of rows, got {self.val_size}")
        if self.chat_template not in TEMPLATES and not os.path.isfile(os.path.expanduser(self.chat_template)):
            raise ValueError(f"chat_template must be model, none or a template file; {self.chat_template!r} is "
                             "neither (no such file)")


def check_file(cfg: DataConfig) -> None:
    """The checks of a data file that need no tokenizer (it exists, is a file, has a known extension, is not
    empty): run before anything slow, such as building the demo model."""
    source = cfg.data or BUNDLED
    ext = os.path.splitext(source)[1].lower()
    if os.path.exists(source) or ext in _BUILDERS:
        if os.path.isdir(source):
            raise QMiLoRAError(f"--data {source} is a folder; pass one data file (.json, .jsonl, .csv, .parquet or "
                               ".txt) or a datasets name")
        if not os.path.exists(source):
            raise QMiLoRAError(f"data file {source} does not exist")
        if not os.path.isfile(source):
            raise QMiLoRAError(f"data file {source} is not a regular file (a pipe or device); pass a file")
        if ext not in _BUILDERS:
            raise QMiLoRAError(f"data file {source}: unsupported extension {ext or '(none)'}; use one of {', '.join(_BUILDERS)}")
        if os.path.getsize(source) == 0 or (ext in (".json", ".jsonl") and _blank(source)):
            raise QMiLoRAError(f"data file {source} is empty")
        if cfg.data_split != "train":  # a file is one split: the flag would be ignored
            raise QMiLoRAError(f"--data_split {cfg.data_split} picks a split of a datasets hub name; a data file is "
                               "one split: drop --data_split, or pass the file that holds that split")


def load_rows(cfg: DataConfig):
    """The raw rows of `cfg.data` (the bundled set when None): a list of dicts for JSON and CSV files, read as
    written, else a `datasets.Dataset`."""
    import datasets

    source = cfg.data or BUNDLED
    ext = os.path.splitext(source)[1].lower()
    if os.path.exists(source) or ext in _BUILDERS:
        check_file(cfg)
        if _BUILDERS[ext] in ("json", "csv", "text"):
            _check_utf8(source)
        if ext in (".json", ".jsonl", ".csv"):
            # read here, not by datasets: it guesses each column's type (a CSV column of numbers becomes ints, or
            # floats where a cell is empty; a JSON field holding "2" and 42 becomes one type) and the text changes
            rows = _read_csv(source) if ext == ".csv" else _read_json(source, ext)
        else:
            try:
                # datasets reuses its converted copy of a file by path, size and mtime: a file rewritten in place
                # within the same second, or with its mtime kept, would train on the old rows
                rows = datasets.load_dataset(_BUILDERS[ext], data_files=source, split="train",
                                             download_mode="force_redownload")
            except Exception as err:
                raise QMiLoRAError(f"data file {source} could not be read as {ext[1:]}: {_first_line(err)}") from None
    else:
        try:
            rows = datasets.load_dataset(source, split=cfg.data_split)
        except Exception as err:
            raise QMiLoRAError(f"data {source!r} is neither a file nor a loadable dataset: {_first_line(err)}") from None
    if len(rows) == 0:
        raise QMiLoRAError(f"data {source} has no rows")
    return rows


class _Number(float):
    """A JSON number with a fraction or exponent that keeps its text as written ("2.50", "1e5")."""

    def __new__(cls, text: str):
        number = super().__new__(cls, text)
        number.text = text
        return number


def _read_json(path: str, ext: str) -> list[dict]:
    """JSON Lines, a JSON array of objects (or of strings: text rows) or one object; blank lines are skipped."""
    fail = lambda where, err: QMiLoRAError(  # noqa: E731
        f"data file {path} could not be read as {ext[1:]}: {where}{err.msg} (column {err.colno})")
    load = lambda text: json.loads(text, parse_float=_Number, strict=False)  # noqa: E731 (tabs in strings pass)
    def whole() -> str:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()

    with open(path, "rb") as f:
        array = f.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    if array:
        try:
            rows = [{"text": r} if isinstance(r, str) else r for r in load(whole())]
        except ValueError as err:
            raise fail(f"line {err.lineno}: ", err) from None
    else:
        rows = []
        with open(path, "rb") as f:  # a line at a time (a large file is never one string); split at \n only: JSON
            for n, raw in enumerate(f, 1):  # strings may hold U+2028 or a raw \r
                line = raw.decode("utf-8").removeprefix("\ufeff") if n == 1 else raw.decode("utf-8")
                if not line.strip():
                    continue
                try:
                    rows.append(load(line))
                except ValueError as err:
                    try:
                        rows = [load(whole())]  # one object written over several lines
                    except ValueError:
                        raise fail(f"line {n}: ", err) from None
                    break
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise QMiLoRAError(f"data file {path}, row {n}: a JSON {type(row).__name__}, not an object of fields")
    return rows


def _read_csv(path: str) -> list[dict]:
    """Every cell as the text it holds ("007", "2", "" stay so); blank lines are skipped."""
    import csv

    csv.field_size_limit(2**31 - 1)  # the default refuses cells over 128 KiB: long-context rows
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, [])
            if len(set(header)) < len(header):
                raise QMiLoRAError(f"data file {path}: the header names a column twice ({', '.join(header)})")
            for cells in reader:
                if len(cells) > len(header):
                    raise QMiLoRAError(f"data file {path}, line {reader.line_num}: {len(cells)} cells where the header "
                                       f"has {len(header)}; quote cells that hold commas")
                if cells:
                    rows.append(dict(zip(header, cells)))
        except csv.Error as err:
            raise QMiLoRAError(f"data file {path} could not be read as csv: line {reader.line_num}: {err}") from None
    return rows


def _blank(path: str) -> bool:
    with open(path, "rb") as f:
        return not f.read(1 << 16).strip() and os.path.getsize(path) <= 1 << 16


def _check_utf8(path: str) -> None:
    """Text data must be UTF-8; say so naming the file and line (datasets fails later, naming neither)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line += chunk[: err.start].count(b"\n")
                raise QMiLoRAError(f"data file {path}, line {line}: not UTF-8 text ({err.reason} at byte "
                                   f"{err.start}); save it as UTF-8") from None
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise QMiLoRAError(f"data file {path}: not UTF-8 text (it ends inside a character); save it as UTF-8") from None


_NEEDED = {"chat": ["messages"], "alpaca": ["instruction", "output"], "prompt_completion": ["prompt", "completion"],
           "text": ["text"]}
# the roles chat templates take (developer: gpt-oss; ipython: Llama 3.1's tool results; function: older OpenAI's)
ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function")
_RESULTS = ("tool", "ipython", "function")  # tool results: templates may render them as JSON (quoted, escaped)


def _format_of(fields) -> str | None:
    return next((fmt for fmt, needed in _NEEDED.items() if set(needed) <= set(fields)), None)


def detect_format(columns: list[str], source: str) -> str:
    cols = set(columns)
    if fmt := _format_of(cols):
        return fmt
    # a row that has half of a format lacks the other half: name what is missing, not what is extra
    for needed in ({"instruction", "output"}, {"prompt", "completion"}):
        if cols & needed:
            raise QMiLoRAError(f"data {source}: rows have {', '.join(sorted(cols & needed))} but no "
                               f"{', '.join(sorted(needed - cols))} field (the response to learn)")
    raise QMiLoRAError(f"data {source}: unknown fields {sorted(cols)}; expected messages, instruction+output, "
                       "prompt+completion or text")


def build_dataset(cfg: DataConfig, tokenizer):
    """Tokenized {input_ids, attention_mask, labels} rows, plus an eval split when `val_size` > 0."""
    import jinja2

    source = cfg.data or BUNDLED
    rows = load_rows(cfg)
    columns = rows.column_names if hasattr(rows, "column_names") else list(dict.fromkeys(k for r in rows for k in r))
    # a file mixing formats has the first row's: the error then names the first row of another format
    fmt = cfg.data_format if cfg.data_format != "auto" else (_format_of(_filled(rows[0]))
                                                             or detect_format(columns, source))
    missing = [c for c in _NEEDED[fmt] if c not in columns]
    if missing:
        raise QMiLoRAError(f"data {source}: format {fmt} needs field(s) {', '.join(missing)}, found {columns}")
    apply_template(tokenizer, cfg)
    if fmt == "chat" and not tokenizer.chat_template:
        raise QMiLoRAError(f"data {source} is in chat format but there is no chat template (the tokenizer has none, "
                           "or --chat_template none); pass --chat_template FILE")
    examples = []
    for i, row in enumerate(rows):
        try:
            own = _format_of(_filled(row))
            if own not in (None, fmt) and not set(_NEEDED[fmt]) <= set(_filled(row)):
                raise ValueError(f"a {own} row ({', '.join(_NEEDED[own])}) where the rows are {fmt} "
                                 f"({', '.join(_NEEDED[fmt])}); a data file holds one format")
            examples.append(encode(row, fmt, tokenizer, cfg))
        except (ValueError, TypeError, AttributeError, KeyError) as err:  # a malformed row, whatever broke on it
            raise QMiLoRAError(f"data {source}, row {i + 1}: {err}") from None
        except jinja2.TemplateError as err:  # the template's own raise_exception (roles must alternate, ...)
            raise QMiLoRAError(f"data {source}, row {i + 1}: the chat template refuses it: {err}") from None
    kept = [e for e in examples if any(label != IGNORE for label in e["labels"])]
    if not kept:
        raise QMiLoRAError(f"data {source}: every example lost its response to truncation at max_seq_length="
                           f"{cfg.max_seq_length}; raise --max_seq_length")
    if len(kept) < len(examples):
        log.warning("qmilora: dropped %d of %d examples whose response was truncated away", len(examples) - len(kept), len(examples))
    import datasets

    data = datasets.Dataset.from_list(kept)
    if not cfg.val_size:
        return data, None, fmt
    n_val = int(cfg.val_size) if cfg.val_size >= 1 else max(1, round(cfg.val_size * len(data)))
    if n_val >= len(data):
        raise QMiLoRAError(f"data {source}: val_size {cfg.val_size} leaves no training rows out of {len(data)}")
    split = data.train_test_split(test_size=n_val, seed=0, shuffle=True)
    return split["train"], split["test"], fmt


def _filled(row: dict) -> list[str]:
    """The fields a row gives a value (a hub dataset's row holds every column, None where it has none)."""
    return [k for k, v in row.items() if v is not None]


def apply_template(tokenizer, cfg: DataConfig) -> None:
    """Set on `tokenizer` the chat template `cfg` asks for (see the module docstring). Applying it again to a
    tokenizer it was applied to changes nothing, so a run's saved tokenizer renders as in training."""
    if isinstance(tokenizer.chat_template, dict):  # named templates (tool use, ...): rows render with the default
        tokenizer.chat_template = tokenizer.chat_template.get("default")
    if cfg.chat_template == "none":
        tokenizer.chat_template = None
    elif cfg.chat_template != "model":
        path = os.path.expanduser(cfg.chat_template)
        try:
            with open(path, encoding="utf-8") as f:
                tokenizer.chat_template = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise QMiLoRAError(f"--chat_template {path}: cannot read it ({err})") from None
        if not tokenizer.chat_template.strip():
            raise QMiLoRAError(f"--chat_template {path} is empty; pass a Jinja chat template file, or "
                               "--chat_template none to render without a template")
        _check_syntax(tokenizer, path)
    if not tokenizer.chat_template:
        if cfg.system_prompt is not None:
            raise QMiLoRAError("--system_prompt needs a chat template; this run renders without one")
        return
    if cfg.system_prompt is None and cfg.chat_template != "model":
        return  # a template file is used as written
    default = cfg.system_prompt if cfg.system_prompt is not None else ""
    if cfg.system_prompt is None and not injected_system_prompt(tokenizer):
        return
    # rows without a system message get this one (an empty one: the template's own default is not used)
    tokenizer.chat_template = ("{%- if messages and messages[0]['role'] != 'system' %}{%- set messages = "
                               f"[{{'role': 'system', 'content': {json.dumps(default)}}}] + messages %}}"
                               "{%- endif %}" + tokenizer.chat_template)
    if cfg.system_prompt is not None:
        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL_USER}], tokenize=False)
        except Exception as err:  # a template that refuses system messages raises its own exception
            raise QMiLoRAError(f"the chat template does not take a system prompt: {_first_line(err)}") from None
        if cfg.system_prompt and cfg.system_prompt not in rendered:
            raise QMiLoRAError("the chat template drops the system prompt (--system_prompt has no effect with it)")


def _check_syntax(tokenizer, path: str) -> None:
    """A template file that is not valid Jinja fails here, named, not at the first row."""
    import jinja2

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL_USER}], tokenize=False)
    except jinja2.TemplateSyntaxError as err:
        raise QMiLoRAError(f"--chat_template {path}: not a valid Jinja template: {(err.message or '').rstrip('.')} "
                           f"(line {err.lineno}); fix the template") from None
    except Exception:  # a template may refuse this one-message conversation; the rows say so if they are refused
        pass


def injected_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template adds by itself to a conversation without one, or None. Found by rendering
    a conversation with a sentinel system message and one without: a template that injects renders the same
    system-turn markers around its own text."""
    render = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False)  # noqa: E731
    user = {"role": "user", "content": _SENTINEL_USER}
    try:
        plain = render([user])
        with_system = render([{"role": "system", "content": _SENTINEL_SYSTEM}, user])
    except Exception:  # a template without system messages injects none
        return None
    if _SENTINEL_SYSTEM not in with_system or _SENTINEL_USER not in plain:
        return None
    before, after = with_system.split(_SENTINEL_SYSTEM, 1)
    between = after.split(_SENTINEL_USER, 1)[0]
    head = plain.split(_SENTINEL_USER, 1)[0]
    if head.startswith(before) and head.endswith(between) and len(head) > len(before) + len(between):
        return head[len(before): len(head) - len(between)]
    return None


def show_example(row: dict, tokenizer, most: int = 1024) -> str:
    """A tokenized example as text with its supervised spans marked [[like this]], for the start-of-run log; of a
    longer example, its first and last most/2 tokens (a long-context row would fill the log)."""
    ids, labels = row["input_ids"], row["labels"]
    if len(ids) > most:
        half = most // 2
        head = show_example({"input_ids": ids[:half], "labels": labels[:half]}, tokenizer, most)
        tail = show_example({"input_ids": ids[-half:], "labels": labels[-half:]}, tokenizer, most)
        return f"{head} [... {len(ids) - 2 * half} tokens ...] {tail}"
    parts, start = [], 0
    for i in range(1, len(ids) + 1):  # decode runs of equal supervision, not single tokens (multi-byte characters)
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(ids[start:i])
            parts.append(f"[[{text}]]" if labels[start] != IGNORE else text)
            start = i
    return "".join(parts)


def encode(row: dict, fmt: str, tokenizer, cfg: DataConfig) -> dict:
    """One row → token ids with labels (IGNORE on prompt tokens unless train_on_prompt), truncated."""
    if fmt == "text":
        text = _text(row["text"], "text")
        if not text or not text.strip():
            raise ValueError("empty text")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + _eos(tokenizer)
        return _finish(ids, list(ids), cfg)
    if fmt == "chat":
        return _encode_chat(row["messages"], tokenizer, cfg)
    if fmt == "alpaca":
        instruction, extra = _text(row.get("instruction"), "instruction"), _text(row.get("input"), "input")
        extra = extra if extra and extra.strip() else None
        prompt_user = f"{instruction}\n\n{extra}" if instruction and extra else instruction
        response = _text(row.get("output"), "output")
    else:
        prompt_user, response = _text(row.get("prompt"), "prompt"), _text(row.get("completion"), "completion")
    if not response or not response.strip():
        raise ValueError("no response (empty output/completion)")
    if not prompt_user or not prompt_user.strip():
        raise ValueError("empty instruction/prompt")
    if tokenizer.chat_template:
        return _encode_chat([{"role": "user", "content": prompt_user}, {"role": "assistant", "content": response}],
                            tokenizer, cfg)
    if fmt == "alpaca":
        prompt = _ALPACA_PROMPT.format(instruction=instruction, input=f"### Input:\n{extra}\n\n" if extra else "")
    else:
        prompt = prompt_user
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + _eos(tokenizer)
    labels = (list(p) if cfg.train_on_prompt else [IGNORE] * len(p)) + r
    return _finish(p + r, labels, cfg)


def _text(value, name: str) -> str | None:
    """A text field's value as text, alike on every rendering path: a number as written (42 → "42"; a JSON 2.50
    → "2.50"), None or NaN (a missing cell of a typed table) as None. A boolean is refused: true, True or 1?"""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name} is the boolean {json.dumps(value)}; write the text to learn as a string")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return None if value != value else getattr(value, "text", repr(value))
    raise ValueError(f"{name} must be text (a string or a number), got {type(value).__name__}")


def _encode_chat(messages, tokenizer, cfg: DataConfig) -> dict:
    """Render with the chat template; label the assistant turns' tokens (located by prefix renders)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ValueError("each message must be an object with string fields role and content")
    messages = [{**m, "content": _text(m.get("content"), f"message {k + 1}'s content")} for k, m in enumerate(messages)]
    for k, m in enumerate(messages):
        if m["content"] is None and m.get("tool_calls"):  # an assistant turn that only calls tools (OpenAI's form)
            m["content"] = ""
        if m["content"] is None:
            raise ValueError("each message must be an object with string fields role and content")
        if m["role"] not in ROLES:
            # a template renders any role it is given (<|wizard|>): a misspelt role would train as written
            raise ValueError(f"message {k + 1} has role {m['role']!r}; use {', '.join(ROLES[:-1])} or {ROLES[-1]}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("no response (no non-empty assistant message)")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    flat = "".join(full.split())  # whitespace aside: templates trim content, or put newlines around it
    for k, m in enumerate(messages):
        if m["role"] not in _RESULTS and "".join(m["content"].split()) not in flat:
            which = "of the model" if cfg.chat_template in TEMPLATES else cfg.chat_template
            raise ValueError(f"the chat template {which} leaves out part of message {k + 1} ({m['role']}): templates "
                             "drop e.g. <think> reasoning, a system prompt shown only before a final user turn, or "
                             "text beside tool calls; remove that part from the data, or pass --chat_template FILE "
                             "with a template that renders it")
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:k], True)), len(render(messages[: k + 1], False))
        if not full.startswith(render(messages[: k + 1], False)):
            raise ValueError("the chat template renders earlier turns differently in longer conversations")
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    in_response = [any(s <= a < e for s, e in spans) for a, _ in offsets]
    labels = [t if (cfg.train_on_prompt or r) else IGNORE for t, r in zip(ids, in_response)]
    return _finish(ids, labels, cfg)


def _finish(ids: list[int], labels: list[int], cfg: DataConfig) -> dict:
    ids, labels = ids[: cfg.max_seq_length], labels[: cfg.max_seq_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
