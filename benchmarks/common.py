"""Shared benchmark plumbing: machine/version record, peak-memory probes, result writing."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

RESULTS = os.environ.get("QMILORA_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def comparison_parser(doc: str):
    """Flags shared by the model-level comparisons (prepare.py, train.py)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--checkpoint", help="use this checkpoint directory instead of writing a random one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def compare(script: str, args, methods: list[str], measure) -> tuple[list[dict], float | None]:
    """In a child (`--child method:directory`): print `RESULT {json}` of measure(method, directory, args) and exit.
    In the parent: write the checkpoint (unless --checkpoint), run each method in a fresh process so that its
    peak memory is its own, and return (rows, checkpoint GB)."""
    if args.child:
        method, directory = args.child.split(":", 1)
        print("RESULT " + json.dumps(measure(method, directory, args)), flush=True)
        sys.exit(0)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.checkpoint or os.path.join(tmp, "ckpt")
        size_gb = None if args.checkpoint else write_random_checkpoint(args.shape, directory)
        return run_children(script, methods, directory), size_gb


def bench_config(rank: int, device: torch.device, **overrides):
    """The QMiLoRAConfig every model-level benchmark prepares with. With $QMILORA_BENCH_CACHE (gpu_suite.sh) the
    preparation is cached there, so that the training step loads what the preparation step wrote."""
    from qmilora import QMiLoRAConfig

    shared = os.environ.get("QMILORA_BENCH_CACHE")
    fields = dict(rank=rank, lora_dropout=0.05, device=str(device), prepared_cache=bool(shared), cache_dir=shared)
    return QMiLoRAConfig(**{**fields, **overrides})


def run_children(script: str, methods: list[str], directory: str) -> list[dict]:
    rows = []
    for method in methods:
        out = subprocess.run([sys.executable, script, *sys.argv[1:], "--child", f"{method}:{directory}"],
                             capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"{method}: {json.dumps(rows[-1])}", flush=True)  # in the log even if a later method fails
    return rows


def run_qmilora(verb: str, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`qmilora-<verb> argv` as a user runs it, in a fresh process with `env` added to this one's: the console script
    beside this interpreter, else `python -m qmilora.cli.<verb>`. Returns the finished process (its `args` is the
    command line); the caller decides what a non-zero exit means."""
    script = os.path.join(os.path.dirname(sys.executable), f"qmilora-{verb}")
    command = [script] if os.path.isfile(script) else [sys.executable, "-m", f"qmilora.cli.{verb}"]
    return subprocess.run(command + list(argv), env={**os.environ, **(env or {})}, capture_output=True, text=True)


@contextlib.contextmanager
def cpu_load(load: str):
    """`load` "loaded": another process multiplies matrices on every core for the duration; "quiet": nothing."""
    if load != "loaded":
        yield
        return
    burner = "import torch\na = torch.randn(1500, 1500)\nwhile True: a @ a"
    proc = subprocess.Popen([sys.executable, "-c", burner])
    try:
        time.sleep(3)  # let it spin up its threads
        yield
    finally:
        proc.kill()
        proc.wait()


def machine() -> dict:
    import bitsandbytes
    import peft
    import transformers

    # QMILORA_COMMIT first: on the GPU host the tree is a copy whose .git need not match it
    commit = os.environ.get("QMILORA_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "commit": commit, "python": platform.python_version(), "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__, "threads": torch.get_num_threads(),
    }


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: resets VmHWM to the current RSS
            f.write("5")


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def write(name: str, rows: list[dict], extra: dict | None = None) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path + ".tmp", "w") as f:  # renamed into place: a run killed mid-write keeps the previous file
        json.dump({"machine": machine(), **(extra or {}), "rows": rows}, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# Model shapes by name; "tiny"/"small" run on a CPU, the Llama-2 shapes need a GPU.
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=4096),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, vocab_size=8192),
    # Llama-3's vocabulary on a CPU-sized body: where the embeddings, head and logits dominate memory
    "bigvocab": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, vocab_size=128256),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000),
    # MoE: two layers of Qwen3-30B-A3B (128 experts of 768, 8 routed per token), and a CPU-sized one
    "qwen3-moe-2l": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=128, num_experts_per_tok=8, vocab_size=151936),
    "moe64": dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=64, num_experts=64,
                  num_experts_per_tok=8, vocab_size=4096),  # CPU: Qwen3-MoE's routing (64 experts, top-8), small
    "tinymoe": dict(model_type="qwen3_moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=32, num_experts=8,
                    num_experts_per_tok=2, vocab_size=4096),
}


def llm_like(out: int, inp: int, generator=None, device=None) -> torch.Tensor:
    """A random (out, in) float32 weight with an LLM-like spectrum: random singular vectors, singular values from
    1 down to 0.05 (trained projections show σ_min/σ_max of ~1e-1..1e-2). A plain square Gaussian matrix is
    instead nearly singular (σ_min ~ 1/n), which no trained weight is."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    k = min(out, inp)
    on = generator.device if generator is not None else device  # drawn where the generator lives (GPU: fast)
    U, _ = torch.linalg.qr(torch.randn(out, k, generator=generator, device=on).to(device))
    V, _ = torch.linalg.qr(torch.randn(inp, k, generator=generator, device=on).to(device))
    S = torch.linspace(1.0, 0.05, k, device=device) * (2 / inp) ** 0.5 * k**0.5
    return (U * S) @ V.T


def write_random_checkpoint(shape: str, directory: str, dtype=torch.bfloat16, positions: int = 4096) -> float:
    """A random-weight model of a named shape (Llama unless the shape names a model_type) as sharded safetensors,
    built tensor by tensor on the meta device so that a 13B shape never sits in memory whole; MoE expert stacks get
    an LLM-like spectrum per expert. Returns the checkpoint size in GB."""
    import json

    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type", "llama"), **spec, max_position_embeddings=positions,
                                  tie_word_embeddings=False, dtype=dtype)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    from qmilora.prepare import linear_layers

    linear = {f"{n}.weight" for n in linear_layers(skeleton)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(0)  # the projections' random factors are drawn on the GPU when there is one
    weight_map, shard, shard_bytes, index, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, index = {}, 0, index + 1

    for name, param in skeleton.named_parameters():
        if name.endswith("norm.weight"):
            t = torch.ones(param.shape, dtype=dtype)
        elif name in linear:  # the layers QMiLoRA decomposes
            t = llm_like(*param.shape, generator=g).to("cpu", dtype)
        elif param.dim() == 3:  # a MoE expert stack: one LLM-like matrix per expert
            t = torch.stack([llm_like(*param.shape[1:], generator=g).to("cpu", dtype) for _ in range(param.shape[0])])
        else:  # embeddings and head: fan-in scaled Gaussian
            t = (torch.randn(param.shape, generator=g, device=device) / param.shape[-1] ** 0.5).to("cpu", dtype)
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if shard_bytes > 2 * 2**30:
            flush()
    flush()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total / 2**30
