"""The cached flag tables (qmilora/cli/flags.py) answer --help and refuse bad arguments exactly as the real parsers
do, and a verb answered from its table never imports torch."""
import argparse
import importlib
import os
import subprocess
import sys

import pytest

from qmilora.cli import flags
from qmilora.cli.main import VERBS


def real_parser(verb, monkeypatch, capsys):
    """The parser the verb builds (captured where it is remembered), after `--help` wrote its table."""
    seen = []
    original = flags.remember
    monkeypatch.setattr(flags, "remember", lambda prog, parser: (seen.append(parser), original(prog, parser)))
    module = importlib.import_module(f"qmilora.cli.{verb}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    return seen[-1], capsys.readouterr().out


def samples(parser):
    """(argv, checked): argv for every flag, good and bad values; checked when the table must decide them alike
    (types it checks: int, float, true/false words, string choices; unknown flags; a missing required flag)."""
    out = [(["--no-such-flag"], True), (["--no-such-flag", "3", "x"], True), ([], True)]
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        kind = getattr(action.type, "__name__", None)
        if action.nargs == 0:
            out.append(([flag], True))
        elif action.choices is not None and all(isinstance(c, str) for c in action.choices):
            out += [([flag, c], True) for c in action.choices] + [([flag, "not-a-choice"], True)]
        elif kind == "string_to_bool":
            out += [([flag, w], True) for w in ("true", "False", "yes", "0", "maybe")]
            if action.nargs == "?":
                out.append(([flag], True))
        elif kind in ("int", "float"):
            out += [([flag, "3"], True), ([flag, "x"], True), ([flag, "-1"], True)]
        else:
            out.append(([flag, "x"], kind in (None, "str")))
    return out


def outcome_real(parser, argv):
    try:
        _, rest = parser.parse_known_args(argv)
    except Exception as err:  # one_line_errors raises QMiLoRAError
        return f"{err}"
    return f"unrecognized arguments: {' '.join(rest)}" if rest else None


def outcome_table(prog, argv, capsys):
    code = flags.early(prog, argv)
    err = capsys.readouterr().err
    if code is None:
        return None
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err.strip().removeprefix(f"{prog}: error: ")


@pytest.mark.parametrize("verb", VERBS)
def test_table_answers_like_the_real_parser(verb, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")  # both render at one width
    parser, real_help = real_parser(verb, monkeypatch, capsys)
    prog = f"qmilora-{verb}"
    with pytest.raises(SystemExit) as exit_:
        assert flags.early(prog, ["--help"]) is None, "no table was written"
    assert exit_.value.code == 0
    assert capsys.readouterr().out == real_help
    required = [a for a in parser._actions if a.required]
    fill = [x for a in required for x in (a.option_strings[0], "x")]
    cases = samples(parser)
    assert len(cases) > 5
    for argv, checked in cases:
        full = argv if argv == [] else fill + argv
        real, table = outcome_real(parser, full), outcome_table(prog, full, capsys)
        if checked:
            assert table == real, (full, table, real)
        else:  # a type the table does not check: it may accept what the real parser then refuses, never the reverse
            assert table is None or table == real, (full, table, real)


@pytest.mark.slow
def test_help_and_errors_without_torch(tmp_path):
    """With the tables written, `qmilora-<verb> --help` and a refused flag import neither torch nor transformers."""
    env = {**os.environ, "QMILORA_CACHE": str(tmp_path)}
    probe = ("import sys\nfrom qmilora.cli.main import run_verb\n"
             "try:\n    code = run_verb(sys.argv[1], sys.argv[2:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('IMPORTED', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules), code)\n")
    for verb in VERBS:
        first = subprocess.run([sys.executable, "-c", probe, verb, "--help"], env=env, capture_output=True, text=True)
        assert first.returncode == 0 and "'torch'" in first.stdout.splitlines()[-1], first.stderr[-500:]  # builds it
        again = subprocess.run([sys.executable, "-c", probe, verb, "--help"], env=env, capture_output=True, text=True)
        assert again.stdout.rstrip().endswith("IMPORTED [] 0"), again.stdout[-300:]
        assert f"usage: qmilora-{verb}" in again.stdout
        bad = subprocess.run([sys.executable, "-c", probe, verb, "--no-such-flag"], env=env, capture_output=True,
                             text=True)
        assert bad.stdout.rstrip().endswith("IMPORTED [] 1")
        assert bad.stderr == f"qmilora-{verb}: error: unrecognized arguments: --no-such-flag\n" or (
            verb in ("eval", "generate", "export", "plan") and "required" in bad.stderr), bad.stderr


def test_table_is_keyed_by_the_source_and_lives_in_the_cache(monkeypatch, tmp_path):
    from qmilora.config import default_cache_dir

    for value in (str(tmp_path / "c"), None):
        if value:
            monkeypatch.setenv("QMILORA_CACHE", value)
        else:
            monkeypatch.delenv("QMILORA_CACHE")
        assert flags.cache_root() == default_cache_dir()
    k = flags.key()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert flags.key() != k  # qmilora-train's defaults depend on the GPU


def test_a_table_written_by_another_account_or_damaged_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("QMILORA_CACHE", str(tmp_path))
    parser = argparse.ArgumentParser(prog="qmilora-x")
    parser.add_argument("--n", type=int)
    flags.remember("qmilora-x", parser)
    assert flags.early("qmilora-x", ["--n", "x"]) == 1
    path = flags._path("qmilora-x")
    os.chmod(path, 0o666)
    assert flags.early("qmilora-x", ["--n", "x"]) is None  # others may write it: not trusted
    os.chmod(path, 0o600)
    with open(path, "w") as f:
        f.write("{not json")
    assert flags.early("qmilora-x", ["--n", "x"]) is None


@pytest.mark.parametrize("verb", ["train", "plan", "inspect"])
def test_negations_say_what_they_do(verb, monkeypatch, capsys):
    """`--no_<flag>` (added for booleans that default to true) reads as what it does, not as the flag's help with
    "(default: False)"."""
    parser, _ = real_parser(verb, monkeypatch, capsys)
    negations = [a for a in parser._actions if isinstance(a, argparse._StoreFalseAction)]
    assert negations
    for action in negations:
        assert action.help == f"The same as --{action.dest} false.", action.option_strings
        assert action.default is argparse.SUPPRESS  # shows no "(default: ...)"; the flag's own action holds it


def test_activation_checkpointing_has_one_name_across_verbs(monkeypatch, capsys):
    for verb in ("train", "plan"):
        parser, help_text = real_parser(verb, monkeypatch, capsys)
        assert "--activation_checkpointing" in help_text
        dests = {a.dest for a in parser._actions if "--gradient_checkpointing" in a.option_strings}
        # plan: an alias of the one flag; train: TrainingArguments' own older field, which transformers folds into
        # activation_checkpointing
        assert dests == ({"activation_checkpointing"} if verb == "plan" else {"gradient_checkpointing"}), (verb, dests)
