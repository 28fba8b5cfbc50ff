"""Dispatch cost of a jit call by the number of its argument leaves: a function that ignores its weights, called
with none, the f32 target's packed SmolLM2 weights, and the int4 drafter's (int8 head); median of 200 calls.

    python dispatch_overhead.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

import er_jax
from er_jax.execution import Execution
from er_jax.model import drafter_layout, execution_layout


def main():
    m = er_jax.load_model("smollm2", dtype="float32")
    ex = Execution("native", None, "unstacked")
    weights = {"none": None, "target": execution_layout(m.weights, ex),
               "int4 drafter": drafter_layout(m.weights, ex, "int4", head="int8")}
    f = jax.jit(lambda w, x: x + 1)
    x = jnp.ones((4,))
    for name, w in weights.items():
        jax.block_until_ready(f(w, x))
        ts = []
        for _ in range(200):
            t0 = time.perf_counter()
            jax.block_until_ready(f(w, x))
            ts.append(time.perf_counter() - t0)
        print(f"{name} ({len(jax.tree_util.tree_leaves(w))} leaves): median {1e6 * np.median(ts):.0f} us, "
              f"fastest {1e6 * min(ts):.0f} us")


if __name__ == "__main__":
    main()
