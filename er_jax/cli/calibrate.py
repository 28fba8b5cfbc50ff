"""`er-jax sweep / calibrate / validate / predict / plot`: time the engine, fit the cost model's constants, check
and use them.

    er-jax sweep --preset qwen2.5-1.5b --layers 4 --batches 1 4 16 --contexts 256 1024 --gammas 0 3 5 --out sweep.csv
    er-jax calibrate --csv sweep.csv --preset qwen2.5-1.5b --layers 4 --drafter int4 --out calib.json
    er-jax validate --csv sweep.csv --calibration calib.json
    er-jax predict --calibration calib.json --batch 8 --context 1024 --gamma 5 --tau 4
    er-jax plot --calibration calib.json --csv sweep.csv --out boundary.png

The functions behind them: er_jax.sweep (the timing sweep, CSV / trace I/O), er_jax.calibfile (fit, calibration
files, predict), er_jax.plots.
"""
from __future__ import annotations

import json
import time

from er_jax import controller
from er_jax.bench import machine
from er_jax.calibfile import PRIOR_WEIGHT, calibrate, load_or_defaults, predict_point, save
from er_jax.cli import common
from er_jax.config import BACKENDS, LAYOUTS
from er_jax.plots import plot_boundary
from er_jax.sweep import read_csv, read_trace, sweep, write_csv


def cmd_sweep(args) -> int:
    m = common.load(args)
    t0 = time.perf_counter()
    rows = sweep(m.config, m.weights, batches=args.batches, contexts=args.contexts, gammas=args.gammas,
                 drafter=args.drafter, reps=args.reps, warmup=args.warmup, temperature=args.temperature,
                 seed=args.seed, kernels=args.kernels, layout=args.layout)
    write_csv(args.out, rows)
    print(f"{len(rows)} timings of {m.source} in {time.perf_counter() - t0:.1f} s -> {args.out}")
    for r in rows:
        print(f"  {r['kind']:6s} B={r['batch']:<4d} S={r['context']:<6g} γ={r['gamma']:<2d} "
              f"{1e3 * r['wall_s']:9.2f} ms" + (f"  τ={r['tau']:.2f}" if r["tau"] is not None else ""))
    return 0


def cmd_calibrate(args) -> int:
    rows = [r for path in args.csv for r in read_csv(path)]
    m = common.load(args, weights=False)
    costs = controller.ModelCosts.from_config(m.config, args.drafter)
    hw = calibrate(rows, costs, prior_weight=args.prior_weight)
    save(args.out, hw, rows, costs, dict(source=m.source, drafter=args.drafter, csv=list(args.csv),
                                         prior_weight=args.prior_weight, machine=machine()))
    v = controller.validate(rows, hw, costs)
    print(f"fitted {len(rows)} timings of {m.source} -> {args.out}")
    for k, val in hw.to_dict().items():
        print(f"  {k:8s} {val}")
    print("in-sample MAPE: " + ", ".join(f"{k} {100 * e:.1f}%" for k, e in v["mape"].items())
          + (f"; SD decision agreement {100 * v['decision_accuracy']:.0f}%" if v["decision_accuracy"] is not None
             else ""))
    return 0


