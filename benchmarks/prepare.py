"""Whole-model preparation: QMiLoRA's streamed decompose-then-NF4 against the MiLoRA-official approach (load the
whole half-precision model on the device, then SVD each target weight in place), same checkpoint, same run.
Each approach runs in its own process, so its peak memory is its own. `identity` times the source checkpoint's
content hash alone (cold memo), to compare with a whole preparation (which computes it in a background thread).

    python benchmarks/prepare.py --shape small                 # CPU
    python benchmarks/prepare.py --shape llama2-13b            # CUDA, unchanged

Writes benchmarks/results/prepare-<shape>-<device>.json.
"""
from __future__ import annotations

import os
import time

import torch

from common import bench_config, compare, comparison_parser, cpu_load, peak_mb, reset_peak, table, write


def official(directory: str, rank: int, device: torch.device, fraction: float = 1.0) -> dict:
    """The MiLoRA repository's route: whole model on one device, then per-layer float32 SVD, residual kept in place.
    With fraction < 1 only the first fraction of the weights (in module order: whole decoder layers) are decomposed
    and the SVD time is scaled up to all of them; the peak memory (whole model + one weight's SVD) is unaffected."""
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map={"": device})
    load_s = time.perf_counter() - t
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    done = linears[:max(1, round(fraction * len(linears)))]
    t = time.perf_counter()
    for module in done:
        W = module.weight.data.float()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        minor = (U[:, -rank:] * S[-rank:]) @ Vh[-rank:]
        module.weight.data = (W - minor).to(module.weight.dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    svd_s = time.perf_counter() - t
    return {"load_s": load_s, "svd_s_measured": svd_s, "weights_decomposed": len(done), "weights": len(linears),
            "seconds_extrapolated": load_s + svd_s * len(linears) / len(done)}


def measure(method: str, directory: str, args) -> dict:
    device = torch.device(args.device)
    from qmilora import prepare_model

    import tempfile

    from qmilora import checkpoint

    # a cold digest memo: every run hashes the whole checkpoint once. With QMILORA_BENCH_CACHE (gpu_suite.sh) the
    # preparation is also written there as a cache entry (included in its time), for train.py to load.
    shared = os.environ.get("QMILORA_BENCH_CACHE")
    memo = shared or tempfile.mkdtemp()
    extra = {}
    reset_peak(device)
    t = time.perf_counter()
    if method == "official":
        extra = official(directory, args.rank, device, args.official_fraction)
    elif method == "identity":  # the content hash alone, not overlapped with anything
        checkpoint.identity(directory, checkpoint.shard_files(directory), checkpoint.DigestMemo(memo))
    else:  # includes the content hash, which runs in a thread alongside the stream; "@N": --threads N
        # "qmilora-SOLVER[@THREADS][~SVD_DEVICE]", e.g. qmilora-auto~cpu (the float64 solver on the host's cores,
        # the path "auto" takes on a GPU with slow float64: a consumer card's, measured on any GPU)
        spec, _, where = method.split("-", 1)[1].partition("~")
        solver, _, threads = spec.partition("@")
        prepare_model(directory, bench_config(args.rank, device, svd_solver=solver, prepared_cache=bool(shared) and not where,
                                              cache_dir=memo, threads=int(threads) if threads.isdigit() else None,
                                              **({"svd_device": where} if where else {})))
    if device.type == "cuda":
        torch.cuda.synchronize()
    row = {"method": method, "seconds": time.perf_counter() - t, "peak_mb": peak_mb(device), **extra}
    if "seconds_extrapolated" in extra:
        row["seconds"] = extra["seconds_extrapolated"]
    if shared and method.startswith("qmilora"):
        row["includes_cache_write"] = True
    if device.type == "cuda":  # host memory too
        row["peak_rss_mb"] = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
        row["peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return row


def main() -> None:
    p = comparison_parser(__doc__)
    p.add_argument("--methods", nargs="+", default=["official", "qmilora-svd", "qmilora-auto", "identity"])
    p.add_argument("--official_fraction", type=float, default=1.0,
                   help="decompose only this fraction of the weights on the official route; its SVD time is scaled up")
    p.add_argument("--thread_sweep", action="store_true",
                   help="instead: qmilora-auto at 1 and 2 threads and at its default, quiet and beside a process "
                        "loading every core")
    args = p.parse_args()
    if args.thread_sweep and not args.child:
        return thread_sweep(args)
    rows, size_gb = compare(__file__, args, args.methods, measure)
    base = rows[0]
    for r in rows:
        r["time_vs_first"], r["peak_vs_first"] = r["seconds"] / base["seconds"], r["peak_mb"] / base["peak_mb"]
    print(table(rows, list(rows[-1])))
    by = {r["method"]: r for r in rows}
    if "identity" in by and "qmilora-auto" in by:
        share = by["identity"]["seconds"] / by["qmilora-auto"]["seconds"]
        print(f"content identity (sha256 of every byte, cold memo) alone: {by['identity']['seconds']:.2f}s = "
              f"{100 * share:.1f}% of a preparation; in prepare it runs in a thread beside the stream")
    print("wrote", write(f"prepare-{args.shape}-{torch.device(args.device).type}", rows,
                         {"settings": {"shape": args.shape, "rank": args.rank, "device": args.device,
                                       "checkpoint_gb": size_gb}}))


def thread_sweep(args) -> None:
    methods = ["qmilora-auto@1", "qmilora-auto@2", "qmilora-auto@default"]
    rows = []
    for load in ("quiet", "loaded"):
        with cpu_load(load):
            found, size_gb = compare(__file__, args, methods, measure)
        one = found[0]["seconds"]
        rows += [{"load": load, **r, "vs_1_thread": r["seconds"] / one} for r in found]
        print(table(rows, list(rows[-1])), flush=True)
    print("wrote", write(f"prepare-threads-{args.shape}-cpu", rows,
                         {"settings": {"shape": args.shape, "rank": args.rank, "checkpoint_gb": size_gb}}))


if __name__ == "__main__":
    main()
