"""The native panel matmuls' instruction rate (int4 / int8, and bf16 / f32 with --schemes): one weight matrix
that stays in the caches, M = 1 / 2.

A streamed benchmark (bench_native.py) on this 2-core VM measures the shared memory system as much as the
kernel (its int4 fraction of read bandwidth moved 57-86% between back-to-back runs of one build). Here one
matrix is multiplied --chain times in one jit (each call's x scaled by the previous result, so the calls run one
after another), so the time is the kernel's own: GB/s of the weight bytes (codes + scales + zeros) per call.
Run with ER_JAX_NATIVE_THREADS=1 under `taskset -c 0` for one thread's rate.

    python experiments/bench_kernel_resident.py [--reps 15] [--chain 40] [--schemes int4 int8 bf16 f32]
        [--out NAME.json]
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

from er_jax.kernels import native  # noqa: E402
from er_jax.panels import pack  # noqa: E402
from er_jax.quant import quantize_int4, quantize_int8  # noqa: E402

SCHEMES = {"int4": quantize_int4, "int8": quantize_int8, "bf16": lambda w: w.astype(jnp.bfloat16),
           "f32": lambda w: w}
SHAPES = [(1536, 1536), (576, 3072), (1536, 8960)]  # int4: 1.2 / 0.9 / 6.9 MB (L2 is 1 MB a core, L3 32 MB)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--chain", type=int, default=40)
    ap.add_argument("--schemes", nargs="+", default=["int4", "int8"], choices=list(SCHEMES))
    ap.add_argument("--out", default=None, help="file name under experiments/results/ (none: print only)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    res = {"machine": machine(), "native": native.info(), "loadavg_start": os.getloadavg(),
           "env": {k: v for k, v in os.environ.items() if k.startswith("ER_JAX_NATIVE")},
           "affinity": sorted(os.sched_getaffinity(0)), "chain": args.chain, "reps": args.reps, "cases": {}}
    for k, n in SHAPES:
        w0 = jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k))
        for scheme in args.schemes:
            w = pack(SCHEMES[scheme](w0))
            nbytes = w.nbytes

            def chain(x, w):
                acc = jnp.float32(0)
                for _ in range(args.chain):
                    acc = acc + native.matmul(x * (1 + acc * 1e-9), w)[0, 0]
                return acc

            f = jax.jit(chain)
            for m in (1, 2):
                x = jnp.asarray(rng.standard_normal((m, k), np.float32))
                jax.block_until_ready(f(x, w))
                ts = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(x, w))
                    ts.append((time.perf_counter() - t0) / args.chain)
                case = f"{scheme} {k}x{n} M={m}"
                res["cases"][case] = {"fastest_us": min(ts) * 1e6, "median_us": float(np.median(ts)) * 1e6,
                                      "bytes": nbytes, "gbs_fastest": nbytes / min(ts) / 1e9}
                print(f"{case:24s} {min(ts) * 1e6:7.1f} us  {nbytes / min(ts) / 1e9:5.1f} GB/s", flush=True)
    res["loadavg_end"] = os.getloadavg()
    if args.out:
        print("wrote", write_json(args.out, res))


if __name__ == "__main__":
    main()
