"""How far each artifact of a run is from the trained model (load_trained: NF4 residual + s·B·A): loss and top-1
agreement on the run's eval split, through the same code qmilora-export prints with (`qmilora.fidelity`).

    python benchmarks/export_fidelity.py --run qmilora-demo --name export-fidelity-demo
    python benchmarks/export_fidelity.py --tiny /tmp/tiny --name export-fidelity-tiny   # trains a tiny model first

Artifacts: --to merged (bf16 and float32), --to original-lora on the original base (= --to original-merged, tested
equal), the run folder itself in plain PEFT, and the pre-issue-27 trap (the residual-form adapter on the original
base). Research rows (--correction_ranks): the original-base model plus a rank-k approximation L_k of the residual's
NF4 rounding error E = Q − W_res in every adapted layer (training-free; a rank-(2r+k) LoRA for the original base
holds it): `--to original-lora --correction_rank k` (activation-weighted, min ‖(E − L)·H^½‖_F, H the layer's input
Gram on the first --rows training rows) and, for comparison, the plain truncation (min ‖E − L‖_F). Every row is
measured on the eval split and on the next --train_rows training rows.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write  # noqa: E402


def tiny_run(directory: str, steps: int) -> str:
    """A tiny random Llama (the demo's tokenizer, the bundled data), trained `steps` steps by qmilora-train."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qmilora.demo import demo_model_dir

    tok = AutoTokenizer.from_pretrained(demo_model_dir())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(
        os.path.join(directory, "model"))
    tok.save_pretrained(os.path.join(directory, "model"))
    run = os.path.join(directory, "run")
    subprocess.run(["qmilora-train", "--model", os.path.join(directory, "model"), "--output_dir", run, "--rank", "16",
                    "--val_size", "20", "--eval_steps", "100000", "--max_steps", str(steps), "--learning_rate", "1e-2",
                    "--save_strategy", "no", "--disable_tqdm", "true"], check=True)
    return run


def layers_of(trained):
    """{layer: (Q = the dequantized residual, float64; B; A; s)} of every adapted 4-bit layer."""
    from qmilora import quantize
    from qmilora.interop import lora_layers

    out = {}
    for name, lora in lora_layers(trained).items():
        q = quantize.dequantize(lora.get_base_layer().weight, torch.float32).double()
        out[name] = (q, lora.lora_B["default"].weight.double(), lora.lora_A["default"].weight.double(),
                     lora.scaling["default"])
    return out


def plain_corrected(directory: str, layers: dict, initial: dict, ranks: list[int]):
    """Yield (k, model): the original base with W + s·(B A − B₀ A₀) + [E]_k in every adapted layer, [E]_k the plain
    (unweighted, min ‖E − L‖_F) rank-k truncation of the residual's NF4 error E = Q − W_res: the comparison for
    `qmilora.correction`'s activation-weighted one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    base, factors = {}, {}
    for name, (q, B, A, s) in layers.items():
        B0, A0 = initial[name]
        w = model.get_submodule(name).weight.data.double()
        U, S, Vh = torch.linalg.svd(q - (w - s * (B0 @ A0)), full_matrices=False)
        factors[name] = (U[:, :max(ranks)] * S[:max(ranks)], Vh[:max(ranks)])
        base[name] = w + s * (B @ A - B0 @ A0)
    for k in ranks:  # float64 sums, cast once to the float32 the other rows run in
        for name, (left, right) in factors.items():
            model.get_submodule(name).weight.data = (base[name] + left[:, :k] @ right[:k]).float()
        yield k, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a qmilora-train output folder (with an eval split: --val_size)")
    p.add_argument("--tiny", help="train a tiny model in this folder first and measure that run")
    p.add_argument("--steps", type=int, default=150, help="--tiny: training steps")
    p.add_argument("--name", required=True)
    p.add_argument("--rows", type=int, default=20, help="eval rows (the run's eval split); the first as many training "
                   "rows calibrate the activation-aware correction")
    p.add_argument("--train_rows", type=int, default=100, help="training rows after those, measured too")
    p.add_argument("--correction_ranks", type=int, nargs="*", default=[16, 64])
    p.add_argument("--train_command", help="--run: the command that trained it (recorded in the JSON)")
    args = p.parse_args()
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmilora import export, fidelity
    from qmilora.runfolder import INITIAL, RunFolder
    from qmilora.train import load_trained

    run = tiny_run(args.tiny, args.steps) if args.tiny else args.run
    meta = RunFolder(run).read_complete()
    tok = AutoTokenizer.from_pretrained(run)
    directory = meta["source"]["path"]
    held = fidelity.run_rows(run, meta, tok, args.rows)
    first = fidelity.run_rows(run, meta, tok, args.rows + args.train_rows, split="train")
    later = first.rows[args.rows:]  # the first --rows calibrate --correction_rank
    measured = fidelity.Rows(later, f"{len(later)} later training rows",
                             sum(sum(1 for t in r["labels"][1:] if t != -100) for r in later))
    trained = load_trained(run, lora_dropout=0.0)
    refs = {"eval": fidelity.reference(trained, held, tok), "train": fidelity.reference(trained, measured, tok)}
    layers = layers_of(trained)
    rank = next(iter(layers.values()))[1].shape[1]
    rows = [{"artifact": "trained (load_trained)", "loss": refs["eval"][0], "top1_agreement": 1.0,
             "train_rows_loss": refs["train"][0], "train_rows_top1_agreement": 1.0}]

    def measure(name: str, model) -> dict:
        """On the eval split, and on the later training rows (more tokens; fidelity, not generalization)."""
        row = {"artifact": name}
        for on, data, prefix in (("eval", held, ""), ("train", measured, "train_rows_")):
            score = fidelity.score(name, model, data, tok, refs[on][1])
            row.update({f"{prefix}loss": score.loss, f"{prefix}loss_vs_trained": score.loss - refs[on][0],
                        f"{prefix}top1_agreement": score.top1_agreement})
            print(score.line(refs[on][0]), flush=True)
        return row

    original = lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("bfloat16", "float32"):
            out, _ = export.to_merged(run, os.path.join(tmp, dtype), dtype=dtype, measure_rows=0)
            rows.append(measure(f"--to merged ({dtype})", AutoModelForCausalLM.from_pretrained(out).eval()))
            gc.collect()
        out, _ = export.to_original_lora(run, os.path.join(tmp, "lora"), measure_rows=0)
        rows.append(measure(f"--to original-lora (rank {2 * rank}) on the original base = --to original-merged",
                            PeftModel.from_pretrained(original(), out).eval()))
        rows.append(measure("the run folder in plain PEFT on the original base (its top-level adapter)",
                            PeftModel.from_pretrained(original(), run).eval()))
        rows.append(measure("before issue 27: the residual-form adapter on the original base (the trap)",
                            PeftModel.from_pretrained(original(), RunFolder(run).residual_adapter()).eval()))
    del trained
    gc.collect()
    init = load_file(os.path.join(run, INITIAL, "adapter_model.safetensors"))
    initial = {}
    for key, value in init.items():
        if ".lora_A." in key:
            layer = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            initial[layer] = (init[key.replace("lora_A", "lora_B")].double(), value.double())
    research = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.correction_ranks:  # the product's correction, as a user loads it: plain PEFT, original base
            out, _ = export.to_original_lora(run, os.path.join(tmp, f"c{k}"), correction_rank=k,
                                             calibration_rows=args.rows, measure_rows=0)
            name = f"--to original-lora --correction_rank {k} (rank {2 * rank + k}, activation-weighted)"
            research.append({**measure(name, PeftModel.from_pretrained(original(), out).eval()),
                             "correction": "activation-weighted", "correction_rank": k})
            gc.collect()
    for k, model in plain_corrected(directory, layers, initial, args.correction_ranks):
        name = f"original base + plain rank-{k} truncation of the NF4 error (rank {2 * rank + k})"
        research.append({**measure(name, model), "correction": "plain", "correction_rank": k})
    path = write(args.name, rows + research, {
        "run": os.path.abspath(run), "rank": rank, "eval": held.where, "eval_tokens": held.tokens,
        "train_rows": measured.where, "train_rows_tokens": measured.tokens, "calibration": f"the first {args.rows} training rows",
        "summary": meta.get("summary"),
        "train_command": args.train_command or (args.tiny and "see tiny_run()")})
    print(table(rows + research, ["artifact", "loss", "loss_vs_trained", "top1_agreement", "train_rows_loss_vs_trained",
                                  "train_rows_top1_agreement"]))
    print(json.dumps({"wrote": path}))


if __name__ == "__main__":
    main()
