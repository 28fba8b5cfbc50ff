"""Probe (2026-12-08, Zen 3 AVX2 VM): the native f32 panel matmuls of a SmolLM2 forward at M = 1..8 rows (what
an AR step, and a verify over M - 1 drafts at batch 1, multiply), without anything else in the step.

30 distinct copies of SmolLM2's four fused matrices ([576, 960] q/k/v, [576, 576] o, [576, 3072] gate/up,
[1536, 576] down; 425 MB, streamed from DRAM) chained in one jit, and the [576, 49152] head alone; M values
alternating over 9 repeats, medians. Threads: the process default (ER_JAX_NATIVE_THREADS=1 under taskset -c 0
for one). Printed only.

    python matmul_chain_m.py [M ...]
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from er_jax.kernels import native
from er_jax.panels import pack

rng = np.random.default_rng(0)
SHAPES, LAYERS = [(576, 960), (576, 576), (576, 3072), (1536, 576)], 30
ws = [pack(jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k))) for _ in range(LAYERS) for k, n in SHAPES]
head = pack(jnp.asarray(rng.standard_normal((576, 49152), np.float32) / 24))
nbytes = sum(w.nbytes for w in ws)


def chain(x, ws):
    acc = jnp.float32(0)
    for i, w in enumerate(ws):
        acc = acc + native.matmul(x[:, :SHAPES[i % 4][0]] * (1 + acc * 1e-9), w)[0, 0]
    return acc


body, lm_head = jax.jit(chain), jax.jit(lambda x, h: native.matmul(x[:, :576], h)[0, 0])
ms = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 6, 8]
xs = {m: jnp.asarray(rng.standard_normal((m, 1536), np.float32)) for m in ms}
for m in ms:
    jax.block_until_ready(body(xs[m], ws))
    jax.block_until_ready(lm_head(xs[m], head))
tb, th = {m: [] for m in ms}, {m: [] for m in ms}
for rep in range(9):
    for m in (ms if rep % 2 == 0 else ms[::-1]):
        for f, arg, ts in ((body, ws, tb), (lm_head, head, th)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(xs[m], arg))
            ts[m].append(time.perf_counter() - t0)
flops = 2 * sum(k * n for k, n in SHAPES) * LAYERS
print("load", os.getloadavg()[0], "body MB", nbytes / 1e6, native.info().get("isa"))
for m in ms:
    t, h = np.median(tb[m]), np.median(th[m])
    print(f"M={m}: body {1e3 * t:6.2f} ms (fastest {1e3 * min(tb[m]):6.2f}) {nbytes / t / 1e9:5.1f} GB/s "
          f"{m * flops / t / 1e9:6.1f} GFLOP/s | head {1e3 * h:6.2f} ms {m * 2 * 576 * 49152 / h / 1e9:6.1f} GFLOP/s")
