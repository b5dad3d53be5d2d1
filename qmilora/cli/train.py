"""qmilora-train: MiLoRA finetuning on a 4-bit residual. Flags come from the config dataclasses."""
from __future__ import annotations

import sys

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
    return bare_booleans(tidy_negations(parser)), len(groups)


def parse(argv: list[str]):
    import yaml

    from ..config import QMiLoRAError
    from .flags import remember

    parser, n_groups = build_parser()
    remember("qmilora-train", parser)
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
