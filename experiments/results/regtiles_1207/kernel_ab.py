"""One panel matrix (quantized, or f32 / bf16 for reference), kept in the caches, on two native builds in one process (common.old_build): the
register-tile vdpbf16ps kernels of this commit against the previous paths, at M rows.

    python kernel_ab.py OLD_LIB --scheme int8 --ms 1 3 6 11 16 64 [--shape 576 3072] [--out NAME.json]

Each system runs --chain calls in one jit (each call's x scaled by the previous result, so they run one after
another); the builds alternate within each repeat; time per call: fastest of --reps. Run with
ER_JAX_NATIVE_THREADS=1 under `taskset -c 0` for one thread's rate.
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
from er_jax.panels import pack  # noqa: E402
from er_jax.quant import quantize_int4, quantize_int8  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old_lib")
    ap.add_argument("--scheme", default="int8", choices=("int8", "int4", "f32", "bf16"))
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 11, 12, 16, 24, 32, 64])
    ap.add_argument("--shape", type=int, nargs=2, default=[576, 3072])
    ap.add_argument("--chain", type=int, default=40)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="file name under experiments/results/ (none: print only)")
    args = ap.parse_args()
    flag = old_build(args.old_lib)
    k, n = args.shape
    rng = np.random.default_rng(0)
    quantize = {"int8": quantize_int8, "int4": quantize_int4, "f32": lambda w: w,
                "bf16": lambda w: w.astype(jnp.bfloat16)}[args.scheme]
    w = pack(quantize(jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)))
    res = {"machine": machine(), "native": native.info(), "loadavg_start": os.getloadavg(), "args": vars(args),
           "env": {e: v for e, v in os.environ.items() if e.startswith("ER_JAX_NATIVE")},
           "affinity": sorted(os.sched_getaffinity(0)), "cases": []}

    def chain(x, w):
        acc = jnp.float32(0)
        for _ in range(args.chain):
            acc = acc + native.matmul(x * (1 + acc * 1e-9), w)[0, 0]
        return acc

    for m in args.ms:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        fs = {}
        for build in ("new", "old"):
            flag["old"] = build == "old"
            fs[build] = jax.jit(lambda x, w: chain(x, w))  # a new function each time: its own trace
            jax.block_until_ready(fs[build](x, w))
        ts = {b: [] for b in fs}
        for r in range(args.reps):
            for b in (("new", "old") if r % 2 else ("old", "new")):
                t = time.perf_counter()
                jax.block_until_ready(fs[b](x, w))
                ts[b].append((time.perf_counter() - t) / args.chain)
        us = {b: min(t) * 1e6 for b, t in ts.items()}
        gf = {b: 2 * m * k * n / (us[b] * 1e3) for b in us}
        res["cases"].append({"m": m, "new_us": us["new"], "old_us": us["old"], "new_gflops": gf["new"],
                             "old_gflops": gf["old"], "new_over_old": us["new"] / us["old"]})
        print(f"{args.scheme} [{k}, {n}] M={m}: new {us['new']:.1f} us ({gf['new']:.0f} GFLOP/s), "
              f"old {us['old']:.1f} us ({gf['old']:.0f}), new/old {us['new'] / us['old']:.3f}", flush=True)
    res["loadavg_end"] = os.getloadavg()
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
