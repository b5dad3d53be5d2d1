"""Whole-model preparation: QMiLoRA's streamed decompose-then-NF4 against the MiLoRA-official approach (load the
whole half-precision model on the device, then SVD each target weight in place), same checkpoint, same run.
Each approach runs in its own process, so its peak memory is its own. `identity` times the source checkpoint's
content hash alone (cold memo), to compare with a whole preparation (which computes it in a background thread).

    python benchmarks/prepare.py --shape small                 # CPU
    python benchmarks/prepare.py --shape llama2-13b            # CUDA, unchanged

Writes benchmarks/results/prepare-<shape>-<device>.json.
"""
from __future__ import annotations

import time

import torch

from common import compare, comparison_parser, cpu_load, peak_mb, reset_peak, table, write


def official(directory: str, rank: int, device: torch.device) -> None:
    """The MiLoRA repository's route: whole model on one device, then per-layer float32 SVD, residual kept in place."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map={"": device})
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            W = module.weight.data.float()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            minor = (U[:, -rank:] * S[-rank:]) @ Vh[-rank:]
            module.weight.data = (W - minor).to(module.weight.dtype)


def measure(method: str, directory: str, args) -> dict:
    device = torch.device(args.device)
    from qmilora import prepare_model

    import tempfile

    from qmilora import checkpoint

    memo = tempfile.mkdtemp()  # a cold digest memo: every run hashes the whole checkpoint once
    reset_peak(device)
    t = time.perf_counter()
    if method == "official":
        official(directory, args.rank, device)
    elif method == "identity":  # the content hash alone, not overlapped with anything
        checkpoint.identity(directory, checkpoint.shard_files(directory), checkpoint.DigestMemo(memo))
    else:  # includes the content hash, which runs in a thread alongside the stream; "@N": --threads N
        solver, _, threads = method.split("-")[1].partition("@")
        prepare_model(directory, rank=args.rank, device=str(device), prepared_cache=False, cache_dir=memo,
                      svd_solver=solver, threads=int(threads) if threads.isdigit() else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    row = {"method": method, "seconds": time.perf_counter() - t, "peak_mb": peak_mb(device)}
    if device.type == "cuda":  # host memory too
        row["peak_rss_mb"] = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
        row["peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return row


def main() -> None:
    p = comparison_parser(__doc__)
    p.add_argument("--methods", nargs="+", default=["official", "qmilora-svd", "qmilora-auto", "identity"])
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
