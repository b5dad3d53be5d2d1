"""Per-weight cost of `minor_split` (each solver) against a bare `torch.linalg.svd` of the same weight, on one
device, with the accuracy of the minor subspace against a float64 SVD (sine of the largest principal angle).

    python benchmarks/decompose.py [--device cpu|cuda] [--shapes 1024x1024 2816x1024] [--rank 64] [--repeat 3]
                                   [--model 1024,2816,8]   # hidden,intermediate,layers of a random Llama to prepare

Prints a markdown table and writes benchmarks/results/decompose-<device>.json. The speedup columns are
torch.linalg.svd time / solver time measured in the same run, the numbers to compare across machines.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import cpu_load, llm_like, peak_mb, reset_peak, table, write
from qmilora import minor_split


def sin_angle(X, Y) -> float:
    """Sine of the largest principal angle between the column spaces of X and Y (float64)."""
    Qx, Qy = torch.linalg.qr(X.double())[0], torch.linalg.qr(Y.double())[0]
    return (1 - torch.linalg.svdvals(Qx.T @ Qy).min().clamp(max=1) ** 2).clamp(min=0).sqrt().item()


def timed(fn, device, repeat):
    """(best seconds, peak MB, the last result) over `repeat` calls."""
    best, peak = float("inf"), 0.0
    for _ in range(repeat):
        reset_peak(device)
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
        peak = max(peak, peak_mb(device))
    return best, peak, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=["1024x1024", "2816x1024", "2048x2048", "5632x2048"])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--solvers", nargs="+", default=["gram", "svd"], help="minor_split solvers to time")
    p.add_argument("--model", default="1024,2816,8", help="hidden,intermediate,layers of a random Llama ('' to skip)")
    p.add_argument("--thread_sweep", action="store_true",
                   help="instead: the gram solver on CPU at 1, 2 and all cores, the old library defaults and "
                        "qmilora's default, quiet and beside a process loading every core")
    args = p.parse_args()
    if args.thread_sweep:
        return thread_sweep(args)
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        out, inp = map(int, shape.split("x"))
        W = llm_like(out, inp, torch.Generator().manual_seed(0), device)
        minor_split(W[:64, :64], 8)  # warm up the solver's libraries
        base_s, base_mb, _ = timed(lambda: torch.linalg.svd(W, full_matrices=False), device, args.repeat)
        row = {"shape": shape, "rank": args.rank, "torch_svd_s": base_s, "torch_svd_peak_mb": base_mb}
        _, S64, Vh64 = torch.linalg.svd(W.double(), full_matrices=False)
        for solver in args.solvers:
            seconds, mb, split = timed(lambda: minor_split(W, args.rank, solver=solver), device, args.repeat)
            A = split.lora_A
            row.update({f"{solver}_s": seconds, f"{solver}_speedup": base_s / seconds, f"{solver}_peak_mb": mb,
                        f"{solver}_sin_angle": sin_angle(A.T, Vh64[-args.rank:].T)})
        rows.append(row)
        print(table(rows[-1:], list(rows[-1])), flush=True)
    print("\n" + table(rows, list(rows[0])))
    model_rows = [prepare_whole_model(args, device)] if args.model else []
    if model_rows:
        print("\n" + table(model_rows, list(model_rows[0])))
    print("wrote", write(f"decompose-{device.type}", rows, {"device": str(device), "prepare": model_rows}))


def thread_sweep(args) -> None:
    """Seconds per weight for each thread setting (every pool at 1, 2 or all cores: `cpu.pools`); 'qmilora' is
    plain `minor_split`, which applies the thread policy itself (`cpu.solver_limits`)."""
    from qmilora import cpu

    cores = cpu.available_cores()
    settings = {"1": 1, "2": 2, "all": cores}
    rows = []
    for load in ("quiet", "loaded"):
        with cpu_load(load):
            for shape in args.shapes:
                out, inp = map(int, shape.split("x"))
                W = llm_like(out, inp, torch.Generator().manual_seed(0), torch.device("cpu"))
                minor_split(W[:64, :64], 8)
                row = {"load": load, "shape": shape, "cores": cores}
                for name, n in settings.items():
                    with cpu.pools(n):
                        row[f"threads_{name}_s"] = timed(lambda: minor_split(W, args.rank, solver="gram"),
                                                         torch.device("cpu"), args.repeat)[0]
                with cpu.pools(cores):  # the libraries' own default: every pool at all cores
                    row["library_default_s"] = timed(lambda: minor_split(W, args.rank, solver="gram"),
                                                     torch.device("cpu"), args.repeat)[0]
                torch.set_num_threads(cores)  # what a caller's process has; minor_split limits the pools itself
                with cpu.solver_limits((out, inp)) as n:
                    row["qmilora_default_threads"] = n
                row["qmilora_default_s"] = timed(lambda: minor_split(W, args.rank, solver="gram"),
                                                 torch.device("cpu"), args.repeat)[0]
                row["qmilora_vs_1_thread"] = row["qmilora_default_s"] / row["threads_1_s"]
                rows.append(row)
                print(table(rows[-1:], list(rows[-1])), flush=True)
    print("\n" + table(rows, list(rows[0])))
    print("wrote", write("decompose-threads-cpu", rows, {"rank": args.rank, "repeat": args.repeat}))


def prepare_whole_model(args, device) -> dict:
    """Stream a random-weight Llama of the given shape from sharded safetensors through `prepare_model`."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from qmilora import prepare_model

    hidden, inter, layers = map(int, args.model.split(","))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                      vocab_size=32000, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as d:
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        fp16_gb = sum(p.numel() for p in model.parameters()) * 2 / 2**30
        model.save_pretrained(d, max_shard_size="500MB")
        del model
        reset_peak(device)
        t = time.perf_counter()
        prepared = prepare_model(d, rank=args.rank, device=str(device), prepared_cache=False)
        seconds = time.perf_counter() - t
        stats = prepared.qmilora_stats
        return {"model": args.model, "rank": args.rank, "bf16_checkpoint_gb": fp16_gb, "seconds": seconds,
                "svd_seconds": stats.svd_seconds, "peak_mb": peak_mb(device), "layers": stats.layers,
                "mean_nf4_rel_error": sum(stats.nf4_rel_error) / stats.layers}


if __name__ == "__main__":
    main()
