"""qmilora-inspect: per target weight, the singular spectrum, the minor part's energy, and the NF4 error of QLoRA,
QMiLoRA and QPiSSA bases (streamed from the checkpoint like prepare_model). Writes a JSON and a PNG."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from . import parse_flags, run
from ..config import QMiLoRAConfig


@dataclass
class InspectArgs:
    model: str | None = field(default=None, metadata={"help": "Checkpoint directory or Hub id. Default: the demo model.", "aliases": ["--model_name_or_path"]})
    output: str = field(default="qmilora-inspect", metadata={"help": "Directory for report.json and spectra.png."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the contents of a non-empty --output directory."})


def inspect_checkpoint(args: InspectArgs, qcfg: QMiLoRAConfig) -> dict:
    """Per target weight of `args.model` (targets and rank from `qcfg`): spectrum, minor energy, NF4 errors."""
    from tqdm.auto import tqdm

    from .. import checkpoint
    from ..config import QMiLoRAError
    from ..demo import demo_model_dir
    from ..prepare import visit_target_weights
    from ..spectrum import inspect_weight

    directory = checkpoint.resolve(args.model or demo_model_dir(qcfg.cache_dir))
    rows, progress = [], []

    def visit(layer, weight):
        rows.append({"layer": layer, **inspect_weight(weight, qcfg.rank)})
        progress[0].update()

    try:
        visit_target_weights(directory, qcfg, visit,
                             on_start=lambda n: progress.append(tqdm(total=n, desc="qmilora-inspect", unit="weight")))
    finally:  # also on an error, so that the error line is the last thing printed
        for bar in progress:
            bar.close()
    if not rows:
        raise QMiLoRAError(f"{directory} holds none of the target weights")
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    summary = {"weights": len(rows), "rank": qcfg.rank, **{k: mean(k) for k in (
        "minor_energy", "nf4_error_qlora", "nf4_error_qmilora", "nf4_error_qpissa", "minor_error_share", "isotropic_share")}}
    summary["qmilora_over_qlora"] = summary["nf4_error_qmilora"] / summary["nf4_error_qlora"]
    summary["qpissa_over_qlora"] = summary["nf4_error_qpissa"] / summary["nf4_error_qlora"]
    return {"source": os.path.abspath(directory), "summary": summary, "weights": rows}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, r = report["weights"], report["summary"]["rank"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    kinds = {}
    for row in rows:
        kinds.setdefault(row["layer"].rpartition(".")[2], row)  # the first layer of each projection kind
    for kind, row in kinds.items():
        spectrum = row["spectrum"]
        x = [i / (len(spectrum) - 1) * min(row["shape"]) for i in range(len(spectrum))]
        left.semilogy(x, [s / spectrum[0] for s in spectrum], label=kind)
    k = min(min(row["shape"]) for row in kinds.values())
    left.axvspan(k - r, k, color="grey", alpha=0.2, label=f"minor band (r={r}, smallest layer)")
    left.set_xlabel("singular value index")
    left.set_ylabel("σ / σ_max")
    left.set_title("spectra (first block)")
    left.legend(fontsize=7)
    idx = range(len(rows))
    for key, label in (("nf4_error_qlora", "QLoRA NF4(W)"), ("nf4_error_qmilora", "QMiLoRA NF4(W−minor)"),
                       ("nf4_error_qpissa", "QPiSSA NF4(W−principal)")):
        right.plot(idx, [row[key] for row in rows], ".", markersize=3, label=label)
    right.set_xlabel("weight (checkpoint order)")
    right.set_ylabel("‖NF4 error‖ / ‖W‖")
    right.set_title("4-bit error of each recipe's frozen base")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    def body():
        from ..checkpoint import fresh_output
        from ..files import atomic_dir, check_disjoint, write_manifest

        args, qcfg = parse_flags("qmilora-inspect", (InspectArgs, QMiLoRAConfig), sys.argv[1:] if argv is None else argv,
                                 __doc__)
        # before the slow part: never the model or the cache, and over an earlier report only
        check_disjoint(args.output, {"the model checkpoint": args.model and os.path.expanduser(args.model),
                                     "the qmilora cache": qcfg.resolved_cache_dir})
        fresh_output(args.output, args.overwrite)
        report = inspect_checkpoint(args, qcfg)
        with atomic_dir(args.output, overwrite=args.overwrite, own_only="--overwrite") as tmp:
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(report, f, indent=1)
            plot(report, os.path.join(tmp, "spectra.png"))
            write_manifest(tmp, "qmilora-inspect")
        print(f"{'layer':<44} {'minor E':>9} {'QLoRA':>7} {'QMiLoRA':>8} {'QPiSSA':>7} {'err in minor':>12}")
        for row in report["weights"]:
            print(f"{row['layer']:<44} {row['minor_energy']:9.2e} {row['nf4_error_qlora']:7.4f} "
                  f"{row['nf4_error_qmilora']:8.4f} {row['nf4_error_qpissa']:7.4f} {row['minor_error_share']:12.4f}")
        s = report["summary"]
        print(f"\n{s['weights']} weights, r={s['rank']}: mean minor energy {s['minor_energy']:.2e}; NF4 error "
              f"QMiLoRA/QLoRA {s['qmilora_over_qlora']:.3f}, QPiSSA/QLoRA {s['qpissa_over_qlora']:.3f}; share of "
              f"QMiLoRA's error in the minor input subspace {s['minor_error_share']:.4f} (isotropic: {s['isotropic_share']:.4f})")
        print(f"wrote {args.output}/report.json and spectra.png")

    return run("qmilora-inspect", body)


if __name__ == "__main__":
    sys.exit(main())
