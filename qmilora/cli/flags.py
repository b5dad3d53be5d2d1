"""Help and argument errors in a fraction of a second: each verb's table of flags, kept beside the cache.

A verb's flags come from dataclasses that live beside torch, transformers and peft (qmilora-train's include every
`TrainingArguments` field, whose module imports peft): building the real parser takes 7–11 s on a small CPU, most of
it imports. So whenever a real parser is built, its table (option strings, nargs, choices, value types, required
flags, the help text as it renders) is written as JSON under `<cache>/cli/`; later calls rebuild a plain argparse
parser from it before importing anything heavy, print `--help` from it, and reject what it rejects with the same one
line. Arguments it accepts go on to the real parser, so the table never decides a value: it can only answer help
or refuse, and it refuses only what the real parser refuses (tests/test_cli_flags.py compares the two).

The table is keyed by everything that changes the flags or their shown defaults: qmilora's source, the Python,
transformers and torch versions, and whether a GPU may be visible (qmilora-train's defaults differ there).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys

FORMAT = 2
_TYPES = {"int": int, "float": float}  # builtins: same conversion, same "invalid int value" message
_BOOL_WORDS = ("yes", "no", "true", "false", "t", "f", "y", "n", "1", "0", "on", "off", "none", "")
_ACTIONS = {"_StoreAction": "store", "_StoreTrueAction": "store_true", "_StoreFalseAction": "store_false",
            "_StoreConstAction": "store_const"}


def cache_root() -> str:
    # the same folder as qmilora.config.default_cache_dir (which imports torch; tested equal)
    return os.environ.get("QMILORA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "qmilora"))


def key() -> str:
    from importlib import metadata

    digest = hashlib.sha256(f"{FORMAT} {sys.version}".encode())
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder, dirs, names in sorted(os.walk(package)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(n for n in names if n.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    for dist in ("transformers", "torch"):
        try:
            digest.update(f"{dist} {metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{dist} -".encode())
    gpu = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")  # a device node, without importing torch
    digest.update(f"gpu {gpu} {os.environ.get('CUDA_VISIBLE_DEVICES')!r}".encode())
    return digest.hexdigest()[:20]


def _path(prog: str) -> str:
    return os.path.join(cache_root(), "cli", f"{prog}-{key()}.json")


def remember(prog: str, parser: argparse.ArgumentParser) -> None:
    """Write `parser`'s table unless it is there already; any failure (read-only home, ...) only costs speed."""
    try:
        path = _path(prog)
        if os.path.exists(path):
            return
        spec = json.dumps(table(parser))
        os.makedirs(cache_root(), mode=0o700, exist_ok=True)  # private like the rest of the cache
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        from ..files import write_atomic  # torch is loaded by now: the real parser was just built

        write_atomic(path, spec.encode(), private=True)
        for name in os.listdir(os.path.dirname(path)):  # tables of earlier versions
            if name.startswith(f"{prog}-") and name != os.path.basename(path) and name.endswith(".json"):
                os.unlink(os.path.join(os.path.dirname(path), name))
    except Exception:  # noqa: BLE001 - a help cache must never stop a command (argparse internals may change)
        pass  # a write cut short leaves a marked temporary that the next atomic write there removes


def table(parser: argparse.ArgumentParser) -> dict:
    formatter = parser._get_formatter()
    group_of = {id(a): i for i, g in enumerate(parser._action_groups) for a in g._group_actions}
    actions = []
    for action in parser._actions:  # in the order the usage line lists them
        if isinstance(action, argparse._HelpAction):
            continue
        kind = _ACTIONS.get(type(action).__name__, "store")
        help_text = action.help
        if help_text and help_text != argparse.SUPPRESS:
            help_text = formatter._expand_help(action)  # defaults filled in, as the real parser shows them
        choices = list(action.choices) if action.choices is not None else None
        checked = choices is not None and all(isinstance(c, str) for c in choices)
        metavar = action.metavar
        if choices is not None and not checked and metavar is None:
            metavar = "{" + ",".join(map(str, choices)) + "}"  # shown as the real parser shows it, not checked
        type_name = getattr(action.type, "__name__", None)
        actions.append({"flags": action.option_strings, "dest": action.dest, "kind": kind,
                        "group": group_of[id(action)], "nargs": action.nargs if kind == "store" else None,
                        "const": action.const if isinstance(action.const, (bool, int, float, str)) else None,
                        "type": type_name if type_name in (*_TYPES, "string_to_bool") else None,
                        "choices": choices if checked else None, "required": action.required,
                        "help": help_text, "metavar": metavar})
    return {"description": parser.description, "allow_abbrev": parser.allow_abbrev,
            "groups": [{"title": g.title, "description": g.description} for g in parser._action_groups],
            "actions": actions, "bool_error": _bool_error(parser), "bool_words": _bool_words(parser)}