def cmd_validate(args) -> int:
    hw, _, calib_costs = load_or_defaults(args.calibration)
    costs = common.costs(args, calib_costs)
    rows = [r for path in (args.csv or []) for r in read_csv(path)]
    rows += [r for path in (args.trace or []) for r in read_trace(path)]
    if not rows:
        raise ValueError("validate needs timings: --csv sweep.csv and/or --trace trace.jsonl")
    v = controller.validate(rows, hw, costs, tau=args.tau)
    print(f"{'kind':8s} {'n':>5s} {'MAPE':>8s}")
    for k, e in v["mape"].items():
        print(f"{k:8s} {v['count'][k]:5d} {100 * e:7.1f}%")
    if v["decisions"]:
        print(f"\n{'batch':>5s} {'context':>8s} {'γ':>3s} {'τ':>5s} {'measured':>9s} {'predicted':>9s}  agree")
        for d in sorted(v["decisions"], key=lambda d: (d["gamma"], d["batch"], d["context"])):
            print(f"{d['batch']:5d} {d['context']:8.0f} {d['gamma']:3d} {d['tau']:5.2f} {d['measured_speedup']:9.3f} "
                  f"{d['predicted_speedup']:9.3f}  {'yes' if d['agree'] else 'NO'}")
        print(f"\nSD-on decision sign accuracy: {100 * v['decision_accuracy']:.0f}% of {len(v['decisions'])} cells")
    else:
        print("\nno (batch, context) cell holds both ar and sd timings: no decision accuracy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(v, f, indent=1)
    return 0


def cmd_predict(args) -> int:
    hw, _, calib_costs = load_or_defaults(args.calibration)
    costs = common.costs(args, calib_costs)
    if args.batch < 1 or args.context < 0:
        raise ValueError(f"--batch must be >= 1 and --context >= 0, got {args.batch}, {args.context}")
    p = predict_point(hw, costs, args.batch, args.context, args.gamma, args.tau, args.epsilon)
    print(f"{costs.name} on {hw.platform}: B={args.batch} S={args.context:g} γ={args.gamma} τ={p['tau']:g}")
    print(f"  T_T (target decode step)   {1e3 * p['T_T']:9.3f} ms")
    print(f"  T_D (one draft step)       {1e3 * p['T_D']:9.3f} ms")
    print(f"  T_V (verify γ+1 positions) {1e3 * p['T_V']:9.3f} ms")
    print(f"  SD step γ·T_D + T_V        {1e3 * p['sd_step']:9.3f} ms")
    print(f"  speedup τ·T_T/(γ·T_D+T_V)  {p['speedup']:9.3f}   "
          f"(break-even τ {p['breakeven_tau']:.2f} at ε={args.epsilon})")
    print(f"  decision: {p['decision']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(p, f, indent=1)
    return 0


def cmd_plot(args) -> int:
    hw, _, calib_costs = load_or_defaults(args.calibration)
    costs = common.costs(args, calib_costs)
    rows = [r for path in (args.csv or []) for r in read_csv(path)]
    path = plot_boundary(hw, costs, args.out, gamma=args.gamma, taus=args.taus, rows=rows,
                         batch_max=args.batch_max, context_range=(args.context_min, args.context_max),
                         epsilon=args.epsilon)
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    """Add sweep / calibrate / validate / predict / plot to the `er-jax` sub-command parser."""
    s = sub.add_parser("sweep", help="time engine components over batch x context x γ (CSV for calibrate)")
    common.model_args(s)
    s.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    s.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    s.add_argument("--gammas", type=int, nargs="+", default=[0, 3, 5, 7])
    s.add_argument("--reps", type=int, default=5, help="timed runs per unit (median)")
    s.add_argument("--warmup", type=int, default=2, help="untimed runs per unit (the first compiles)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--kernels", choices=BACKENDS, help="op backend (default: the platform's fastest)")
    s.add_argument("--layout", choices=LAYOUTS, help="layer execution layout (default: "
                   "SpecRollout's, i.e. unstacked on one CPU device, else stacked)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="sweep.csv")
    s.set_defaults(fn=cmd_sweep)

    c = sub.add_parser("calibrate", help="fit the cost model's constants to sweep CSVs")
    c.add_argument("--csv", nargs="+", required=True)
    common.model_args(c)
    c.add_argument("--prior-weight", type=float, default=PRIOR_WEIGHT,
                   help="pull towards the platform defaults in directions the sweep leaves open (see calibrate)")
    c.add_argument("--out", default="calibration.json")
    c.set_defaults(fn=cmd_calibrate)

    v = sub.add_parser("validate", help="MAPE per component and SD-decision accuracy of a calibration")
    v.add_argument("--calibration", help="a calibrate JSON (default: this platform's default constants)")
    v.add_argument("--csv", nargs="+", help="sweep CSVs")
    v.add_argument("--trace", nargs="+", help="rollout traces (JSONL from generate(trace_path=...))")
    v.add_argument("--tau", type=float, help="τ for sd timings that carry none (default: γ)")
    v.add_argument("--json", help="also write the validation as JSON")
    common.model_args(v, required=False)
    v.set_defaults(fn=cmd_validate)

    pr = sub.add_parser("predict", help="predicted step times, speedup and decision at one operating point")
    pr.add_argument("--calibration", help="a calibrate JSON (default: this platform's default constants)")
    pr.add_argument("--batch", type=int, required=True)
    pr.add_argument("--context", type=float, required=True)
    pr.add_argument("--gamma", type=int, default=5)
    pr.add_argument("--tau", type=float, help="tokens per SD step (default: γ, the cold start)")
    pr.add_argument("--epsilon", type=float, default=0.05)
    pr.add_argument("--json")
    common.model_args(pr, required=False)
    pr.set_defaults(fn=cmd_predict)

    pl = sub.add_parser("plot", help="PNG of the SD on/off boundary over batch x context")
    pl.add_argument("--calibration", help="a calibrate JSON (default: this platform's default constants)")
    pl.add_argument("--csv", nargs="+", help="sweep CSVs whose measured speedups are overlaid")
    pl.add_argument("--gamma", type=int, default=5)
    pl.add_argument("--taus", type=float, nargs="+", help="τ values of the boundary lines")
    pl.add_argument("--batch-max", type=int, default=256)
    pl.add_argument("--context-min", type=int, default=128)
    pl.add_argument("--context-max", type=int, default=8192)
    pl.add_argument("--epsilon", type=float, default=0.05)
    pl.add_argument("--out", default="boundary.png")
    common.model_args(pl, required=False)
    pl.set_defaults(fn=cmd_plot)
