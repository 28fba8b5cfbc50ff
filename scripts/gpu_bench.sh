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
#
# Needs jax with CUDA, flax, optax, orbax (the device image has them; nothing is downloaded). Result files
# land in OUT_DIR (default: $OUT when set, else experiments/results).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: scripts/gpu_bench.sh kernels|ar|derive|sweep|rollout [OUT_DIR]}
out=${2:-${OUT:-experiments/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import er_jax.kernels" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e . >/dev/null
python -c "import jax; print(jax.__version__, jax.devices())"
tag=$(python -c "import jax; print(jax.devices()[0].device_kind.lower().replace(' ', '-'))")
alpha=0.80  # SmolLM2-135M int4 drafter, T = 1 (experiments/results/acceptance_smollm2.json, alpha pooled)

case "$stage" in
  kernels) python experiments/bench_kernels.py --full && cp "experiments/results/bench_kernels_$tag.json" "$out/" ;;
  ar) python experiments/bench_ar.py --presets qwen2.5-1.5b qwen2.5-7b --batches 1 8 32 64 --context 1024 \
        && cp "experiments/results/bench_ar_presets_$tag.json" "$out/" ;;
  derive) python experiments/derive_time.py --models qwen2.5-1.5b qwen2.5-7b \
        && cp "experiments/results/derive_time_$tag.json" "$out/" ;;
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
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
ls -la "$out"
