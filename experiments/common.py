"""Shared bits of the benchmark scripts: machine description, result writing, a copy-bandwidth probe."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    dev = jax.devices()[0]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    return {"platform": jax.default_backend(), "device": dev.device_kind, "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
            "commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def machine_tag() -> str:
    return "cpu" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind.lower().replace(" ", "-")


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
