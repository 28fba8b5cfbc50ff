#!/usr/bin/env bash
# The GPU measurements the issues ask for, in stages that each fit one 10-minute device call:
#
#   bash scripts/gpu_bench.sh STAGE [OUT_DIR]
#
#   kernels  experiments/bench_kernels.py --full: W4A16 / W8A16 matmuls vs copy bandwidth, XLA's dequant dot
#            and a bf16 dot (Qwen2.5-1.5B / 7B, Llama-3.1-8B decode shapes); rejection and attention kernels
#   ar       experiments/bench_ar.py --presets: AR step time vs the memory roofline, Qwen2.5-1.5B and 7B
#            shapes (random bf16 weights), batch 1 / 8 / 32 / 64
#   derive   experiments/derive_time.py: drafter derivation time (Qwen2.5-1.5B / 7B shapes)
#   sweep    er-jax sweep + calibrate + plot on the Qwen2.5-1.5B shape (cost-model constants for this GPU)
#   rollout  er-jax bench rollout on the Qwen2.5-1.5B shape, long-tail lengths, every mode, with draft
#            acceptance forced to SmolLM2's measured int4 α (random weights cannot draft like a real model)
#   all      everything above, shortened to fit 8 minutes on one H100 / H200, each stage under its own
#            time limit (a stage that fails or runs out is recorded, the next one still runs):
#            preflight (every kernel vs its reference at Qwen2.5-1.5B shapes, numbers printed), AR vs
#            roofline, kernels vs copy bandwidth (--quick), derivation time, a short sweep + calibration,
#            the long-tail rollout bench; all_<device>.json records each stage's status and seconds.
#
# DRY=1 scripts/gpu_bench.sh all: the same code paths on CPU (JAX_PLATFORMS=cpu, interpret mode, the
# tiny-bench preset and tiny kernel shapes), to check the script end to end before a device window.
#
# Needs jax with CUDA, flax, optax, orbax (the device image has them; nothing is downloaded). Result files
# land in OUT_DIR (default: $OUT when set, else experiments/results).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: scripts/gpu_bench.sh kernels|ar|derive|sweep|rollout|all [OUT_DIR]}
out=${2:-${OUT:-experiments/results}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
export ER_JAX_RESULTS="$out"  # experiments/*.py write their JSON here
dry=${DRY:-0}
# Dry runs interpret every kernel on a (shared) CPU: stage limits are scaled by LIMIT_SCALE (default 20 there).
[ "$dry" = 1 ] && export JAX_PLATFORMS=cpu LIMIT_SCALE=${LIMIT_SCALE:-20}
python -c "import er_jax.kernels" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e . >/dev/null
python -c "import jax; print(jax.__version__, jax.devices())"
tag=$(python -c "import jax; print(jax.devices()[0].device_kind.lower().replace(' ', '-'))")
alpha=0.80  # SmolLM2-135M int4 drafter, T = 1 (experiments/results/acceptance_smollm2.json, alpha pooled)

case "$stage" in
  kernels) python experiments/bench_kernels.py --full ;;
  ar) python experiments/bench_ar.py --presets qwen2.5-1.5b qwen2.5-7b --batches 1 8 32 64 --context 1024 ;;
  derive) python experiments/derive_time.py --models qwen2.5-1.5b qwen2.5-7b ;;
  sweep)
    er-jax sweep --preset qwen2.5-1.5b --batches 1 4 16 64 --contexts 512 2048 --gammas 0 3 5 7 11 \
      --out "$out/sweep_$tag.csv"
    er-jax calibrate --preset qwen2.5-1.5b --csv "$out/sweep_$tag.csv" --out "$out/calibration_$tag.json"
    er-jax plot --preset qwen2.5-1.5b --calibration "$out/calibration_$tag.json" --csv "$out/sweep_$tag.csv" \
      --out "$out/boundary_$tag.png" ;;
  rollout)
    calib=()
    [ -f "$out/calibration_$tag.json" ] && calib=(--calibration "$out/calibration_$tag.json")
    er-jax bench rollout --preset qwen2.5-1.5b --prompts 16 --samples 8 --lengths lognormal --median-len 256 \
      --sigma 0.9 --max-new-tokens 2048 --repeats 2 --forced-acceptance "$alpha" "${calib[@]}" \
      --out "$out/bench_rollout_$tag.json" ;;
  all)
    # Stage time limits (s), summing to 450 with ~30 s of start-up: compile time dominates every stage.
    if [ "$dry" = 1 ]; then
      preset=tiny-bench; kflag=--tiny; dmodel=smollm2-135m; ctx=256; sweep_ctx=(64 128); rl=(--max-new-tokens 48 --median-len 16)
    else
      preset=qwen2.5-1.5b; kflag=--quick; dmodel=qwen2.5-1.5b; ctx=1024; sweep_ctx=(512 2048); rl=(--max-new-tokens 512 --median-len 128)
    fi
    pf=(); [ "$dry" = 1 ] && pf=(--tiny)
    status=()
    run() {  # run NAME LIMIT_S CMD...: time-limited, never stops the script
      local name=$1 limit=$(($2 * ${LIMIT_SCALE:-1})); shift 2
      local t0=$SECONDS rc=0
      echo "=== $name (limit ${limit}s): $*"
      timeout --kill-after=10 "$limit" "$@" || rc=$?
      status+=("{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit}")
      echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
    }
    run preflight 60 python experiments/bench_kernels.py --preflight "${pf[@]}"
    run ar 70 python experiments/bench_ar.py --presets "$preset" --batches 1 64 --context "$ctx" --reps 3
    run kernels 70 python experiments/bench_kernels.py "$kflag" --reps 5
    run derive 30 python experiments/derive_time.py --models "$dmodel" --reps 2
    run sweep 90 er-jax sweep --preset "$preset" --batches 1 16 --contexts "${sweep_ctx[@]}" --gammas 0 3 7 \
      --reps 3 --out "$out/sweep_$tag.csv"
    run calibrate 20 er-jax calibrate --preset "$preset" --csv "$out/sweep_$tag.csv" --out "$out/calibration_$tag.json"
    calib=()
    [ -f "$out/calibration_$tag.json" ] && calib=(--calibration "$out/calibration_$tag.json")
    run rollout 110 er-jax bench rollout --preset "$preset" --prompts 8 --samples 4 --lengths lognormal \
      --sigma 0.9 "${rl[@]}" --repeats 1 --forced-acceptance "$alpha" "${calib[@]}" \
      --out "$out/bench_rollout_$tag.json"
    (IFS=,; echo "{\"benchmark\": \"gpu_bench all\", \"dry\": $dry, \"device\": \"$tag\", \"stages\": [${status[*]}]}") \
      > "$out/all_$tag.json"
    cat "$out/all_$tag.json" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
ls -la "$out"
