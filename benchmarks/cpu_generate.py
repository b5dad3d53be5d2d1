"""CPU generation and evaluation of a trained demo run: the 4-bit layers as trained against the same run merged once
at load into float32 weights (`qmilora.inference`, what qmilora-generate and qmilora-eval do on a CPU by default).

In one process, alternating: the 4-bit model at the libraries' default threads (what qmilora-generate did before),
the 4-bit model and the merged one at QMiLoRA's thread choice; greedy decoding of --tokens tokens (exactly that many) from a chat prompt, and one
forward pass over --eval_rows rows of the bundled data; the same token ids and the largest logit difference say
whether the merged model is the trained one. Then each command end to end in a fresh process (--merge_on_cpu true /
false), wall time as a user sees it.

    python benchmarks/cpu_generate.py                # trains a 3-step demo run first (about 40 s)
    python benchmarks/cpu_generate.py --run DIR      # an existing qmilora-train output
writes benchmarks/results/cpu-generate-demo.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from common import table, write


def decode(model, ids, tokens: int):
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(input_ids=ids, min_new_tokens=tokens, max_new_tokens=tokens, do_sample=False,
                             pad_token_id=0)
        return time.perf_counter() - t, out[0, ids.shape[1]:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a qmilora-train output directory (default: train a 3-step demo run)")
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--eval_rows", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="qmilora-bench-gen-")
    run = args.run or os.path.join(work, "run")
    bin_dir = os.path.dirname(sys.executable)
    if not args.run:
        subprocess.run([os.path.join(bin_dir, "qmilora-train"), "--output_dir", run, "--max_steps", "3", "--rank", "16",
                        "--max_seq_length", "128", "--disable_tqdm", "true"], check=True, capture_output=True)

    from transformers import AutoTokenizer

    from qmilora import cpu, inference
    from qmilora.fidelity import mean_loss
    from qmilora.data import BUNDLED, DataConfig, build_dataset
    from qmilora.export import as_trained

    tok = AutoTokenizer.from_pretrained(run)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    t = time.perf_counter()
    four_bit, _ = inference.load(run, merge_on_cpu=False)  # applies the thread policy too
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    merged = as_trained(four_bit, torch.float32)
    merge_s = time.perf_counter() - t
    threads = torch.get_num_threads()
    rows, _, _ = build_dataset(DataConfig(data=BUNDLED), tok)
    rows = [rows[i] for i in range(args.eval_rows)]
    cores = cpu.available_cores()
    # (name, model, threads): the previous qmilora-generate (4-bit layers at the libraries' default threads), the
    # 4-bit layers under the thread policy, the merged model under the thread policy (what runs now)
    setups = [("before: 4-bit, all cores", four_bit, cores), ("4-bit, thread policy", four_bit, threads),
              ("merged, thread policy", merged, threads)]
    times = {name: [] for name, _, _ in setups}
    evals = {name: [] for name, _, _ in setups}
    outs, losses = {}, {}
    for _ in range(args.repeat):
        for name, model, n in setups:
            torch.set_num_threads(n)
            seconds, outs[name] = decode(model, ids, args.tokens)
            times[name].append(seconds)
            t = time.perf_counter()
            losses[name] = mean_loss(model, rows, tok, 8)
            evals[name].append(time.perf_counter() - t)
    torch.set_num_threads(threads)
    with torch.no_grad():
        diff = (four_bit(input_ids=ids).logits.float() - merged(input_ids=ids).logits.float()).abs().max().item()
    rows_out = []
    for name, _, n in setups:
        per_token = statistics.median(times[name]) / args.tokens
        rows_out.append({"model": name, "threads": n, "decode_s_per_token": round(per_token, 4),
                         "decode_runs_s": [round(x, 3) for x in times[name]],
                         f"eval_{args.eval_rows}_rows_s": round(statistics.median(evals[name]), 3),
                         "eval_loss": losses[name], "tokens": tok.decode(outs[name])})
    before, policy, fast = rows_out
    key = f"eval_{args.eval_rows}_rows_s"
    speed = {"decode_speedup_vs_before": round(before["decode_s_per_token"] / fast["decode_s_per_token"], 1),
             "decode_speedup_vs_4bit_same_threads": round(policy["decode_s_per_token"] / fast["decode_s_per_token"], 1),
             "eval_speedup_vs_before": round(before[key] / fast[key], 1),
             "eval_speedup_vs_4bit_same_threads": round(policy[key] / fast[key], 1),
             "same_tokens": bool(torch.equal(outs[setups[0][0]], outs[setups[2][0]])), "max_logit_diff": diff,
             "load_s": round(load_s, 2), "merge_s": round(merge_s, 2)}
    print(table(rows_out, ["model", "threads", "decode_s_per_token", key, "eval_loss"]))
    print(speed, flush=True)
    del four_bit, merged

    commands = []
    # the previous command's behaviour (4-bit layers at every core) through today's knobs, then today's defaults
    for merge, env in (("false", {"QMILORA_THREADS": str(cores)}), ("false", {}), ("true", {})):
        argv = [os.path.join(bin_dir, "qmilora-generate"), "--adapter", run, "--prompt", "What is 17 + 25?",
                "--max_new_tokens", str(args.tokens), "--merge_on_cpu", merge]
        t = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
        commands.append({"command": " ".join([*(f"{k}={v}" for k, v in env.items()), "qmilora-generate",
                                              *argv[1:]]).replace(run, "RUN"),
                         "exit": proc.returncode, "wall_s": round(time.perf_counter() - t, 2),
                         "answer": proc.stdout.strip()})
        print(commands[-1], flush=True)
    print("wrote", write("cpu-generate-demo", rows_out, {"tokens": args.tokens, "eval_rows": args.eval_rows,
                                                          "repeat": args.repeat, **speed, "commands": commands,
                                                          "thread_choice": cpu.choose(None)[1]}))


if __name__ == "__main__":
    main()
