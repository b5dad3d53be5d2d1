"""qmilora-train: MiLoRA finetuning on a 4-bit residual. Flags come from the config dataclasses."""
from __future__ import annotations

import sys
import warnings

from . import bare_booleans, one_line_errors, run as run_cli, tidy_negations


def build_parser():
    """The real parser (imports transformers, torch and peft: seconds), and how many dataclass groups it fills."""
    from transformers import HfArgumentParser

    from ..config import QMiLoRAConfig
    from ..data import DataConfig
    from ..train import RunConfig, TrainerArguments, training_defaults

    groups = (RunConfig, QMiLoRAConfig, DataConfig, TrainerArguments)
    parser = one_line_errors(HfArgumentParser(groups, prog="qmilora-train", description=__doc__))
    parser.add_argument("--config", help="YAML file of flag values; flags given on the command line override it")
    parser.set_defaults(**training_defaults())
    # TrainingArguments requires output_dir; keep the conventional --output_dir while giving a readable default.
    parser.set_defaults(output_dir="qmilora-output")
    # HfArgumentParser adds --no_<flag> only where the dataclass defaults to true; these are true by our defaults
    from transformers.hf_argparser import string_to_bool

    for name, value in training_defaults().items():
        action = parser._option_string_actions.get(f"--{name}")
        if value is True and action is not None and action.type is string_to_bool \
                and f"--no_{name}" not in parser._option_string_actions:
            parser.add_argument(f"--no_{name}", action="store_false", dest=name)
    return bare_booleans(tidy_negations(parser)), len(groups)


# transformers' deprecated names, used when the new one is not given (TrainingArguments' rule); our default for the
# new name would otherwise always win over them
_OLD_NAMES = {"gradient_checkpointing": "activation_checkpointing",
              "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def yaml_keys(parser, values: dict, path: str) -> dict:
    """A recipe's keys as the parser's destinations: every flag name and alias (`lora_r`, `max_length`,
    `model_name_or_path`) without its dashes; a --no_ negation is no key (`no_x: true` would read as x true)."""
    import argparse

    from ..config import QMiLoRAError

    names = {}
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction):
            continue
        for option in action.option_strings:
            names.setdefault(option.lstrip("-"), action.dest)
    unknown = sorted(k for k in values if k not in names)
    if unknown:
        raise QMiLoRAError(f"--config {path}: unknown keys {', '.join(map(str, unknown))}")
    out, seen = {}, {}
    for key, value in values.items():
        if names[key] in seen:
            raise QMiLoRAError(f"--config {path}: {seen[names[key]]} and {key} name the same setting; keep one")
        out[names[key]], seen[names[key]] = value, key
    return out


def parse(argv: list[str]):
    import yaml

    from ..config import QMiLoRAError
    from .flags import remember

    parser, n_groups = build_parser()
    remember("qmilora-train", parser)
    pre, _ = parser.parse_known_args(argv)
    recipe = {}
    if pre.config:
        try:
            with open(pre.config) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            raise QMiLoRAError(f"--config {pre.config}: {err}") from None
        if not isinstance(values, dict):
            raise QMiLoRAError(f"--config {pre.config}: expected a mapping of flag names to values")
        recipe = yaml_keys(parser, values, pre.config)
        parser.set_defaults(**recipe)
    given, _ = parser.parse_known_args(argv)
    for old, new in _OLD_NAMES.items():
        if getattr(given, old, None) is not None and new not in recipe:  # a new name given anywhere wins
            parser.set_defaults(**{new: None})
    # -> one instance per dataclass, a Namespace holding --config, and the strings no flag took
    with warnings.catch_warnings():  # the old names are aliases here, as the ecosystem's recipes use them
        warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
        *parsed, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        raise QMiLoRAError(f"unrecognized arguments: {' '.join(rest)}")
    return parsed[:n_groups]


def main(argv: list[str] | None = None) -> int:
    def body():
        from ..train import train

        run, qcfg, dcfg, args = parse(sys.argv[1:] if argv is None else argv)
        _, summary = train(run, qcfg, dcfg, args)
        if args.process_index == 0:  # one summary for a multi-process run
            print("qmilora-train: " + ", ".join(f"{k} {v}" for k, v in summary.items()))

    return run_cli("qmilora-train", body)


if __name__ == "__main__":
    sys.exit(main())
