"""Two builds in one process (2026-12-07, late): the previous build's native handlers are loaded from a copy of its
shared library and registered as old_<target>; steps traced while FLAG["old"] is set call them, and their draft step
draws its token as before (`sample` of a log_softmax) instead of from the logits (`sample_logits`). The target's AR
step and the int4 / int8 drafters' steps (int8 head, SmolLM2 in DTYPE, context 300) of both builds alternate in one
process, so the VM's drift hits both alike; every call's argument (a fresh cache; the AR step's whole state) is
built before its timer starts. `int4_newso_oldsampler`: the new build's kernels with the old draw, to tell the two
changes apart. Medians and fastest of `reps`.

    python experiments/results/attn_split_1207/step_ab.py OLD.so 1,2,4 21 out.json [DTYPE]
"""
import functools
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import er_jax  # noqa: E402
from common import decode_inputs, machine, old_build  # noqa: E402
from er_jax import engine as E  # noqa: E402
from er_jax import speculative  # noqa: E402
from er_jax.config import SamplingConfig  # noqa: E402
from er_jax.execution import Execution  # noqa: E402
from er_jax.model import execution_layout, forward  # noqa: E402
from er_jax.quant import derive_drafter  # noqa: E402
from er_jax.sampling import log_probs  # noqa: E402

old_lib, batches, reps, out_path = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]
dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
FLAG = old_build(old_lib)


def old_draft(cfg, d, cache, last, sc, keys, ex):  # the previous build's one-step draft: sample of log_probs
    logits, c = forward(cfg, d, last[:, None], cache, ex=ex)
    nxt = ex.op("sample")(jax.vmap(jax.random.fold_in, (0, None))(keys, 0), log_probs(logits[:, 0], sc), ex=ex,
                          greedy=sc.greedy)
    return c, nxt[:, None]


m = er_jax.load_model("smollm2", dtype=dtype)
cfg, sc = m.config, SamplingConfig(1.0)
ex = Execution("native", None, "unstacked")
spec = E.StepSpec(cfg, sc, cfg.eos_ids, ex)
weights = execution_layout(m.weights, ex)
drafters = {s: execution_layout(derive_drafter(m.weights, s, head="int8"), ex, weights.get("lm_head_p"))
            for s in ("int8", "int4")}


def draft_fn(new_sampler):  # a jitted one-step draft; a separate jit per variant, each traced under its FLAG
    if new_sampler:
        return jax.jit(lambda d, c, last, k: speculative.draft(cfg, d, c, last, sc, k, 1, ex)[:2], donate_argnums=1)
    return jax.jit(lambda d, c, last, k: old_draft(cfg, d, c, last, sc, k, ex), donate_argnums=1)


def ar_fn():
    return jax.jit(functools.partial(E.ar_step, spec), donate_argnums=1)


out = {"benchmark": "step_ab", "machine": machine(), "old_library": old_lib, "dtype": dtype, "context": 300,
       "reps": reps, "rows": {}}
for b in batches:
    _, keys, last, state, fresh = decode_inputs(cfg, b, 300)

    same = lambda c: c  # noqa: E731
    # name -> (uses the old library, build the argument from a fresh cache, the timed call)
    fns = {"target_new": (False, state, functools.partial(ar_fn(), weights)),
           "target_old": (True, state, functools.partial(ar_fn(), weights)),
           "int4_newso_oldsampler": (False, same, functools.partial(draft_fn(False), drafters["int4"]))}
    for s_, d in drafters.items():
        fns[f"{s_}_new"] = (False, same, functools.partial(draft_fn(True), d))
        fns[f"{s_}_old"] = (True, same, functools.partial(draft_fn(False), d))

    times = {k: [] for k in fns}
    for rep in range(reps + 2):
        order = list(fns) if rep % 2 == 0 else list(fns)[::-1]
        for k in order:
            is_old, prep, f = fns[k]
            FLAG["old"] = is_old
            arg = jax.block_until_ready(prep(fresh()))
            t0 = time.perf_counter()
            jax.block_until_ready(f(arg) if k.startswith("target") else f(arg, last, keys))
            if rep >= 2:
                times[k].append(time.perf_counter() - t0)
    FLAG["old"] = False
    med = {k: float(np.median(v)) for k, v in times.items()}
    out["rows"][b] = {k: {"median_ms": 1e3 * med[k], "fastest_ms": 1e3 * min(v)} for k, v in times.items()}
    print(f"B={b}: " + " | ".join(f"{k} {1e3 * med[k]:.2f}" for k in fns), flush=True)
    print(f"   ratios new/old: target {med['target_new'] / med['target_old']:.3f}, int4 {med['int4_new'] / med['int4_old']:.3f}, "
          f"int8 {med['int8_new'] / med['int8_old']:.3f}; draft/target new int4 {med['int4_new'] / med['target_new']:.3f} "
          f"int8 {med['int8_new'] / med['target_new']:.3f}, old int4 {med['int4_old'] / med['target_old']:.3f} "
          f"int8 {med['int8_old'] / med['target_old']:.3f}", flush=True)
with open(out_path, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", out_path)
