"""Issue 9: QMiLoRA's perplexity at initialization against QLoRA's, with the controls that explain the gap and the
calibrated rounding that closes it. Every variant is a frozen NF4 base plus its exact adapter; it is evaluated by
writing the effective weight (bitsandbytes' dequantized base + s·B·A) into a float32 copy of the model, which is
what the 4-bit layers compute in float32 (the prepare tests check that equality).

    python benchmarks/init_gap.py                       # demo SmolLM2-135M, r=32, news + pydoc text
    python benchmarks/init_gap.py --degrid              # control: the same after breaking the demo's Q4_1 grid

Variants: qlora NF4(W); qmilora NF4(W − minor_r) + minor_r; qpissa NF4(W − principal_r) + principal_r; the same
with `-cal` = GPTQ rounding on calibration inputs (the bundled instruction data, disjoint from both eval texts);
controls that re-roll the rounding without any special subspace: `dither` NF4(W − N) + N with Gaussian N of the
minor part's norm, and `randsub` the same with N = W's projection on a random r-dim input subspace.
Per projection type it also reports the calibration-weighted output error tr(E H Eᵀ) of each variant over QLoRA's.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import texts
from common import table, write
from qmilora import QMiLoRAConfig, calibrate, quantize
from qmilora.decompose import minor_split
from qmilora.prepare import linear_layers
from qmilora.demo import demo_model_dir

NF4 = dict(quant_type="nf4", blocksize=64, double_quant=True)
VARIANTS = ("qlora", "qmilora", "qpissa", "dither", "randsub", "qlora-cal", "qmilora-cal", "qpissa-cal")


def nf4(w, h=None):
    if h is None:
        return quantize.round_trip(w.float(), **NF4).double()
    return quantize.dequantize(quantize.quantize_calibrated(w.float(), h, out_dtype=torch.float32, **NF4)).double()


def principal(w, r):
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def variant(kind: str, w: torch.Tensor, r: int, h: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The effective weight (out, in) float64 that variant `kind` computes with."""
    cal = h if kind.endswith("-cal") else None
    kind = kind.removesuffix("-cal")
    if kind == "qlora":
        return nf4(w, cal)
    if kind in ("qmilora", "dither"):
        split = minor_split(w.float(), r)
        part = split.lora_B.double() @ split.lora_A.double()
        if kind == "dither":
            noise = torch.randn(w.shape, generator=g, dtype=torch.float64)
            part = noise * part.norm() / noise.norm()
        return nf4(w - part, cal) + part
    if kind == "qpissa":
        part = principal(w, r)
        return nf4(w - part, cal) + part
    if kind == "randsub":
        V, _ = torch.linalg.qr(torch.randn(w.shape[1], r, generator=g, dtype=torch.float64))
        part = w @ V @ V.T
        return nf4(w - part) + part
    raise ValueError(kind)


def degrid(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Undo the demo's Q4_1 origin: each weight moves uniformly within its Q4_1 cell (blocks of 32, 16 levels)."""
    b = w.reshape(-1, 32)
    step = (b.max(1, keepdim=True).values - b.min(1, keepdim=True).values) / 15
    return (b + (torch.rand(b.shape, generator=g, dtype=b.dtype) - 0.5) * step).reshape(w.shape)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="full-precision checkpoint directory (default: the demo SmolLM2-135M)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--text", default=",".join(texts.SOURCES), help=f"perplexity sources, from {', '.join(texts.SOURCES)}")
    p.add_argument("--windows", type=int, default=60, help="eval windows of 128 tokens per text source")
    p.add_argument("--calibration_samples", type=int, default=64)
    p.add_argument("--degrid", action="store_true", help="control: break the demo's Q4_1 grid first")
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    torch.set_grad_enabled(False)
    directory = args.model or demo_model_dir()
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    layers = linear_layers(model)
    g = torch.Generator().manual_seed(0)
    original = {n: m.weight.detach().double().clone() for n, m in layers.items()}
    if args.degrid:
        original = {n: degrid(w, g) for n, w in original.items()}
        for n, m in layers.items():
            m.weight.data.copy_(original[n].float())
    cfg = QMiLoRAConfig(rank=args.rank, calibration_data="bundled", calibration_samples=args.calibration_samples)
    hessians = calibrate.hessians(model, set(layers), calibrate.windows(cfg, tok))
    sources = args.text.split(",")
    evals = {s: texts.chunks(s, tok, count=args.windows, length=128) for s in sources}

    rows = [{"variant": "fp32" + (" (de-gridded)" if args.degrid else ""),
             **{s: texts.perplexity(model, w, tok) for s, w in evals.items()}}]
    errors = collections.defaultdict(lambda: collections.defaultdict(float))
    for kind in args.variants.split(","):
        t = time.perf_counter()
        effective = {}
        for n, w in original.items():
            effective[n] = variant(kind, w, args.rank, hessians[n], g)
            kind_of_layer = n.rsplit(".", 1)[-1]
            errors[kind][kind_of_layer] += calibrate.output_error(effective[n] - w, hessians[n])
        for n, m in layers.items():
            m.weight.data.copy_(effective[n].float())
        rows.append({"variant": kind, **{s: texts.perplexity(model, w, tok) for s, w in evals.items()},
                     "seconds": round(time.perf_counter() - t, 1)})
        print(table(rows[-1:], ["variant", *sources, "seconds"]), flush=True)
    types = sorted(errors["qlora"]) if "qlora" in errors else []
    ratios = [{"variant": k, **{t: errors[k][t] / errors["qlora"][t] for t in types}} for k in errors]
    name = args.tag or f"init-gap-r{args.rank}" + ("-degrid" if args.degrid else "")
    print("\nperplexity at init\n" + table(rows, ["variant", *sources]))
    print("\noutput error tr(E H Eᵀ) / QLoRA's, per projection type\n" + table(ratios, ["variant", *types]))
    print(write(name, rows, {"rank": args.rank, "output_error_vs_qlora": ratios, "degrid": args.degrid}))


if __name__ == "__main__":
    main()
