"""What one native int8 M = 1 panel matmul costs at threads = 1 and 2: 120 calls on one (cache-resident) matrix
chained in one jit, SmolLM2's drafter shapes and a 64 x 64 one (the fixed cost). Prints us per call, fastest and
median of 15 repeats. Run with ER_JAX_NATIVE_POOL=own for the extension's own pool instead of XLA's.

    python per_call_threads.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from er_jax.kernels import native
from er_jax.panels import pack
from er_jax.quant import quantize_int8

CALLS, REPS = 120, 15


def main():
    rng = np.random.default_rng(0)
    for k, n in [(64, 64), (576, 576), (576, 960), (576, 3072), (1536, 576)]:
        w = pack(quantize_int8(jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k))))
        x = jnp.asarray(rng.standard_normal((1, k), np.float32))
        out = []
        for threads in (1, 2):
            def chain(x, w, threads=threads):
                acc = jnp.float32(0)
                for _ in range(CALLS):
                    acc = acc + native.matmul(x * (1 + acc * 1e-9), w, threads=threads)[0, 0]
                return acc

            f = jax.jit(chain)
            jax.block_until_ready(f(x, w))
            ts = []
            for _ in range(REPS):
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, w))
                ts.append((time.perf_counter() - t0) / CALLS)
            out.append(f"threads={threads}: {min(ts) * 1e6:6.1f} us fastest, {np.median(ts) * 1e6:6.1f} median")
        print(f"{k}x{n} ({w.nbytes / 1e3:.0f} KB):", "; ".join(out), flush=True)


if __name__ == "__main__":
    main()
