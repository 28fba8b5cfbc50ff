"""Rollout benchmark: every decode mode (ar, sd, toggle, adaptive, auto) on one RL-style workload — N prompts
x G samples with long-tailed per-row lengths (lognormal, fixed seed; EOS suppressed until each row's length)
or natural EOS lengths — in one process after warm-up, each mode repeated R times (median reported).

    python experiments/bench_rollout.py                       # CPU default: SmolLM2, 4 x 4 rows
    python experiments/bench_rollout.py --preset qwen2.5-1.5b --prompts 16 --samples 8 --max-new-tokens 1024

Same function and options as `er-jax bench rollout`; writes experiments/results/bench_rollout_<machine>.json
(wall time, ratio vs ar, τ, mean γ per step, SD-on fraction per mode; machine, jax version, commit) and the
timeline PNG beside it (active rows and chosen γ per step, one panel per mode).
"""
from __future__ import annotations

import argparse
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    from er_jax.cli.bench import add_bench_rollout_args, run_bench_rollout

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_rollout_args(ap)
    args = ap.parse_args(argv)
    try:
        run_bench_rollout(args, default_out=os.path.join(RESULTS, "bench_rollout_{machine}.json"))
    except ValueError as e:
        print(f"bench_rollout: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
