"""Native CPU matmuls (er_jax.kernels.native) vs XLA's f32 dot at decode shapes: GB/s and speed-ups.

For SmolLM2-135M (hidden 576, 9 / 3 heads of 64, MLP 1536, 30 layers) and Qwen2.5-1.5B (hidden 1536,
12 / 2 heads of 128, MLP 8960): q/o, k/v, gate/up and down, M = 1 .. 64 rows. Systems: XLA f32 (jnp.dot
of f32 weights), native f32, native bf16, native int8, native int4 (both in er_jax.quant.QuantArray's
layout), and native f32 / int8 / int4 on panel-major weights (er_jax.panels: what SpecRollout runs). Each timing is one jitted chain of matmuls over enough distinct weight copies that the working
set exceeds the 32 MiB L3 where it can (<= 16 copies, >= 64 MiB; `in_l3` flags the rest), each matmul depending on
the previous one so none run concurrently; the per-matmul time is the chain's over its length. Systems
alternate within each repeat (order rotated) and medians over repeats are reported. A read-bandwidth
probe (`common.read_bandwidth` over 256 MiB) takes its turn in the same rotation, and each fraction of read bandwidth
divides by the probe's median over those repeats (this VM's bandwidth moves by 1.5x within minutes). The "model step"
rows (--model-step) time all 7 projections of SmolLM2's 30 layers in one chain (what a decode step
streams; slow to compile).

  python experiments/bench_native.py            # full run -> experiments/results/bench_native_cpu.{json,png}
  python experiments/bench_native.py --quick    # smoke run (a few shapes, 2 repeats), not written
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, read_bandwidth, write_json  # noqa: E402

from er_jax.kernels import native  # noqa: E402
from er_jax.panels import pack  # noqa: E402
from er_jax.quant import quantize_int4, quantize_int8  # noqa: E402

MODELS = {  # Qwen first: its MLP shapes carry the targets, and a run stopped early keeps them
    "qwen2.5-1.5b": {"hidden": 1536, "q": 1536, "kv": 256, "mlp": 8960, "layers": 28},
    "smollm2": {"hidden": 576, "q": 576, "kv": 192, "mlp": 1536, "layers": 30},
}
SYSTEMS = ("xla_f32", "native_f32", "native_bf16", "native_int8", "native_int4", "panel_f32", "panel_int8", "panel_int4")
MS = (1, 2, 4, 8, 16, 32, 64)
L3_BYTES = 32 << 20
READ = "read"  # the read-bandwidth probe, timed in the same rotation as the systems (this VM's bandwidth drifts
READ_BYTES = 256 << 20  # by 1.5x within minutes): a sum over 256 MiB, well past the L3


def shapes(model: str) -> dict:
    c = MODELS[model]
    return {"gate/up": (c["hidden"], c["mlp"]), "down": (c["mlp"], c["hidden"]), "q/o": (c["hidden"], c["q"]),
            "k/v": (c["hidden"], c["kv"])}


def make_weight(system: str, w):
    if system.startswith("panel_"):
        return pack(make_weight("native_" + system[len("panel_"):], w))
    if system in ("xla_f32", "native_f32"):
        return w
    if system == "native_bf16":
        return w.astype(jnp.bfloat16)
    return quantize_int8(w) if system == "native_int8" else quantize_int4(w)


def nbytes(x) -> int:
    return int(x.nbytes) if hasattr(x, "nbytes") else sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(x))


def apply(system: str, x, w):
    if system == "xla_f32":
        return jnp.dot(x, w)
    if system in ("native_int8", "native_int4"):
        return native.quant_matmul(x, w)
    return native.matmul(x, w)


def chain_fn(system: str, ks: list[int]):
    """jit(x_by_k, weights) -> a chain of matmuls; x_by_k[K] is the input of every weight with that K."""

    def f(xs, ws):
        xs = dict(xs)
        for k, w in zip(ks, ws):
            y = apply(system, xs[k], w)
            dep = 0.0 * jnp.sum(y[:, :1])  # a data dependency: no two matmuls run concurrently
            xs = {kk: v + dep for kk, v in xs.items()}
        return xs

    return jax.jit(f)


def time_chain(fn, xs, ws, inner: int = 2) -> float:
    best = []
    for _ in range(inner):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(xs, ws))
        best.append(time.perf_counter() - t0)
    return float(np.median(best))


def weights_for(system, kns, rng, max_copies=16, min_bytes=64 << 20):
    """Distinct weight copies of the shapes `kns` (one list entry per matmul of the chain)."""
    base = [make_weight(system, jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)))
            for k, n in kns]
    one = sum(nbytes(w) for w in base)
    copies = int(min(max_copies, max(1, -(-min_bytes // one))))
    ws = list(base)
    for c in range(1, copies):  # new arrays (copies of the values: timing does not depend on them)
        ws += [jax.tree_util.tree_map(lambda a: a + jnp.zeros_like(a), w) for w in base]
    jax.block_until_ready(ws)
    return ws, one, copies


def bench_case(kns, ms, reps, rng, systems=SYSTEMS):
    """Per-system, per-M median seconds per chain element (a chain = len(kns) matmuls x copies)."""
    ws, one, copies = {}, {}, {}
    for s in systems:
        ws[s], one[s], copies[s] = weights_for(s, kns, rng)
    out = {s: {} for s in (*systems, READ)}
    ks = [k for k, _ in kns]
    for m in ms:
        xs = {k: jnp.asarray(rng.standard_normal((m, k), dtype=np.float32)) for k in set(ks)}
        fns = {s: chain_fn(s, ks * copies[s]) for s in systems}
        for s in systems:
            jax.block_until_ready(fns[s](xs, ws[s]))  # compile + warm
        times = {s: [] for s in (*systems, READ)}
        rotation = (*systems, READ)
        for r in range(reps):
            order = rotation[r % len(rotation):] + rotation[:r % len(rotation)]
            for s in order:
                if s == READ:
                    times[s].append(READ_BYTES / read_bandwidth(READ_BYTES))
                else:
                    times[s].append(time_chain(fns[s], xs, ws[s]) / copies[s])
        for s in systems:
            t = float(np.median(times[s]))
            out[s][m] = {"s": t, "bytes": one[s], "gbs": one[s] / t / 1e9, "copies": copies[s],
                         "working_set_bytes": one[s] * copies[s], "in_l3": one[s] * copies[s] < L3_BYTES,
                         "repeats_s": times[s]}
        t = float(np.median(times[READ]))
        out[READ][m] = {"s": t, "bytes": READ_BYTES, "gbs": READ_BYTES / t / 1e9, "repeats_s": times[READ]}
        print(f"  M={m:3d} " + "  ".join(f"{s} {out[s][m]['gbs']:6.2f} GB/s" for s in (*systems, READ)), flush=True)
    return out


def cpu_model() -> dict:
    info = {"model": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split()
        info["simd_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx")))
    except OSError:
        pass
    return info


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in res["cases"]]
    cols = 4
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, case in zip(axes.flat, cases):
        data = res["cases"][case]
        bw = float(np.median([v["gbs"] for v in data[READ].values()]))
        for s in SYSTEMS:
            ms = sorted(int(m) for m in data[s])
            ax.plot(ms, [data[s][m]["gbs"] for m in ms], marker="o", ms=3, label=s)
        ax.axhline(bw, color="k", ls="--", lw=0.8, label="read bandwidth (same repeats)")
        ax.axhline(0.7 * bw, color="k", ls=":", lw=0.8, label="70% of it")
        ax.set_xscale("log", base=2)
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("weight GB/s")
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"native CPU matmuls vs XLA f32 ({res['cpu']['model']}, load {res['loadavg_start'][0]:.2f})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(res: dict) -> None:
    """M = 1 speed-ups and the issue-12 targets (Qwen2.5-1.5B MLP shapes), from what was measured so far."""

    # Targets (issue 12): at M = 1 on Qwen2.5-1.5B's MLP shapes.
    summary = {}
    for case, data in res["cases"].items():
        if 1 not in data["xla_f32"]:
            continue
        base = data["xla_f32"][1]["s"]
        bw = data[READ][1]["gbs"]  # measured between the systems' repeats, not once at the start
        summary[case] = {s: {"speedup_vs_xla_f32": base / data[s][1]["s"], "gbs": data[s][1]["gbs"],
                             "fraction_of_read_bw": data[s][1]["gbs"] / bw}
                         for s in SYSTEMS}
        summary[case][READ] = {"gbs": bw}
    res["m1_summary"] = summary
    targets = {}
    for case in summary:
        if case.startswith("qwen2.5-1.5b") and ("gate/up" in case or "down" in case):
            s = summary[case]
            targets[case] = {f"{lay}_{q}_{what}": s[f"{lay}_{q}"][key] for lay in ("native", "panel")
                             for q in ("int8", "int4") for what, key in (("speedup", "speedup_vs_xla_f32"),
                                                                         ("fraction_bw", "fraction_of_read_bw"))}
            targets[case].update(int8_target=3.0, int4_target=4.5, fraction_target=0.7)
    res["targets_m1_qwen_mlp"] = targets


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 shapes, M in {1, 16}, 2 repeats; no files")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS), help="rows of x (M) to time")
    ap.add_argument("--out", default="bench_native_cpu", help="file stem under experiments/results/")
    ap.add_argument("--model-step", action="store_true",
                    help="also time SmolLM2's whole step (210 matmuls in one jit: slow to compile on CPU)")
    args = ap.parse_args(argv)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.why_unavailable()}")
    rng = np.random.default_rng(0)
    res = {"machine": machine(), "cpu": cpu_model(), "native": native.info(), "loadavg_start": os.getloadavg(),
           "env": {k: v for k, v in os.environ.items() if k.startswith(("ER_JAX_NATIVE", "XLA_FLAGS"))},
           "numpy": np.__version__, "reps": args.reps, "cases": {}}
    reps = 2 if args.quick else args.reps
    ms = (1, 16) if args.quick else tuple(args.ms)
    t0 = time.time()
    res["read_bandwidth_gbs"] = read_bandwidth(1 << 29 if args.quick else 1 << 30) / 1e9
    print(f"read bandwidth at the start (jax sum over 1 GiB): {res['read_bandwidth_gbs']:.2f} GB/s; load {os.getloadavg()}",
          flush=True)
    for model in args.models:
        for name, (k, n) in shapes(model).items():
            if args.quick and name not in ("gate/up", "down"):
                continue
            if args.quick and model == "smollm2":
                continue
            case = f"{model} {name} {k}x{n}"
            print(case, flush=True)
            res["cases"][case] = bench_case([(k, n)], ms, reps, rng)
            if not args.quick:  # written after every case: a long run stopped early keeps what it measured
                summarize(res)
                write_json(args.out + ".json", {**res, "partial": True, "loadavg_now": os.getloadavg(),
                                                     "wall_s": time.time() - t0})
    if args.model_step and not args.quick and "smollm2" in args.models:  # SmolLM2's whole decode step: 7 projections x 30 layers, one chain (no copies)
        c = MODELS["smollm2"]
        d, q, kv, f = c["hidden"], c["q"], c["kv"], c["mlp"]
        layer = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
        case = "smollm2 model step (7 x 30 projections)"
        print(case, flush=True)
        res["cases"][case] = bench_case(layer * c["layers"], (1, 16), reps, rng)
    res["loadavg_end"] = os.getloadavg()
    res["wall_s"] = time.time() - t0
    summarize(res)
    targets = res["targets_m1_qwen_mlp"]
    for case, t in targets.items():
        for lay in ("native", "panel"):
            print(f"{case} {lay}: int8 x{t[lay + '_int8_speedup']:.2f} (>= 3), int4 x{t[lay + '_int4_speedup']:.2f} "
                  f"(>= 4.5) of XLA f32; {100 * t[lay + '_int8_fraction_bw']:.0f}% / "
                  f"{100 * t[lay + '_int4_fraction_bw']:.0f}% of read bandwidth (>= 70%)")
    print(f"load average start {res['loadavg_start']} end {res['loadavg_end']}; {res['wall_s']:.0f} s")
    if not args.quick:
        path = write_json(args.out + ".json", res)
        plot(res, os.path.join(RESULTS, args.out + ".png"))
        print("wrote", path)


if __name__ == "__main__":
    main()
