#!/usr/bin/env bash
# Issue 15's GPU evidence in one call: solver, preparation (vs MiLoRA's official route), training (vs QLoRA),
# the plan beside the measured peaks, then the fast test tier. Random checkpoints with LLM-like spectra at real
# shapes are written locally (no hub). Results: benchmarks/results/*-cuda*.json (or *-cpu* with --tiny).
#
#   bash benchmarks/gpu_suite.sh          # a CUDA machine; wheels in .wheels/ (bitsandbytes) are installed first
#   bash benchmarks/gpu_suite.sh --tiny   # CPU, tiny shapes, results in $QMILORA_BENCH_RESULTS: CI keeps it alive
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH="$(cd .. && pwd)${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
if compgen -G "../.wheels/*.whl" >/dev/null; then python -m pip install -q --no-deps ../.wheels/*.whl; fi
python -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

if [ "${1:-}" = "--tiny" ]; then
  shapes=(96x64 128x96); model=128,256,2; prep=tiny; train=tiny; seq=32; steps=2; rank=8; long=""; tests=""
  moe=tinymoe
else
  shapes=(4096x4096 11008x4096 13824x5120); model=""; prep=llama2-7b; train=llama2-7b; seq=2048; steps=20
  rank=64; long=llama3-8b; tests=1; moe=qwen3-moe-2l
fi
dev=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

# 1. the minor solver against torch.linalg.svd fp32: time and subspace error
python decompose.py --shapes "${shapes[@]}" --rank $rank --repeat 1 --solvers gram svd --model "$model"
# 2. preparation: streamed QMiLoRA against the official whole-model route, wall time and peak memory
python prepare.py --shape $prep --rank $rank --methods official qmilora-auto identity
# 3. training: QMiLoRA against QLoRA on the same checkpoint (and the model's-loss variant)
python train.py --shape $train --seq $seq --steps $steps --warmup 2 --rank $rank
if [ -n "$long" ]; then  # long context at a Llama-3 vocabulary
  python train.py --shape $long --seq 8192 --steps 5 --warmup 1 --rank $rank
fi
# 3b. MoE: two Qwen3-30B-A3B layers (4-bit expert stacks, routed-only dequantization) against PEFT's QLoRA
python train.py --shape $moe --seq $seq --steps $(( steps < 5 ? steps : 5 )) --warmup 1 --rank $(( rank < 16 ? rank : 16 ))
# 4. the plan beside the measured peaks
results=${QMILORA_BENCH_RESULTS:-results}
python plan_check.py "$results"/train-$train-$dev*.json "$results"/prepare-$prep-$dev.json \
  ${long:+"$results"/train-$long-$dev*.json}
# 5. the fast test tier on this host (CPU-assuming tests included)
if [ -n "$tests" ]; then (cd .. && python -m pytest -q -m "not slow" tests); fi
