"""Two builds' draft steps in one process (2026-12-07): the previous build's native handlers are loaded from a copy
of its shared library and registered as old_<target>; a draft step traced while FLAG["old"] is set calls them. Both
builds' steps (int8 / int4 drafter with the int8 head, SmolLM2 in DTYPE (default float32), context 300) and the target's AR step then
alternate in one process, so the VM's drift hits both alike. Medians and fastest of `reps`.

    python experiments/results/drafter_a16_1207/draft_step_ab.py OLD.so 1,4,8,16 15 out.json [DTYPE]
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
from er_jax.config import SamplingConfig  # noqa: E402
from er_jax.execution import Execution  # noqa: E402
from er_jax.model import execution_layout  # noqa: E402
from er_jax.quant import derive_drafter  # noqa: E402
from er_jax.speculative import draft  # noqa: E402

old_lib, batches, reps, out_path = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]
dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
FLAG = old_build(old_lib)

m = er_jax.load_model("smollm2", dtype=dtype)
cfg, sc = m.config, SamplingConfig(1.0)
ex = Execution("native", None, "unstacked")
spec = E.StepSpec(cfg, sc, cfg.eos_ids, ex)
weights = execution_layout(m.weights, ex)
drafters = {s: execution_layout(derive_drafter(m.weights, s, head="int8"), ex, weights.get("lm_head_p"))
            for s in ("int8", "int4")}
ar = jax.jit(functools.partial(E.ar_step, spec), donate_argnums=1)
out = {"benchmark": "draft_step_ab", "machine": machine(), "old_library": old_lib, "dtype": dtype, "context": 300, "reps": reps,
       "rows": {}}
for b in batches:
    _, keys, last, state, fresh = decode_inputs(cfg, b, 300)


    fns = {"target": lambda c, state=state: ar(weights, state(c))[0].last}
    for s, d in drafters.items():
        for v in ("old", "new"):
            dj = jax.jit(lambda d, c, last, k: draft(cfg, d, c, last, sc, k, 1, ex)[:2], donate_argnums=1)
            FLAG["old"] = v == "old"
            fns[f"{s}_{v}"] = functools.partial(lambda c, d, dj, last, keys: dj(d, c, last, keys),
                                                d=d, dj=dj, last=last, keys=keys)
            jax.block_until_ready(fns[f"{s}_{v}"](fresh()))  # traced and compiled under the flag
            FLAG["old"] = False
    for f in fns.values():
        jax.block_until_ready(f(fresh()))
    t = {k: [] for k in fns}
    loads = []
    for rep in range(reps):
        loads.append(os.getloadavg()[0])
        for k in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            c = fresh()
            t0 = time.perf_counter()
            jax.block_until_ready(fns[k](c))
            t[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in t.items()}
    fast = {k: float(min(v)) for k, v in t.items()}
    out["rows"][b] = {"median_ms": {k: 1e3 * v for k, v in med.items()}, "fastest_ms": {k: 1e3 * v for k, v in fast.items()},
                      "load_1min": loads}
    print(f"B={b:2d} target {1e3 * med['target']:.2f} ms | " + " | ".join(
        f"{s}: old {1e3 * med[s + '_old']:.2f} new {1e3 * med[s + '_new']:.2f} ms (new/old "
        f"{med[s + '_new'] / med[s + '_old']:.3f}; /target old {med[s + '_old'] / med['target']:.3f} new "
        f"{med[s + '_new'] / med['target']:.3f})" for s in drafters), flush=True)
with open(out_path, "w") as fh:
    json.dump(out, fh, indent=1)
