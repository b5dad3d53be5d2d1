#!/usr/bin/env bash
# Issue 15's GPU evidence in one call: qmilora-train's CLI (plain and FSDP), solver, preparation (vs MiLoRA's
# official route), training (vs QLoRA), the plan beside the measured peaks, a MoE step, then the fast test tier. A random checkpoint with LLM-like spectra
# at a real shape is written once to local disk (no hub) and shared by the preparation and training steps, and the
# training step's QMiLoRA loads the preparation step's cache entry instead of preparing again.
# Results: $QMILORA_BENCH_RESULTS (default benchmarks/results)/*-cuda*.json (or *-cpu* with --tiny).
#
#   bash benchmarks/gpu_suite.sh          # a CUDA machine; wheels in .whl/ (bitsandbytes, ...) are installed first
#   bash benchmarks/gpu_suite.sh --tiny   # CPU, tiny shapes: CI keeps it alive
#
# Device time is scarce, so steps run in order of value under one deadline (QMILORA_GPU_BUDGET_S seconds, default
# 520): a step that fails or runs out of time is reported and the next one still runs; the exit status says whether
# every step ran and passed. QMILORA_GPU_STEPS picks step groups (default "cli tests speed": what one call of
# about 8 minutes fits; the others are "solver", "7b" (7B preparation, with the host-solver path a consumer GPU
# takes, and training), "moe", "long" (Llama-3-8B at 128k, then 32k), "13b"), e.g. a second call:
# QMILORA_GPU_STEPS="solver 7b moe". With --tiny the default is "cli solver 7b moe tests" (tests/test_benchmarks.py
# runs speed.py on its own).
set -uo pipefail
cd "$(dirname "$0")"
py=$(command -v python3 || command -v python)
if ! $py -c "import bitsandbytes" 2>/dev/null && compgen -G "../.whl/*.whl" >/dev/null; then
  # the GPU image lacks bitsandbytes and datasets: carried wheels, with the transformers and peft tested here
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qmilora-site \
    ../.whl/*.whl || exit 1
  export PYTHONPATH=/tmp/qmilora-site
fi
export PYTHONPATH="$(cd .. && pwd)${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 PYTHONUNBUFFERED=1
$py -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" || exit 1

if [ "${1:-}" = "--tiny" ]; then
  shapes=(96x64 128x96); shape=tiny; seq=32; steps=2; rank=8; moe=tinymoe; tests=""; groups="cli solver 7b moe tests"
else
  shapes=(4096x4096 11008x4096 13824x5120); shape=llama2-7b; seq=2048; steps=10; rank=64; moe=qwen3-moe-2l; tests=1
  groups="cli tests speed"
fi
dev=$($py -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
results=${QMILORA_BENCH_RESULTS:-results}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
export QMILORA_BENCH_CACHE=$work/cache  # prepare.py fills it, train.py's QMiLoRA loads from it
deadline=$((SECONDS + ${QMILORA_GPU_BUDGET_S:-520}))
failed=0
steps_wanted=" ${QMILORA_GPU_STEPS:-$groups} "  # the order is always this file's
step() {  # step NAME COMMAND...: run under the time left; a failure or timeout is reported, not fatal
  local name=$1 left=$((deadline - SECONDS)); shift
  local group=${name%%:*}
  [[ "$steps_wanted" == *" $group "* ]] || return 0
  if [ $left -lt 20 ]; then echo "== $name: SKIPPED (out of time)"; failed=1; return; fi
  echo "== $name ($left s left)"; local t=$SECONDS
  timeout --kill-after=10 $left "$@"; local rc=$?
  if [ $rc -ne 0 ]; then echo "== $name: FAILED (exit $rc) after $((SECONDS - t)) s"; failed=1;
  else echo "== $name: done in $((SECONDS - t)) s"; fi
}

# 0. qmilora-train through its CLI with this device's defaults, plain and under the shipped FSDP config
step cli $py cli_smoke.py
# 0a. the fast test tier on this host (CPU-assuming tests included)
if [ -n "$tests" ]; then
  xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
  step tests bash -c "cd .. && $py -m pytest -q -p no:cacheprovider $xdist -m 'not slow' tests"
fi
# the random checkpoint at $shape, written once to $work/ckpt for the speed and 7b steps (whichever runs first)
checkpoint=($py -c "import common, os, sys; print('reusing' if os.path.isfile(os.path.join(sys.argv[2], 'model.safetensors.index.json')) else '%.1f GB' % common.write_random_checkpoint(sys.argv[1], sys.argv[2]))" $shape "$work/ckpt")
# 0b. every training option on and off through qmilora-train, against QLoRA, on that checkpoint (own prepared cache)
step speed:checkpoint "${checkpoint[@]}"
step speed:run $py speed.py --shape $shape --checkpoint "$work/ckpt" --seq $seq --steps $(( steps < 4 ? steps : 4 )) \
  --batch 2 --rank $rank --repeat 1
# 1. the minor solver against torch.linalg.svd fp32: time and subspace error
step solver $py decompose.py --shapes "${shapes[@]}" --rank $rank --repeat 1 --solvers gram svd --model ""
# 2. preparation: streamed QMiLoRA (writing its cache entry) against the official whole-model route
step 7b:checkpoint "${checkpoint[@]}"
step 7b:prepare $py prepare.py --shape $shape --checkpoint "$work/ckpt" --rank $rank --methods official qmilora-auto qmilora-auto~cpu \
  --official_fraction ${QMILORA_OFFICIAL_FRACTION:-0.0625}
# 3. training: QMiLoRA against QLoRA on the same checkpoint
step 7b:train $py train.py --shape $shape --checkpoint "$work/ckpt" --seq $seq --steps $steps --warmup 2 --rank $rank
# 4. the plan beside the measured peaks
step 7b:plan $py plan_check.py "$results"/train-$shape-$dev.json "$results"/prepare-$shape-$dev.json
rm -rf "$work/ckpt" "$work/cache"
# 5. MoE: two Qwen3-30B-A3B layers (4-bit expert stacks, routed-only dequantization) against PEFT's QLoRA
step moe $py train.py --shape $moe --seq $seq --steps $(( steps < 5 ? steps : 5 )) --warmup 1 --rank $(( rank < 16 ? rank : 16 ))
if [ -n "$tests" ]; then
  # 7. (ask for them: QMILORA_GPU_STEPS="long" or "13b") long context at a Llama-3 vocabulary, through qmilora-train:
  # 128k with offload and the tiled MLP (the plan's 13.4 GB) first, capped at a 24 GB card's 23 GiB after its CUDA
  # context, then 32k with offload, tiled on/off, against QLoRA (uncapped: it needs ~72 GB; the plan beside every
  # row); a 13B preparation
  step long:checkpoint $py -c "import common, sys; print('%.1f GB' % common.write_random_checkpoint(sys.argv[1], sys.argv[2], positions=131072))" \
    llama3-8b "$work/ckpt8"
  step long:128k $py speed.py --shape llama3-8b --checkpoint "$work/ckpt8" --cache "$work/cache8" --seq 131072 --batch 1 \
    --steps 2 --rank $rank --options none --no_qlora --gpu_cap 23 --flags="--offload_activations true --tiled_mlp true" \
    --tag 128k
  step long:32k $py speed.py --shape llama3-8b --checkpoint "$work/ckpt8" --cache "$work/cache8" --seq 32768 --batch 1 \
    --steps 2 --rank $rank --options tiled_mlp --flags="--offload_activations true" --tag 32k
  rm -rf "$work/ckpt8" "$work/cache8"
  step 13b:checkpoint $py -c "import common, sys; print('%.1f GB' % common.write_random_checkpoint(sys.argv[1], sys.argv[2]))" \
    llama2-13b "$work/ckpt13"
  step 13b:prepare $py prepare.py --shape llama2-13b --checkpoint "$work/ckpt13" --rank $rank \
    --methods official qmilora-auto --official_fraction 0.05
fi
exit $failed
