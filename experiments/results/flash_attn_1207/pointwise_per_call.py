"""Per-call cost of one op on a [1, 1, 576] row (SmolLM2's hidden size): 100 calls chained in one jit, each
call's output the next one's input; median of 30 repeats per call (docs/cpu_profile.md, "2026-12-07, late night").

    python pointwise_per_call.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from er_jax.kernels import native, pointwise

N = 100


def chain(op):
    def f(x):
        for _ in range(N):
            x = op(x)
        return x
    return jax.jit(f)


def main():
    x = jnp.ones((1, 1, 576), jnp.float32)
    w = jnp.ones((576,), jnp.float32)
    fns = {"native rms_norm": chain(lambda x: native.rms_norm(x, w, eps=1e-5)),
           "native rms_norm, 1 thread": chain(lambda x: native.rms_norm(x, w, eps=1e-5, threads=1)),
           "XLA rms_norm (reference)": chain(lambda x: pointwise.rms_norm_reference(x, w, 1e-5)),
           "XLA fused multiply-add": chain(lambda x: x * 1.0001 + 0.5),
           "native silu_mul (of a concat)": chain(lambda x: native.silu_mul(jnp.concatenate([x, x], -1)))}
    for f in fns.values():
        jax.block_until_ready(f(x))
    times = {k: [] for k in fns}
    for _ in range(30):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"{k}: {1e6 * np.median(v) / N:.2f} us a call")


if __name__ == "__main__":
    main()
