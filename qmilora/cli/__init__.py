"""Thin entry points. Each parses its flags from dataclasses and reports any failure as one line, exit 1."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch

from ..config import QMiLoRAError


def run(prog: str, body: Callable[[], None]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        body()
    except (QMiLoRAError, ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"{prog}: error: out of memory; lower --per_device_train_batch_size or --max_seq_length, "
              "or raise --gradient_accumulation_steps", file=sys.stderr)
        return 1
    return 0


def parse_flags(prog: str, groups: tuple, argv: list[str], description: str | None = None):
    """Parse `argv` into one instance per dataclass in `groups`; unknown flags are an error."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(groups, prog=prog, description=description)
    *parsed, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        raise QMiLoRAError(f"unrecognized arguments: {' '.join(rest)}")
    return parsed[: len(groups)]
