"""Shared bits of the benchmark scripts: machine description, result writing, a copy-bandwidth probe."""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from er_jax import xla_cache  # noqa: F401  (re-exported: the scripts' persistent compilation cache)
from er_jax.bench import machine, machine_tag  # noqa: F401  (one definition, re-exported here)

# Result files: experiments/results, or $ER_JAX_RESULTS (scripts/gpu_bench.sh points it at its output folder).
RESULTS = os.environ.get("ER_JAX_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=float)
    return path


def timeit(fn, *, warmup: int = 2, reps: int = 5) -> float:
    """Median seconds of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s (read + write counted), from timing `x * 1.0001` on a large array
    (1 GiB: well past a CPU's last-level cache). The input is donated, so the copy reuses its buffer: a fresh
    output would measure page faults on CPU, not memory traffic."""
    state = [jnp.ones((nbytes // 4,), jnp.float32)]
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)

    def step():
        state[0] = f(state[0]).block_until_ready()

    return 2 * nbytes / timeit(step, reps=7)


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device read bandwidth in bytes/s, from timing a sum over a large array (what a weight-streaming
    decode step does)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    return nbytes / timeit(lambda: f(x).block_until_ready(), reps=7)


def old_build(library: str) -> dict:
    """Two native builds in one process (the A/B scripts under results/): registers another build's shared
    library's handlers as old_<target> and returns a flag; a jit traced while flag["old"] is set calls them.
    The builds then alternate in one process, so the machine's drift hits both alike."""
    import ctypes

    from er_jax.kernels import native

    native._load()
    old = ctypes.CDLL(library)
    for name in native._TARGETS:
        jax.ffi.register_ffi_target("old_" + name, jax.ffi.pycapsule(getattr(old, name)), platform="cpu")
    flag = {"old": False}
    ffi_call = jax.ffi.ffi_call
    jax.ffi.ffi_call = lambda target, *a, **k: ffi_call(
        "old_" + target if flag["old"] and target.startswith("er_jax_native") else target, *a, **k)
    return flag


def decode_inputs(config, batch: int, context: int, slack: int = 32):
    """What the step-timing scripts feed one decode / draft step at `batch` rows with `context` cached tokens:
    (cache, keys, last, state, fresh). The cache holds random K/V in `context + slack` slots; state(c) is a fresh
    AR-step `DecodeState` around cache c (the AR step donates all of it); fresh() is an untimed copy of the
    cache (a step that donates its cache needs a new one per call)."""
    from er_jax import engine
    from er_jax.cache import KVCache, init_cache

    key = jax.random.key(batch)
    c0 = init_cache(config, batch, context + slack)
    cache = KVCache(jax.random.normal(key, c0.k.shape, c0.k.dtype) * 0.1,
                    jax.random.normal(key, c0.v.shape, c0.v.dtype) * 0.1, jnp.full((batch,), context, jnp.int32))
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(batch))
    last = jnp.ones(batch, jnp.int32)
    b = batch

    def state(c):
        return engine.DecodeState(cache=c, last=jnp.ones(b, jnp.int32), n_gen=jnp.ones(b, jnp.int32),
                                  done=jnp.zeros(b, bool), row=jnp.arange(b, dtype=jnp.int32), keys=keys.copy(),
                                  max_new=jnp.full(b, 10**6, jnp.int32), min_new=jnp.zeros(b, jnp.int32),
                                  out_tokens=jnp.zeros((b + 1, 64), jnp.int32),
                                  out_logps=jnp.zeros((b + 1, 64), jnp.float32), out_len=jnp.zeros(b + 1, jnp.int32))

    def fresh():
        return jax.block_until_ready(KVCache(cache.k.copy(), cache.v.copy(), cache.lengths.copy()))

    return cache, keys, last, state, fresh
