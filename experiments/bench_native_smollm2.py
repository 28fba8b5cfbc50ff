"""The native attention and f32 matmul kernels at SmolLM2-135M's decode shapes (docs/cpu_profile.md, "Late evening").

- attention: 30 layers of `native.attention` over a stacked f32 / bf16 cache with --context cached positions,
  batch 1 / 16 / 64 at T = 1 and a batch-1 verify of 8 positions, in one jit (each layer's output feeding
  the next layer's query); fastest and median of --reps, GB/s of the cache bytes read.
- dense: a chain of 30 distinct f32 weight matrices per shape (q/o [576, 576], gate/up [576, 1536], down
  [1536, 576]; the tied head [576, 49152] once), each call's input depending on the sum of the previous
  output, native vs XLA's dot alternating, M = 1 / 8 / 16 / 32 / 64; fastest per call.

    python experiments/bench_native_smollm2.py [--reps 9] [--context 300] [--out bench_native_smollm2_cpu.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402

L, KV, G, HD = 30, 3, 3, 64  # SmolLM2-135M
DENSE = [(576, 576), (576, 1536), (1536, 576), (576, 49152)]


def _times(f, args, reps):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return min(ts), float(np.median(ts))


def attention_rows(native, context, reps):
    rng = np.random.default_rng(0)
    rows = []
    for b, t, dt in [(1, 1, "float32"), (1, 8, "float32"), (16, 1, "float32"), (64, 1, "float32"),
                     (64, 1, "bfloat16")]:
        s = context + 8
        k, v = (jnp.asarray(rng.standard_normal((L, b, s, KV, HD), np.float32)).astype(dt) for _ in range(2))
        q = jnp.asarray(rng.standard_normal((b, t, KV * G, HD), np.float32)).astype(dt)
        pos = jnp.asarray(np.full((b, t), context - 1, np.int32) + np.arange(t)[None])

        @jax.jit
        def f(q, k, v, pos):
            out = q
            for i in range(L):
                out = out + native.attention(out, k, v, pos, layer=i)
            return out

        fast, med = _times(f, (q, k, v, pos), reps)
        nbytes = L * b * context * KV * HD * 2 * jnp.dtype(dt).itemsize
        rows.append(dict(batch=b, positions=t, dtype=dt, fastest_ms=1e3 * fast, median_ms=1e3 * med,
                         cache_gb_per_s=nbytes / fast / 1e9))
        print(f"attention B={b:2d} T={t} {dt:8s}: fastest {1e3 * fast:7.2f} ms, median {1e3 * med:7.2f} ms "
              f"({nbytes / fast / 1e9:.1f} GB/s)", flush=True)
    return rows


def dense_rows(native, reps):
    rng = np.random.default_rng(1)
    # isa= forces the kernel at every M (the default routing sends some shapes to XLA)
    impls = {"native": lambda x, w: native.matmul(x, w, isa=native.isa()), "xla": jnp.dot}
    rows = []
    for k, n in DENSE:
        ws = [jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02) for _ in range(1 if n > 10_000 else L)]
        for m in (1, 8, 16, 32, 64):
            x = jnp.asarray(rng.standard_normal((m, k), np.float32))
            fns = {}
            for name, mm in impls.items():
                def chain(x, ws, mm=mm):
                    acc = jnp.float32(0)
                    for w in ws:
                        acc = acc + mm(x, w).sum()  # all of the product (a slice would let XLA skip columns)
                        x = x + acc * 1e-9  # each call waits for the previous one
                    return acc
                fns[name] = jax.jit(chain)
            best = {name: float("inf") for name in impls}
            for r in range(3):  # alternate the systems
                for name in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
                    best[name] = min(best[name], _times(fns[name], (x, ws), reps)[0] / len(ws))
            for name, t in best.items():
                rows.append(dict(m=m, k=k, n=n, system=name, us=1e6 * t, gflop_per_s=2 * m * k * n / t / 1e9,
                                 weight_gb_per_s=4 * k * n / t / 1e9))
            print(f"dense M={m:2d} [{k}, {n}]: native {1e6 * best['native']:8.0f} us, xla {1e6 * best['xla']:8.0f} us",
                  flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--out", default="bench_native_smollm2_cpu.json")
    ap.add_argument("--skip-attention", action="store_true")
    args = ap.parse_args()
    from er_jax.kernels import native
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.why_unavailable()}")
    res = {"benchmark": "bench_native_smollm2", "machine": machine(), "args": vars(args), "isa": native.isa(),
           "load_before": os.getloadavg()}
    res["attention"] = [] if args.skip_attention else attention_rows(native, args.context, args.reps)
    res["dense_f32"] = dense_rows(native, max(3, args.reps // 3))
    res["load_after"] = os.getloadavg()
    write_json(args.out, res)


if __name__ == "__main__":
    main()
