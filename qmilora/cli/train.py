"""qmilora-train: MiLoRA finetuning on a 4-bit residual. Flags come from the config dataclasses."""
from __future__ import annotations

import sys

import yaml
from transformers import HfArgumentParser, TrainingArguments

from . import one_line_errors, run as run_cli
from ..config import QMiLoRAConfig, QMiLoRAError
from ..data import DataConfig
from ..train import RunConfig, train, training_defaults

class TrainerArguments(TrainingArguments):
    """transformers' TrainingArguments under a heading of their own, after QMiLoRA's groups in --help."""
    _argument_group_name = "Trainer (every transformers.TrainingArguments field; --resume_from_checkpoint takes true, last or a path)"


GROUPS = (RunConfig, QMiLoRAConfig, DataConfig, TrainerArguments)


def build_parser() -> HfArgumentParser:
    parser = one_line_errors(HfArgumentParser(GROUPS, prog="qmilora-train", description=__doc__))
    parser.add_argument("--config", help="YAML file of flag values; flags given on the command line override it")
    parser.set_defaults(**training_defaults())
    # TrainingArguments requires output_dir; keep the conventional --output_dir while giving a readable default.
    parser.set_defaults(output_dir="qmilora-output")
    return parser


def parse(argv: list[str]):
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            with open(pre.config) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            raise QMiLoRAError(f"--config {pre.config}: {err}") from None
        if not isinstance(values, dict):
            raise QMiLoRAError(f"--config {pre.config}: expected a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise QMiLoRAError(f"--config {pre.config}: unknown keys {', '.join(unknown)}")
        parser.set_defaults(**values)
    # -> one instance per dataclass, a Namespace holding --config, and the strings no flag took
    *parsed, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        raise QMiLoRAError(f"unrecognized arguments: {' '.join(rest)}")
    return parsed[: len(GROUPS)]


def main(argv: list[str] | None = None) -> int:
    def body():
        run, qcfg, dcfg, args = parse(sys.argv[1:] if argv is None else argv)
        _, summary = train(run, qcfg, dcfg, args)
        if args.process_index == 0:  # one summary for a multi-process run
            print("qmilora-train: " + ", ".join(f"{k} {v}" for k, v in summary.items()))

    return run_cli("qmilora-train", body)


if __name__ == "__main__":
    sys.exit(main())
