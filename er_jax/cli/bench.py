"""`er-jax bench rollout`: every mode on one long-tail rollout workload (er_jax.bench), its JSON and timeline PNG.

    er-jax bench rollout --model smollm2 --prompts 4 --samples 4 --repeats 3 --out bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

from er_jax import controller
from er_jax.bench import bench_rollout, machine, machine_tag, workload
from er_jax.cli import common
from er_jax.config import MODES
from er_jax.plots import plot_timeline


def add_bench_rollout_args(p: argparse.ArgumentParser) -> None:
    common.model_args(p, required=False, default_model="smollm2")
    p.add_argument("--prompts", type=int, default=4, help="N distinct prompts")
    p.add_argument("--samples", type=int, default=4, help="G samples per prompt")
    p.add_argument("--lengths", default="lognormal", choices=("lognormal", "natural"),
                   help="forced per-row lengths from a lognormal long tail (fixed seed), or natural EOS")
    p.add_argument("--median-len", type=int, default=24)
    p.add_argument("--sigma", type=float, default=0.8, help="log-sd of the lognormal lengths")
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--repeats", type=int, default=3, help="runs per mode (the median is reported)")
    p.add_argument("--draft-length", type=int, default=5, help="γ of sd and toggle; adaptive's start rung")
    p.add_argument("--ladder", type=int, nargs="+", default=list(controller.DEFAULT_LADDER))
    p.add_argument("--calibration", help="constants for toggle / adaptive / auto (default: the platform's)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace-dir", help="append each mode's per-step JSONL trace to DIR/trace_<mode>.jsonl")
    p.add_argument("--forced-acceptance", type=float, default=None, metavar="ALPHA",
                   help="bench only, for random-weight presets: each draft position is accepted with probability "
                        "ALPHA (i.i.d.) instead of the exact rejection test, e.g. SmolLM2's measured int4 α; "
                        "outputs are then not samples of the model. Use with --lengths lognormal")
    p.add_argument("--out", help="result JSON (default: bench_rollout.json)")
    p.add_argument("--png", help="timeline PNG (default: the JSON's name with .png)")
    p.add_argument("--mesh", help="DATA,MODEL: shard the rollout over a data- x tensor-parallel device mesh, "
                   "e.g. 2,4 (default: one device)")
    p.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize from "
                   "ER_JAX_COORDINATOR / ER_JAX_NUM_PROCESSES / ER_JAX_PROCESS_ID, or ER_JAX_DISTRIBUTED=1")


def run_bench_rollout(args, default_out: str = "bench_rollout.json") -> dict:
    """The `er-jax bench rollout` / experiments/bench_rollout.py entry point. `default_out` may hold
    "{machine}" (the device tag, known only once jax is up)."""
    from er_jax.sharding import parse_mesh, start_distributed

    t_start = time.perf_counter()
    mesh = parse_mesh(getattr(args, "mesh", None))  # a bad --mesh fails before anything starts
    if getattr(args, "distributed", False):
        start_distributed()  # before any jax device is touched (here: by loading the model)
    m = common.load(args)
    prompts, lengths = workload(m, args.prompts, args.samples, lengths=args.lengths, median_len=args.median_len,
                                sigma=args.sigma, max_new=args.max_new_tokens, min_len=args.min_len, seed=args.seed)
    desc = (f"{m.source}, {args.prompts} prompts x {args.samples} samples, "
            + ("natural lengths" if lengths is None else
               f"lognormal lengths (median {args.median_len}, sigma {args.sigma}; drawn: mean {lengths.mean():.0f},"
               f" max {lengths.max()})") + f", T={args.temperature}, drafter {args.drafter}")
    print(f"bench rollout: {desc}", flush=True)
    res = bench_rollout(m, prompts=prompts, lengths=lengths, max_new=args.max_new_tokens, modes=args.modes,
                        repeats=args.repeats, drafter=args.drafter, draft_length=args.draft_length,
                        ladder=args.ladder, calibration=args.calibration, temperature=args.temperature,
                        seed=args.seed, trace_dir=args.trace_dir, mesh=mesh,
                        forced_acceptance=args.forced_acceptance)
    out = args.out or default_out.format(machine=machine_tag())  # after any distributed start
    png = args.png or os.path.splitext(out)[0] + ".png"
    result = dict(benchmark="bench_rollout", machine=machine(),
                  workload=dict(description=desc, source=m.source, prompts=args.prompts, samples=args.samples,
                                lengths=args.lengths, median_len=args.median_len, sigma=args.sigma,
                                max_new_tokens=args.max_new_tokens,
                                row_lengths=None if lengths is None else lengths.tolist(),
                                temperature=args.temperature, seed=args.seed),
                  config=dict(drafter=args.drafter, draft_length=args.draft_length, ladder=list(args.ladder),
                              mesh=None if mesh is None else [mesh.data, mesh.model],
                              repeats=args.repeats, calibration=args.calibration,
                              forced_acceptance=args.forced_acceptance,
                              hw=None if args.calibration else controller.defaults_for(
                                  controller.current_platform()).to_dict()),
                  **res)
    result["runtime_s"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    plot_timeline(result, png)
    print(f"\n{'mode':9s} {'min s':>7s} {'median s':>8s} {'x ar':>7s} {'τ':>6s} {'mean γ':>7s} {'SD-on':>6s} "
          f"{'policy s':>8s}")
    for mode, r in result["modes"].items():
        print(f"{mode:9s} {r['wall_min']:7.2f} {r['wall_s']:8.2f} {r.get('ratio_vs_ar', float('nan')):7.3f} "
              f"{'-' if r['tau'] is None else format(r['tau'], '.2f'):>6s} {r['mean_gamma_per_step']:7.2f} "
              f"{r['sd_on_fraction']:6.0%} {r['controller_s']:8.3f}")
    for mode, t in result["targets"].items():
        print(f"{mode}: x{t['ratio_vs_best_static']:.3f} of the best static mode ({result['best_static']}; fastest "
              f"repeats; medians x{t['ratio_of_medians']:.3f}) -> {'meets' if t['met'] else 'MISSES'} the 1.03 target")
    print(f"wrote {out} and {png} ({result['runtime_s']:.0f} s)")
    return result


def cmd_bench_rollout(args) -> int:
    run_bench_rollout(args)
    return 0


def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    br = bsub.add_parser("rollout", help="every mode on one long-tail rollout workload: wall time, τ, SD-on")
    add_bench_rollout_args(br)
    br.set_defaults(fn=cmd_bench_rollout)
