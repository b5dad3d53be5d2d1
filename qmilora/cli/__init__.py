"""Thin entry points. Each parses its flags from dataclasses and reports any failure as one line, exit 1."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


def run(prog: str, body: Callable[[], None]) -> int:
    """Run a command's body; every failure is one line on stderr and a non-zero exit (the traceback of an
    unexpected one with QMILORA_DEBUG=1)."""
    import torch  # here, not at import: `--help` and argument errors are answered without it (cli/flags.py)

    from ..config import QMiLoRAError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        body()
    except (QMiLoRAError, ValueError, FileNotFoundError) as err:
        # a check of the input fails alike in every process of a torchrun / accelerate job: the main one says it
        if _rank() == 0:
            _error(prog, err)
        return 1
    except torch.OutOfMemoryError:
        _error(prog, "out of memory; lower --per_device_train_batch_size or --max_seq_length, or raise "
                     "--gradient_accumulation_steps")
        return 1
    except KeyboardInterrupt:
        if _rank() != 0:  # Ctrl-C reaches every process of a job
            return 130
        _error(prog, "interrupted; files written so far are complete" + (
            " (a run that saved a checkpoint resumes from it with --resume_from_checkpoint true)"
            if prog == "qmilora-train" else ""))
        return 130
    except Exception as err:
        if os.environ.get("QMILORA_DEBUG"):
            raise
        _error(prog, _known(err) or f"unexpected {type(err).__name__}: {err} (set QMILORA_DEBUG=1 for the traceback)")
        return 1
    return 0


def _rank() -> int:
    """This process's global rank under torchrun / accelerate launch (0 when launched alone)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _known(err: Exception) -> str | None:
    """What to tell the user for failures that come from outside qmilora's own checks (the disk, files a library
    unpickles, a model's chat template), or None."""
    import errno
    import pickle

    no_space = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    if no_space or "No space left on device" in str(err) or "os error 28" in str(err):  # safetensors' Rust errors too
        where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
        return (f"no space left on the device{where}; free some space (a training run then resumes from its last "
                "complete checkpoint with --resume_from_checkpoint true)")
    if isinstance(err, pickle.UnpicklingError):
        return (f"torch refused to unpickle a checkpoint file ({str(err).splitlines()[0][:160]}): it holds objects "
                "that safe loading does not allow, so it was not written by this training setup; resume from "
                "another checkpoint, or start a new run")
    if type(err).__name__ == "SafetensorError":
        return (f"a .safetensors file is damaged or truncated ({str(err).splitlines()[0][:160]}); restore it from "
                "where it came from, or write it again")
    if type(err).__name__.endswith("ValidationError"):  # transformers' strict config classes
        return f"the model's config.json is invalid: {str(err).splitlines()[0][:200]}"
    if type(err).__module__.startswith("jinja2") and type(err).__name__ == "SecurityError":
        return (f"the chat template tried something the template sandbox forbids ({err}); fix the template "
                "(--chat_template) or render without one")
    return None


def _error(prog: str, message) -> None:
    text = " ".join(str(message).split()) or "(no message)"  # one line, whatever the exception carried
    rank = _rank()
    where = f" (process {rank})" if rank else ""  # a failure of one process only, e.g. out of memory
    print(f"{prog}: error{where}: {text}", file=sys.stderr)


def parse_flags(prog: str, groups: tuple, argv: list[str], description: str | None = None):
    """Parse `argv` into one instance per dataclass in `groups`; unknown flags are an error."""
    from transformers import HfArgumentParser

    from ..config import QMiLoRAError
    from .flags import remember

    parser = bare_booleans(tidy_negations(one_line_errors(HfArgumentParser(groups, prog=prog, description=description))))
    remember(prog, parser)
    *parsed, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        raise QMiLoRAError(f"unrecognized arguments: {' '.join(rest)}")
    return parsed[: len(groups)]


def one_line_errors(parser):
    """argparse prints its usage block before an error; make a bad flag one line like every other error."""
    from ..config import QMiLoRAError

    def error(message):
        raise QMiLoRAError(f"{message} (see --help)")

    parser.error = error
    return parser


def tidy_negations(parser):
    """HfArgumentParser adds `--no_<flag>` for each boolean that defaults to true, repeating the flag's help and
    showing "(default: False)", the opposite of the truth: say what it does instead."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0] == f"--no_{action.dest}":
            action.help = f"The same as --{action.dest} false."
            action.default = argparse.SUPPRESS  # shown by no formatter; the flag's own action holds the default
    return parser


def bare_booleans(parser):
    """A `bool | None` field (None: decided by the run) takes true/false like a bool field, and a bare `--flag` means
    true as it does for bool fields; HfArgumentParser would demand a value."""
    from transformers.hf_argparser import string_to_bool

    for action in parser._actions:
        if action.type is string_to_bool and action.nargs is None and action.option_strings:
            action.nargs, action.const = "?", True
    return parser
