"""Native attention over a SmolLM2-shaped f32 (or bf16) cache on two builds in one process (common.old_build):
30 layers chained in one jit (each layer's output added into the next query), context 300 of 332 slots, batch
B, T query positions per row; both builds at 2 threads and at threads=1, alternating every repeat.

    python attention_ab.py OLD_LIB [--batches 1 2 4] [--t 1] [--dtype float32] [--reps 50] [--out NAME.json]

Prints and writes (under experiments/results/) per batch: us per layer (median, fastest) and new / old ratios,
and the largest |new - old| of the outputs.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from common import machine, old_build, write_json  # noqa: E402

from er_jax.kernels import native  # noqa: E402

L, S, KV, G, HD, CTX = 30, 332, 3, 3, 64, 300


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old_lib")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--t", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None, help="file name under experiments/results/ (none: print only)")
    args = ap.parse_args()
    dt, T = jnp.dtype(args.dtype), args.t
    flag = old_build(args.old_lib)
    res = {"benchmark": "attention_ab", "machine": machine(), "old_lib": args.old_lib, "dtype": args.dtype, "T": T,
           "shape": {"layers": L, "slots": S, "kv_heads": KV, "group": G, "head_dim": HD, "context": CTX}, "rows": []}
    for B in args.batches:
        k = jax.random.normal(jax.random.key(0), (L, B, S, KV, HD), dt) * 0.3
        v = jax.random.normal(jax.random.key(1), (L, B, S, KV, HD), dt)
        q = jax.random.normal(jax.random.key(2), (B, T, KV * G, HD), dt)
        pos = jnp.full((B, T), CTX, jnp.int32) + jnp.arange(T, dtype=jnp.int32)[None]

        def make(threads):
            def f(q, k, v):
                for layer in range(L):
                    q = q + 0.01 * native.attention(q, k, v, pos, layer=layer, threads=threads).reshape(q.shape)
                return q
            return jax.jit(lambda q, k, v: f(q, k, v))  # a fresh function per build: jit caches by function

        fns = {(b, th): make(th) for b in ("new", "old") for th in (None, 1)}
        outs = {}
        for key, f in fns.items():
            flag["old"] = key[0] == "old"
            outs[key] = np.asarray(f(q, k, v), np.float32)
        diff = float(np.abs(outs[("new", None)] - outs[("old", None)]).max())
        times = {key: [] for key in fns}
        loads = []
        for rep in range(args.reps):
            loads.append(os.getloadavg()[0])
            for key in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
                flag["old"] = key[0] == "old"
                t0 = time.perf_counter()
                jax.block_until_ready(fns[key](q, k, v))
                times[key].append(time.perf_counter() - t0)
        row = {"batch": B, "max_abs_new_minus_old": diff, "load_1min": [min(loads), max(loads)]}
        for th in (None, 1):
            name = f"threads_{th or 2}"
            new, old = times[("new", th)], times[("old", th)]
            row[name] = {"new_us_per_layer": {"median": 1e6 * np.median(new) / L, "fastest": 1e6 * min(new) / L},
                         "old_us_per_layer": {"median": 1e6 * np.median(old) / L, "fastest": 1e6 * min(old) / L},
                         "new_over_old": {"median": float(np.median(new) / np.median(old)),
                                          "fastest": float(min(new) / min(old))}}
            print(f"B={B} T={T} {name}: new {row[name]['new_us_per_layer']['median']:.1f} us/layer, old "
                  f"{row[name]['old_us_per_layer']['median']:.1f} (medians); new / old {row[name]['new_over_old']['median']:.3f} "
                  f"(fastest {row[name]['new_over_old']['fastest']:.3f}); max |new - old| {diff:.2e}", flush=True)
        res["rows"].append(row)
    if args.out:
        print("wrote", write_json(args.out, res))


if __name__ == "__main__":
    main()
