"""Wall time of re-deriving the self-drafter, `er_jax.derive_drafter(weights, scheme)`, on this machine.

    python experiments/derive_time.py [--reps 5] [--models smollm2 qwen2.5-1.5b]

The drafter is re-derived after every policy update, so its cost is paid once per RL step (the paper
measured 1.3-2.6 s per step on an A100 for 7B-14B models). For each model and scheme ("int4": group-128
asymmetric min-max with zero points, "int8": per-channel symmetric) we time, with `block_until_ready`,
the first call (it includes tracing + XLA compilation of the jitted quantizer) and the median of the
later calls (compiled). Models:
- smollm2: SmolLM2-135M-Instruct, its real weights (GGUF dequantized to f32);
- qwen2.5-1.5b: the Qwen2.5-1.5B shape (er_jax.config.SHAPE_PRESETS) with random weights
  (er_jax.model.init_weights) in bfloat16, to fit the memory of a small machine (timing does not depend
  on the values).
Writes experiments/results/derive_time_<machine>.json and prints a table. Peak process RSS is recorded
after each model (the quantizer works in f32 internally, so it needs several times the bf16 weight bytes).
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, machine_tag, write_json  # noqa: E402

PAPER_REFERENCE = {"seconds_per_step": [1.3, 2.6], "models": "7B-14B (Qwen2.5-7B/14B, Llama-3.1-8B)",
                   "hardware": "A100-80GB", "scheme": "int4 (W4A16, group 128)"}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def mem_available_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def time_scheme(weights, scheme: str, reps: int) -> dict:
    import jax
    from er_jax import derive_drafter
    from er_jax.quant import projection_bytes

    t0 = time.perf_counter()
    d = jax.block_until_ready(derive_drafter(weights, scheme))
    first = time.perf_counter() - t0
    out_bytes = projection_bytes(d)
    del d
    later = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        d = jax.block_until_ready(derive_drafter(weights, scheme))
        later.append(time.perf_counter() - t0)
        del d
    med = statistics.median(later)
    in_bytes = projection_bytes(weights)
    return {"scheme": scheme, "first_call_s": first, "median_s": med, "min_s": min(later), "max_s": max(later),
            "later_calls_s": later, "reps": reps, "compile_overhead_s": first - med,
            "projection_bytes_in": in_bytes, "projection_bytes_out": out_bytes,
            "read_GBps": in_bytes / med / 1e9}


def compiled_memory(weights, scheme: str) -> dict | None:
    """XLA's memory analysis of the compiled quantizer (argument / output / temporary bytes)."""
    try:
        import jax
        from er_jax.quant import PROJECTIONS, _quantize_projections

        layers = {n: jax.ShapeDtypeStruct(weights["layers"][n].shape, weights["layers"][n].dtype) for n in PROJECTIONS}
        ma = _quantize_projections.lower(layers, scheme, 128).compile().memory_analysis()
        return {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                  "temp_size_in_bytes")}
    except Exception as e:  # private API; the report stays useful without it
        return {"error": f"{type(e).__name__}: {e}"}


def load(name: str):
    import jax
    import er_jax
    from er_jax.config import SHAPE_PRESETS
    from er_jax.model import init_weights

    if name == "smollm2":
        m = er_jax.load_model("smollm2")
        return m.config, m.weights, "SmolLM2-135M-Instruct, real weights (GGUF dequantized to float32)"
    cfg = SHAPE_PRESETS[name].replace(dtype="bfloat16")
    w = jax.block_until_ready(init_weights(cfg, jax.random.key(0)))
    return cfg, w, f"{name} shape, random weights (init_weights, seed 0), bfloat16"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "qwen2.5-1.5b"])
    ap.add_argument("--schemes", nargs="+", default=["int4", "int8"])
    ap.add_argument("--reps", type=int, default=5, help="timed calls after the first (median reported)")
    args = ap.parse_args()

    import jax
    from er_jax.quant import PROJECTIONS

    t_start = time.perf_counter()
    rows = []
    for name in args.models:
        avail = mem_available_gib()
        cfg, w, desc = load(name)
        n_params = sum(int(a.size) for a in jax.tree_util.tree_leaves(w))
        n_proj = sum(int(w["layers"][p].size) for p in PROJECTIONS)
        w_bytes = sum(int(a.size * a.dtype.itemsize) for a in jax.tree_util.tree_leaves(w))
        for scheme in args.schemes:
            r = time_scheme(w, scheme, args.reps)
            r["compiled_memory"] = compiled_memory(w, scheme)
            r.update(model=name, description=desc, dtype=cfg.dtype, params=n_params, projection_params=n_proj,
                     weight_bytes=w_bytes, mem_available_before_GiB=avail, peak_rss_GiB_so_far=peak_rss_gib())
            rows.append(r)
            print(f"{name:14s} {cfg.dtype:9s} {scheme}: first call {r['first_call_s']:7.2f} s   median "
                  f"{r['median_s']:7.3f} s  (min {r['min_s']:.3f}, max {r['max_s']:.3f}; {r['read_GBps']:.2f} GB/s "
                  f"of projections read)   peak RSS {r['peak_rss_GiB_so_far']:.1f} GiB   XLA temp "
                  f"{r['compiled_memory'].get('temp_size_in_bytes', float('nan')) / 2**30:.2f} GiB", flush=True)
        del w
        gc.collect()

    print("\n| model | dtype | params | scheme | first call (incl. compile) s | median later s | XLA temp GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['params'] / 1e9:.3f} B | {r['scheme']} | "
              f"{r['first_call_s']:.2f} | {r['median_s']:.3f} | "
              f"{r['compiled_memory'].get('temp_size_in_bytes', float('nan')) / 2**30:.2f} |")
    payload = {
        "benchmark": "derive_time",
        "what": "wall time of er_jax.derive_drafter(weights, scheme) with block_until_ready: the first call "
                "(trace + compile + run) and the median of the later (compiled) calls",
        "machine": machine(), "load_average_at_end": os.getloadavg(), "rows": rows, "paper_reference": PAPER_REFERENCE,
        "notes": ["CPU run on a machine shared with other jobs: times include contention.",
                  "qwen2.5-1.5b uses random bf16 weights of the real shape (values do not change the work).",
                  "peak_rss_GiB_so_far is the process's peak resident memory up to that row.",
                  "compiled_memory: XLA's memory analysis of the jitted quantizer of the seven projections "
                  "(temp_size_in_bytes = scratch the derivation needs on top of its input and output)."],
        "total_wall_s": time.perf_counter() - t_start,
    }
    print("wrote", write_json(f"derive_time_{machine_tag()}.json", payload))


if __name__ == "__main__":
    main()
