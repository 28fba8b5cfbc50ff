"""Drafter step / target step on CPU (issue 12 target: <= 0.40x at batch 1 for int8 + int8 head, <= 0.30x
for int4), SmolLM2 f32, at batch 1, 4, 16 with --context cached tokens per row.

    python experiments/draft_cost.py [--batches 1 4 16] [--context 300] [--reps 9] [--kernels native]

Target step: one engine AR step (`engine.ar_step`: target forward of one token + sampling + bookkeeping).
Draft step: one drafter step as `speculative.draft` runs it (γ = 1: drafter forward + sampling), drafters
int8 / int4 with the shared f32 head and with the int8 head. Also per step of a γ = --gamma draft (one jit call of
the scan, as the engine's SD step runs the drafter, timed and divided by γ): the γ = 1 call pays the jit's
dispatch of the drafter's ~400 weight leaves (~0.13 ms on the Zen 4 VM) in every step, the engine once per γ
steps. The systems alternate within each repeat (target, then each drafter, order reversed every other repeat);
medians and fastest reported with the load average. Writes experiments/results/draft_cost_cpu.json.

--old-build LIB: also time every system on another build's native library (common.old_build: the two builds'
handlers in one process, alternating), and report new / old ratios.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import decode_inputs, machine, old_build, write_json, xla_cache  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--kernels", default="native")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gamma", type=int, default=5, help="the scan's draft length for the per-step-of-a-scan figure")
    ap.add_argument("--out", default="draft_cost_cpu.json")
    ap.add_argument("--old-build", default=None, help="another build's shared library to A/B against")
    args = ap.parse_args()
    xla_cache.enable()  # warm-ups compile once per machine, not once per run
    import er_jax
    from er_jax import engine as E
    from er_jax.config import SamplingConfig
    from er_jax.execution import Execution
    from er_jax.model import execution_layout
    from er_jax.quant import derive_drafter
    from er_jax.speculative import draft

    m = er_jax.load_model("smollm2", dtype=args.dtype)
    cfg, sc = m.config, SamplingConfig(1.0)
    ex = Execution(args.kernels, None, "unstacked")
    spec = E.StepSpec(cfg, sc, cfg.eos_ids, ex)
    weights = execution_layout(m.weights, ex)  # what SpecRollout runs (the native backend: panel-major)
    drafters = {f"{s}_{h}head": execution_layout(derive_drafter(m.weights, s, head=h), ex, weights.get("lm_head_p"))
                for s in ("int8", "int4") for h in ("shared", "int8")}
    # The cache is donated, as the engine donates it (an undonated cache is copied by every step that writes
    # it: the runs before this change timed that copy too); each timed call gets a fresh copy made untimed.
    flag = old_build(args.old_build) if args.old_build else {"old": False}
    builds = ("", "_old") if args.old_build else ("",)
    # One jit per build: each traces (and so names its FFI targets) while flag["old"] says which build it is.
    ar = {v: jax.jit(functools.partial(E.ar_step, spec), donate_argnums=1) for v in builds}
    dj = {(v, g): jax.jit(lambda d, c, last, k, g=g: draft(cfg, d, c, last, sc, k, g, ex)[:2], donate_argnums=1)
          for v in builds for g in (1, args.gamma)}
    res = {"benchmark": "draft_cost", "machine": machine(), "model": f"smollm2 ({args.dtype})",
           "kernels": args.kernels, "context": args.context, "reps": args.reps, "old_build": args.old_build,
           "rows": []}
    scan = f"_scan{args.gamma}"
    for b in args.batches:
        _, keys, last, state, fresh = decode_inputs(cfg, b, args.context)

        # Each system's argument is built from a fresh cache before its timer starts (building the AR step's
        # state takes ~0.7 ms of eager dispatches: timed, it inflated the target step and flattered the ratio).
        fns = {}
        for v in builds:
            fns["target" + v] = (state, lambda s, v=v: ar[v](weights, s)[0].last)
            for name, d in drafters.items():
                fns[name + v] = (lambda c: c, lambda c, d=d, v=v: dj[v, 1](d, c, last, keys))
                fns[name + scan + v] = (lambda c: c, lambda c, d=d, v=v: dj[v, args.gamma](d, c, last, keys))

        for k, (prep, f) in fns.items():
            flag["old"] = k.endswith("_old")
            jax.block_until_ready(f(prep(fresh())))
            jax.block_until_ready(f(prep(fresh())))
        times = {k: [] for k in fns}
        loads = []
        for rep in range(args.reps):
            order = list(fns) if rep % 2 == 0 else list(fns)[::-1]
            loads.append(os.getloadavg()[0])
            for k in order:
                prep, f = fns[k]
                flag["old"] = k.endswith("_old")
                arg = jax.block_until_ready(prep(fresh()))
                t0 = time.perf_counter()
                jax.block_until_ready(f(arg))
                times[k].append(time.perf_counter() - t0)
        tmed, tmin = np.median(times["target"]), min(times["target"])
        row = {"batch": b, "load_1min": loads, "target_ms": {"median": 1e3 * tmed, "fastest": 1e3 * tmin}, "drafters": {}}
        for v in builds[1:]:  # the other build: its target, and every system's new / old medians
            omed = {k: np.median(times[k + v]) for k in ("target", *drafters)}
            row["target" + v + "_ms"] = {"median": 1e3 * omed["target"], "fastest": 1e3 * min(times["target" + v])}
            row["new_over_old_median"] = {k: float(np.median(times[k]) / omed[k]) for k in omed}
            print(f"B={b:2d} new / old build (medians): "
                  + ", ".join(f"{k} {r:.3f}" for k, r in row["new_over_old_median"].items()), flush=True)
        for k in (k + v for k in drafters for v in builds):
            t_med, t_min = (np.median(times["target_old"]), min(times["target_old"])) if k.endswith("_old") else (tmed, tmin)
            dmed, dmin = np.median(times[k]), min(times[k])
            k_scan = k.replace("_old", "") + scan + ("_old" if k.endswith("_old") else "")
            smed, smin = np.median(times[k_scan]) / args.gamma, min(times[k_scan]) / args.gamma
            row["drafters"][k] = {"median_ms": 1e3 * dmed, "fastest_ms": 1e3 * dmin, "ratio_median": dmed / t_med,
                                  "ratio_fastest": dmin / t_min, "scan_step_median_ms": 1e3 * smed,
                                  "scan_step_fastest_ms": 1e3 * smin, "scan_ratio_median": smed / t_med,
                                  "scan_ratio_fastest": smin / t_min}
            print(f"B={b:2d} {k:20s} draft {1e3 * dmin:7.2f} ms / target {1e3 * t_min:7.2f} ms = {dmin / t_min:.3f} "
                  f"(medians {dmed / t_med:.3f}); a step of a γ = {args.gamma} scan {1e3 * smin:7.2f} ms = "
                  f"{smin / t_min:.3f} (medians {smed / t_med:.3f}); load {np.mean(loads):.1f}", flush=True)
        res["rows"].append(row)
        write_json(args.out, res)
    print("wrote", write_json(args.out, res))


if __name__ == "__main__":
    main()
