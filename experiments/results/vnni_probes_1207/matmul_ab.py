"""One native matmul of two builds in one process (common.old_build), alternating: int8 / int4 panels [K, N] at
several M, one matrix called 10 times (cache-resident) or NMAT distinct copies once each (streamed from memory).
Medians of 30 of each build.

    python matmul_ab.py OLD.so K N [NMAT] [int8|int4] [M,M,...]
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from common import old_build  # noqa: E402
from er_jax.kernels import native  # noqa: E402
from er_jax.panels import pack  # noqa: E402
from er_jax.quant import quantize_int4, quantize_int8  # noqa: E402

flag = old_build(sys.argv[1])
K, N = int(sys.argv[2]), int(sys.argv[3])
nmat = int(sys.argv[4]) if len(sys.argv) > 4 else 1
quantize = quantize_int4 if len(sys.argv) > 5 and sys.argv[5] == "int4" else quantize_int8
ms = [int(m) for m in sys.argv[6].split(",")] if len(sys.argv) > 6 else [1, 2, 4, 6, 8, 11]
rng = np.random.default_rng(0)
pas = [pack(quantize(jnp.asarray(rng.standard_normal((K, N)), jnp.float32))) for _ in range(nmat)]
calls = [(i, p) for i, p in enumerate(pas) for _ in range(1 if nmat > 1 else 10)]
for m in ms:
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.float32)
    fs = {}
    for v in ("new", "old"):
        flag["old"] = v == "old"  # traced (and its FFI targets named) under the flag
        fs[v] = jax.jit(lambda x, pas: sum(native.matmul(x * (1 + i * 1e-3), pas[i]) for i, _ in calls))
        fs[v](x, pas).block_until_ready()
    ts = {v: [] for v in fs}
    for r in range(30):
        for v in (("new", "old") if r % 2 else ("old", "new")):
            t = time.perf_counter()
            fs[v](x, pas).block_until_ready()
            ts[v].append(time.perf_counter() - t)
    med = {v: np.median(t) * 1e6 for v, t in ts.items()}
    print(f"[{K},{N}] x{nmat} M={m}: new {med['new']:.0f} us, old {med['old']:.0f} us, "
          f"new/old {med['new'] / med['old']:.3f}", flush=True)
