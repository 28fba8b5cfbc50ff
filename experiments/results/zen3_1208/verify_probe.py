"""Probe (2026-12-08, Zen 3 AVX2 VM): what a verify step costs at batch 1 against an AR step, and its parts.

One process, SmolLM2 f32, native backend, context 300, systems alternating over 11 repeats (medians / fastest):
`ar` (engine.ar_step), `verify<γ>` (speculative.verify: target forward over γ + 1 positions + rejection
sampling), `fwd<P>` (the target forward alone over P positions) and `rej<γ>` (the rejection_sample op alone).
The cache is donated as in the engine; each call gets a fresh copy made untimed. Printed only.

    python verify_probe.py [BATCH]
"""
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from common import decode_inputs, xla_cache  # noqa: E402

xla_cache.enable()
import er_jax  # noqa: E402
from er_jax import engine as E  # noqa: E402
from er_jax.config import SamplingConfig  # noqa: E402
from er_jax.execution import Execution  # noqa: E402
from er_jax.model import execution_layout, forward  # noqa: E402
from er_jax.speculative import verify  # noqa: E402

B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
m = er_jax.load_model("smollm2")
cfg, sc = m.config, SamplingConfig(1.0)
ex = Execution("native", None, "unstacked")
w = execution_layout(m.weights, ex)
_, keys, last, state, fresh = decode_inputs(cfg, B, 300)
ar = jax.jit(functools.partial(E.ar_step, E.StepSpec(cfg, sc, cfg.eos_ids, ex)), donate_argnums=1)
fns = {"ar": (state, lambda s: ar(w, s)[0].last)}
for g in (3, 5, 7):
    toks, dl = jnp.ones((B, g), jnp.int32), jax.random.normal(jax.random.key(1), (B, g, cfg.vocab_size))
    vj = jax.jit(lambda c, t, d: verify(cfg, w, c, last, t, d, sc, keys, ex)[1:3], donate_argnums=0)
    fns[f"verify{g}"] = (lambda c: c, lambda c, vj=vj, t=toks, d=dl: vj(c, t, d))
    fj = jax.jit(lambda c, s: forward(cfg, w, s, c, ex=ex)[0], donate_argnums=0)
    fns[f"fwd{g + 1}"] = (lambda c: c, lambda c, fj=fj, s=jnp.ones((B, g + 1), jnp.int32): fj(c, s))
    tl = jax.random.normal(jax.random.key(2), (B, g + 1, cfg.vocab_size))
    rj = jax.jit(lambda tl, d, t: ex.op("rejection_sample")(tl, d, t, sc, keys, ex=ex)[0])
    fns[f"rej{g}"] = (lambda c: c, lambda c, rj=rj, tl=tl, d=dl, t=toks: rj(tl, d, t))
fj1 = jax.jit(lambda c, s: forward(cfg, w, s, c, ex=ex)[0], donate_argnums=0)
fns["fwd1"] = (lambda c: c, lambda c: fj1(c, jnp.ones((B, 1), jnp.int32)))
for prep, f in fns.values():
    jax.block_until_ready(f(prep(fresh())))
    jax.block_until_ready(f(prep(fresh())))
times = {k: [] for k in fns}
for rep in range(11):
    for k in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
        prep, f = fns[k]
        arg = jax.block_until_ready(prep(fresh()))
        t0 = time.perf_counter()
        jax.block_until_ready(f(arg))
        times[k].append(time.perf_counter() - t0)
print("B", B, "load", os.getloadavg()[0])
for k, ts in times.items():
    print(f"{k:10s} median {1e3 * np.median(ts):7.2f} ms  fastest {1e3 * min(ts):7.2f}")
