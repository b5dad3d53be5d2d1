"""CPU thread counts: sane defaults on small and shared machines.

Two thread pools meet on a CPU: torch's OpenMP pool and the BLAS pool scipy ships (the minor solver's dsyrk and
MRRR eigensolver). Run one after the other, each spins while the other works; on a machine shared with other work
every parallel region also waits for its slowest, descheduled thread. Measured on a 2-core machine: the solver on the
demo's 576-wide weights took 1.18 s with both pools at 2 threads against 0.88 s at 1 thread (quiet), and 17.9 s
against 0.83 s while another process used both cores (`benchmarks/decompose.py --thread_sweep`). So:

- `threads` (QMiLoRAConfig, `--threads`, or QMILORA_THREADS): the thread count for preparation and training.
  Default: the cores not already busy when the command starts (runnable threads of other processes), at least 1;
  under torchrun / accelerate, the machine's cores shared out among the processes started on it.
- inside the solver every pool is limited together: to 1 thread for weights under 2048 wide (too small to gain from
  more), to `threads` above. `decompose.minor_split` applies this itself, so every caller of the public API gets it.
- `choose` says why it chose what it did; qmilora-train logs it and records it in the run summary.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import time

import torch

SOLVER_PARALLEL_MIN = 2048  # min(out, in) from which the solver's BLAS calls gain from several threads


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve(requested: int | None) -> int:
    """The thread count to use: `requested`, else $QMILORA_THREADS, else the cores not busy right now."""
    return choose(requested)[0]


def choose(requested: int | None) -> tuple[int, str]:
    """(thread count, why): what `resolve` returns, with the reason in words for logs and the run record."""
    if requested is None and os.environ.get("QMILORA_THREADS"):
        try:
            value = int(os.environ["QMILORA_THREADS"])
        except ValueError:
            raise ValueError(f"QMILORA_THREADS must be a positive integer, got {os.environ['QMILORA_THREADS']!r}") from None
        if value < 1:
            raise ValueError(f"QMILORA_THREADS must be a positive integer, got {value}")
        return value, "set by QMILORA_THREADS" + _oversubscribed(value)
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be a positive integer, got {requested}")
        return requested, "asked for (--threads)" + _oversubscribed(requested)
    cores = available_cores()
    siblings = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if siblings > 1:  # torchrun / accelerate started this many processes here; they are each other's load
        return max(1, cores // siblings), f"{cores} cores shared by the {siblings} processes started on this machine"
    busy = busy_cores()
    return (max(1, min(cores, round(cores - busy + 0.25))),
            f"{cores} cores, {busy:g} runnable thread{'' if busy == 1 else 's'} of other processes at start")


def _oversubscribed(threads: int) -> str:
    """Words for the log where more threads were asked for than there are cores: each parallel region then waits
    for descheduled threads (measured: 30x slower with 1000 threads on 2 cores)."""
    cores = available_cores()
    return f", more than the {cores} cores here: expect it to be slower" if threads > cores else ""


def busy_cores() -> float:
    """Cores other processes keep busy right now: Linux's count of runnable threads (/proc/loadavg, ourselves
    excluded), the median of a few samples; elsewhere the 1-minute load average, which lags behind."""
    import statistics
    import time

    try:
        samples = []
        for _ in range(5):
            with open("/proc/loadavg") as f:
                samples.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.02)
        return max(0.0, statistics.median(samples))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def apply(threads: int) -> None:
    """Set torch's pool (intra-op) for the rest of the process."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_SOLVER_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("qmilora_solver_threads", default=None)


@contextlib.contextmanager
def solver_limits(shape: tuple[int, int], threads: int | None = None):
    """Every pool (torch's OpenMP, scipy's BLAS) at one common count while one weight is decomposed on the CPU:
    1 under SOLVER_PARALLEL_MIN wide, else `threads` (default: `resolve(None)`). Inside `pools` or another
    solver_limits (prepare_model sets the run's count around each weight) the outer choice stands."""
    active = _SOLVER_THREADS.get()
    if active is not None:
        yield active
        return
    n = 1 if min(shape) < SOLVER_PARALLEL_MIN else (threads or resolve(None))
    with pools(n):
        yield n


@contextlib.contextmanager
def pools(n: int):
    """Every pool at `n` threads for what runs inside, whatever the weights' shapes; the caller's counts after."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    token = _SOLVER_THREADS.set(n)
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield n
    finally:
        torch.set_num_threads(previous)
        _SOLVER_THREADS.reset(token)


def slow_half_precision(dtype: torch.dtype) -> bool:
    """Whether bf16/fp16 matmuls on this CPU fall back to torch's scalar GEMM (no AVX512-BF16/FP16 or AMX): measured
    on this project's AVX2 machine, a 512×256 by 256×128,256 product took 5.3 s in bf16 against 0.78 s in float32,
    and a training step of `benchmarks/train.py --shape bigvocab` ran 41× slower (`train-bigvocab-cpu-bfloat16.json`)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        check = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else \
            torch.ops.mkldnn._is_mkldnn_fp16_supported
        return not check()
    except (AttributeError, RuntimeError):
        return False


PROBE_SHAPE = (2048, 4096)  # wide enough for the solver's threaded path; about a second on two cores


def solver_device(device: torch.device, threads: int, solver: str = "auto", rank: int = 16) -> tuple[torch.device, str]:
    """Where "auto" runs the minor solver for a model on `device`, and why. The solver is float64 (Gram matrix and
    eigendecomposition); data-centre GPUs run float64 at half their float32 rate, consumer GPUs (GeForce, RTX) at
    1/32-1/64 of it, where the host's cores can be faster. So on a GPU both are timed once per process on one
    PROBE_SHAPE weight with the run's solver and rank (at most 256), and the faster one runs every weight."""
    if device.type != "cuda":
        return device, "the model's device"
    rank = max(1, min(rank, 256))
    gpu, host = _probe_seconds(str(device), threads, solver, rank), _probe_seconds("cpu", threads, solver, rank)
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
    if host < gpu:
        return torch.device("cpu"), (f"the float64 solver measured {gpu / host:.1f}x faster on {threads} CPU "
                                     f"thread{'s' if threads != 1 else ''} than on {name}")
    return device, f"the float64 solver measured {host / gpu:.1f}x faster on {name} than on {threads} CPU threads"


@functools.cache
def _probe_seconds(device: str, threads: int, solver: str = "auto", rank: int = 16) -> float:
    """Seconds of one minor split of a random PROBE_SHAPE weight on `device`, after a warm-up."""
    from .decompose import minor_split

    weight = torch.randn(PROBE_SHAPE, generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if weight.device.type == "cuda" else (lambda: None)
    minor_split(weight[:256, :512], min(rank, 256), solver=solver, threads=threads)  # first-call costs (handles, pools)
    sync()
    start = time.perf_counter()
    minor_split(weight, rank, solver=solver, threads=threads)
    sync()
    return time.perf_counter() - start