def _string_to_bool(parser):
    for action in parser._actions:
        if getattr(action.type, "__name__", None) == "string_to_bool":
            return action.type
    return None


def _bool_error(parser) -> str | None:
    """The real converter's message for a bad value, with {} where the value goes."""
    convert = _string_to_bool(parser)
    if convert is None:
        return None
    try:
        convert("@@value@@")
    except (argparse.ArgumentTypeError, ValueError) as err:
        return str(err).replace("{", "{{").replace("}", "}}").replace("@@value@@", "{}")
    return None


def _bool_words(parser) -> list[str]:
    convert = _string_to_bool(parser)
    accepted = []
    for word in _BOOL_WORDS if convert is not None else ():
        try:
            convert(word)
            accepted.append(word)
        except (argparse.ArgumentTypeError, ValueError):
            pass
    return accepted


class _Refused(Exception):
    pass


def _rebuild(prog: str, spec: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=spec["description"], allow_abbrev=spec["allow_abbrev"])

    def error(message):
        raise _Refused(message)

    parser.error = error
    words = set(spec["bool_words"])

    def string_to_bool(value):
        if isinstance(value, bool) or value.lower() in words or spec["bool_error"] is None:
            return value
        raise argparse.ArgumentTypeError(spec["bool_error"].format(value))

    types = {**_TYPES, "string_to_bool": string_to_bool}
    groups = []
    for group in spec["groups"]:
        if group["title"] == parser._optionals.title:
            groups.append(parser._optionals)
        elif group["title"] == parser._positionals.title:
            groups.append(parser._positionals)
        else:
            groups.append(parser.add_argument_group(group["title"], group["description"]))
    for a in spec["actions"]:
        help_text = a["help"]
        if help_text and help_text != argparse.SUPPRESS:
            help_text = help_text.replace("%", "%%")  # already expanded
        kwargs = {"dest": a["dest"], "help": help_text, "required": a["required"]}
        if a["kind"] == "store":
            kwargs.update(nargs=a["nargs"], type=types.get(a["type"]), choices=a["choices"], metavar=a["metavar"])
            if a["nargs"] == "?":
                kwargs["const"] = a["const"]
        else:
            kwargs["action"] = a["kind"]
            if a["kind"] == "store_const":
                kwargs["const"] = a["const"]
        groups[a["group"]].add_argument(*a["flags"], **kwargs)
    return parser


def _load(prog: str) -> dict | None:
    try:
        fd = os.open(_path(prog), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None  # written by someone else: build the real parser instead
        try:
            return json.load(f)
        except ValueError:
            return None


def early(prog: str, argv: list[str]) -> int | None:
    """From the cached table: print --help (SystemExit 0), or print a refusal as one line and return 1; None when
    there is no table or it accepts `argv` (the real parser then runs)."""
    spec = _load(prog)
    if spec is None:
        return None
    try:
        parser = _rebuild(prog, spec)
    except Exception:  # noqa: BLE001 - a table this code cannot read: the real parser decides
        return None
    try:
        _, rest = parser.parse_known_args(argv)
    except _Refused as err:
        message = f"{err} (see --help)"
    else:
        if not rest:
            return None
        message = f"unrecognized arguments: {' '.join(rest)}"
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1
