"""The drafter's 120 projection matmuls at M rows on two native builds in one process (common.old_build): SmolLM2's
real weights in panels (int4: 62 MB, so from DRAM), per layer wqkv, wo, w_gate_up, w_down chained (a slice or a
tanh between calls), the builds alternating every repeat.

    python int4_projection_chain_ab.py OLD_LIB [--scheme int4|int8|f32] [--m 1] [--reps 25]

Prints medians and fastest (ms, GB/s of the weights) and new / old ratios, and the largest difference of the
outputs (a chain of 30 layers through tanh: a changed summation order shows as O(1)).
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from common import old_build  # noqa: E402

import er_jax  # noqa: E402
from er_jax.execution import Execution  # noqa: E402
from er_jax.kernels import native  # noqa: E402
from er_jax.model import drafter_layout, execution_layout  # noqa: E402

NAMES = ("wqkv", "wo", "w_gate_up", "w_down")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old_lib")
    ap.add_argument("--scheme", default="int4", choices=("int4", "int8", "f32"))
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--reps", type=int, default=25)
    args = ap.parse_args()
    m = er_jax.load_model("smollm2", dtype="float32")
    ex = Execution("native", None, "unstacked")
    w = (execution_layout(m.weights, ex) if args.scheme == "f32"
         else drafter_layout(m.weights, ex, args.scheme, head="int8"))
    layers = w["layers"]
    nbytes = sum(a.nbytes for lw in layers for n in NAMES for a in jax.tree_util.tree_leaves(lw[n]))
    flag = old_build(args.old_lib)

    def make():
        def f(x, layers):
            for lw in layers:
                h = native.matmul(x, lw["wqkv"])[..., :576]
                h = jnp.tanh(native.matmul(h, lw["wo"]) + x)
                g = native.matmul(h, lw["w_gate_up"])[..., :1536]
                x = jnp.tanh(native.matmul(g, lw["w_down"]) + h)
            return x
        return jax.jit(lambda x, layers: f(x, layers))  # a fresh function per build: jit caches by function

    fns = {"new": make(), "old": make()}
    x = jax.random.normal(jax.random.key(0), (args.m, 1, 576), jnp.float32)
    outs = {}
    for k, f in fns.items():
        flag["old"] = k == "old"
        outs[k] = np.asarray(f(x, layers))
    print("max |new - old|:", float(np.abs(outs["new"] - outs["old"]).max()))
    t = {k: [] for k in fns}
    for r in range(args.reps):
        for k in (("new", "old") if r % 2 == 0 else ("old", "new")):
            flag["old"] = k == "old"
            t0 = time.perf_counter()
            jax.block_until_ready(fns[k](x, layers))
            t[k].append(time.perf_counter() - t0)
    for k, v in t.items():
        print(f"{args.scheme} M={args.m} {k}: median {1e3 * np.median(v):.3f} ms ({nbytes / np.median(v) / 1e9:.1f} GB/s), "
              f"fastest {1e3 * min(v):.3f} ms ({nbytes / min(v) / 1e9:.1f} GB/s)")
    print(f"new / old medians {np.median(t['new']) / np.median(t['old']):.3f}, fastest {min(t['new']) / min(t['old']):.3f}; "
          f"load {os.getloadavg()[0]:.2f}; {nbytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
