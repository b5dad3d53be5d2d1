"""qmilora-train end to end through its CLI on this device, as a user runs it: a plain run (on a GPU: bf16 mixed
precision, the chunked loss, paged AdamW 8-bit; the defaults that the H200 run found broken) and a run under the
shipped FSDP config (examples/fsdp.yaml, one process: the sharded code path on one GPU; on a CPU, the refusal).
A tiny Llama with its own tokenizer (the tests' builder), the bundled data.

    python benchmarks/cli_smoke.py          # writes benchmarks/results/cli-smoke-<device>.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("QMILORA_TEST_GPU", "1")  # the tests' conftest would hide the GPU; its builders are used here
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import torch  # noqa: E402
from conftest import save_tiny, tiny_tokenizer  # noqa: E402

from common import table, write  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(mode: str, model: str, work: str) -> dict:
    out = os.path.join(work, mode)
    flags = ["--model", model, "--output_dir", out, "--cache_dir", os.path.join(work, "cache"), "--rank", "8",
             "--max_steps", "10", "--max_seq_length", "128", "--logging_steps", "1", "--save_strategy", "no",
             "--disable_tqdm", "true"]
    if mode == "plain":
        cmd = [sys.executable, "-m", "qmilora.cli.train", *flags]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "examples", "fsdp.yaml"), "--num_processes", "1", "-m", "qmilora.cli.train", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    errors = [line for line in (proc.stderr + proc.stdout).splitlines() if line.startswith("qmilora-train: error")]
    row = {"mode": mode, "exit": proc.returncode, "error": errors[-1] if errors else ""}
    if proc.returncode == 0:
        summary = json.load(open(os.path.join(out, "qmilora.json")))["summary"]
        row.update({k: summary[k] for k in ("train_loss", "tokens_per_second", "peak_memory_gb", "loss", "steps")})
    elif not errors:
        row["error"] = proc.stderr[-1500:]
    return row


def main() -> None:
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as work:
        model = os.path.join(work, "tiny")
        tok = tiny_tokenizer()
        save_tiny(model, vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, shard="2MB")
        tok.save_pretrained(model)
        rows = [run("plain", model, work), run("fsdp-1-process", model, work)]
    print(table(rows, ["mode", "exit", "train_loss", "tokens_per_second", "peak_memory_gb", "loss", "error"]))
    print("wrote", write(f"cli-smoke-{'cuda' if cuda else 'cpu'}", rows))
    fsdp_ok = rows[1]["exit"] == 0 if cuda else "FSDP needs GPUs" in rows[1]["error"]
    sys.exit(0 if rows[0]["exit"] == 0 and fsdp_ok else 1)


if __name__ == "__main__":
    main()
