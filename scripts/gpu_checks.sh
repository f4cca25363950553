#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with a GPU (a lent one included): the native
# conformance matrix (fp32/fp16/bf16 rows, and the decode-graphs row, which regrows the KV cache
# between its batches), per-op benchmarks, end-to-end decode and prefill against transformers
# for the 0.3B model and two layers of 21B-A3B (graphs vs eager vs transformers), and kernel
# launches per decoder layer. Sized for one H200 from a bare machine: the step limits sum to
# 450 s, under 8 minutes.
#
#   bash scripts/gpu_checks.sh [STEP ...]      steps: env conformance ops e2e-small e2e-21b launches parallel
#                                              (default: all but parallel)
# parallel (needs >= 2 GPUs, else skipped with a message): 21B-A3B (8 layers) at TP 2 against TP 1,
# per-rank memory and tokens/s, and the layout printout of 300B-A47B on 8 GPUs at bf16 and wint8
# (packed bytes per rank);
# outside the one-GPU, 8-minute budget above.
# Environment: DEVICE (cuda), PYTHON (python3), OUT (results folder; default
# benchmarks/results/gpu), CKPT (where random checkpoints go; default /tmp/ernie-hal-ckpt),
# QUICK=1 (tiny shapes on any device: checks this script itself), LIMIT_SCALE (multiplies every
# step's limit; QUICK's default 6: a shared CPU imports transformers slowly).
# Each step has its own time limit, so one slow step cannot eat the others' time; a step's
# failure is reported and the next step still runs. Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
CKPT=${CKPT:-/tmp/ernie-hal-ckpt}
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then SCALE=${LIMIT_SCALE:-6}; else SCALE=${LIMIT_SCALE:-1}; fi
mkdir -p "$OUT" "$CKPT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env conformance ops e2e-small e2e-21b launches)

# Importable without network: an editable install without dependencies, or else a path entry
# whose `ernie_hal` is this checkout (the package is the repository root).
if ! "$PY" -c "import ernie_hal" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || {
    shim=$(mktemp -d); ln -s "$PWD" "$shim/ernie_hal"; export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"; }
fi

if [ "$QUICK" = 1 ]; then
  e2e_small=(--models tiny-moe --layers 1 --batches 1 2 --prefill-len 8 --decode-len 3 --repeat 1 --dtype fp32)
  e2e_big=("${e2e_small[@]}")
  ops=(--small --iters 2 --dtype fp32 --ops rms_norm gqa_attention moe)
  conf=(--dtypes fp32)
  par=(--model tiny-moe --dtype fp32 --prefill-len 8 --decode-len 3)
  launches=(--models tiny-moe --dtype fp32)
else
  e2e_small=(--models ernie-4.5-0.3b --batches 1 16 --dtype bf16 --decode-len 64 --repeat 1)
  e2e_big=(--models ernie-4.5-21b-a3b --layers 2 --batches 1 16 --dtype bf16 --decode-len 64 --repeat 1)
  ops=(--dtype bf16 --iters 10)
  conf=()
  par=(--model ernie-4.5-21b-a3b --layers 8 --dtype bf16 --prefill-len 512 --decode-len 64)
  launches=(--models ernie-4.5-0.3b ernie-4.5-21b-a3b --layers 2 --dtype bf16)
fi

failed=0
run_step() {   # name, seconds, command...
  local name=$1 limit=$(($2 * SCALE)); shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

for step in "${steps[@]}"; do
  case $step in
    env) run_step env 30 bash -c "nvidia-smi -L 2>/dev/null || rocm-smi --showproductname 2>/dev/null || true;
                                 $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.version.hip)';
                                 $PY -m ernie_hal devices --json > '$OUT/devices.json' && echo devices: ok" ;;
    conformance) run_step conformance 150 "$PY" -m ernie_hal conformance --device "$DEVICE" "${conf[@]}" \
                   --json "$OUT/conformance_$DEVICE.json" ;;
    ops) run_step ops 60 "$PY" benchmarks/bench_ops.py --device "$DEVICE" "${ops[@]}" \
           --output "$OUT/bench_ops_$DEVICE.json" ;;
    e2e-small) run_step e2e-small 90 "$PY" benchmarks/bench_e2e.py --device "$DEVICE" "${e2e_small[@]}" \
                 --engines ernie-hal ernie-hal-eager transformers --checkpoints "$CKPT" \
                 --output "$OUT/bench_e2e_${DEVICE}_small.json" ;;
    e2e-21b) run_step e2e-21b 90 "$PY" benchmarks/bench_e2e.py --device "$DEVICE" "${e2e_big[@]}" \
               --engines ernie-hal ernie-hal-eager transformers --checkpoints "$CKPT" \
               --output "$OUT/bench_e2e_${DEVICE}_21b.json" ;;
    launches) run_step launches 30 "$PY" benchmarks/launch_counts.py --device "$DEVICE" "${launches[@]}" \
                --checkpoints "$CKPT" --output "$OUT/launch_counts_$DEVICE.json" ;;
    parallel)
      gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
      if [ "$QUICK" != 1 ] && [ "${gpus:-0}" -lt 2 ]; then
        echo "== parallel: skipped, $gpus GPU(s) visible; tensor parallel needs at least 2"
      else
        run_step parallel 560 bash -c "'$PY' benchmarks/bench_parallel.py --device '$DEVICE' ${par[*]} --tp 1 2 \
            --checkpoints '$CKPT' --output '$OUT/bench_parallel_$DEVICE.json' &&
          '$PY' -m ernie_hal devices --show-plan --model ernie-4.5-300b-a47b --tp 8 --dtype bf16 &&
          '$PY' -m ernie_hal devices --show-plan --model ernie-4.5-300b-a47b --tp 8 --quantization wint8 &&
          '$PY' -m ernie_hal devices --show-plan --model ernie-4.5-300b-a47b --tp 8 --quantization wint8 --json \
            > '$OUT/plan_300b_tp8_wint8.json'"
      fi ;;
    *) echo "unknown step $step (env conformance ops e2e-small e2e-21b launches parallel)"; failed=$((failed + 1)) ;;
  esac
done
echo "gpu_checks: ${#steps[@]} steps, $failed failed; results in $OUT"
exit $failed
