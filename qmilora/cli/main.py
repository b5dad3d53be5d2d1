"""qmilora <verb>: one entry point for every command (the qmilora-<verb> scripts are aliases).

    qmilora train    finetune (MiLoRA factors on an NF4 residual)
    qmilora export   the trained model as a plain checkpoint, or a LoRA / merged weights for the original base
    qmilora generate answer a prompt with a trained run
    qmilora eval     loss / perplexity of a trained run on held-out data
    qmilora plan     memory plan from config.json alone
    qmilora inspect  spectrum and 4-bit error per weight

`qmilora <verb> --help` lists that verb's flags. `python -m qmilora <verb>` works too (e.g. under torchrun).
"""
from __future__ import annotations

import importlib
import sys

VERBS = ("train", "export", "generate", "eval", "plan", "inspect")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"qmilora: error: unknown command {verb!r}; choose one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    return run_verb(verb, rest)


def run_verb(verb: str, argv: list[str] | None = None) -> int:
    """`qmilora-<verb>`: help and argument errors from the cached flag table when there is one (no torch import),
    else, and for valid arguments, the verb's own module."""
    from .flags import early

    argv = sys.argv[1:] if argv is None else argv
    code = early(f"qmilora-{verb}", argv)
    if code is not None:
        return code
    return importlib.import_module(f"qmilora.cli.{verb}").main(argv)


def _script(verb: str):
    def entry(argv: list[str] | None = None) -> int:
        return run_verb(verb, argv)

    entry.__name__ = entry.__qualname__ = f"{verb}_main"
    return entry


# the qmilora-<verb> console scripts (pyproject.toml)
# (by name: a reordered VERBS must not make one script run another verb)
train_main, export_main, generate_main = _script("train"), _script("export"), _script("generate")
eval_main, plan_main, inspect_main = _script("eval"), _script("plan"), _script("inspect")


if __name__ == "__main__":
    sys.exit(main())
