"""Fused against unfused prologues, one build (with prologue_fusion_probe.diff applied): the engine's AR step and
the int4 / int8 drafters' (int8 head) draft step, each jitted twice, once with `norm_matmul` / `silu_mul_matmul`
as the probe's native one-call ops and once as the XLA backend's composition of the native pair; checks the two
give the same bits, then times them alternating (context 300).

    python prologue_fusion_ab.py [--dtype float32] [--batches 1 4] [--reps 21] [--out NAME.json]
"""
import argparse
import functools
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from common import decode_inputs, machine, write_json, xla_cache  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    xla_cache.enable()
    import er_jax
    from er_jax import engine as E
    from er_jax.config import SamplingConfig
    from er_jax.execution import Execution
    from er_jax.kernels import native, xla
    from er_jax.model import execution_layout
    from er_jax.quant import derive_drafter
    from er_jax.speculative import draft

    flag = {"fused": True}
    for op in ("norm_matmul", "silu_mul_matmul"):  # chosen at trace time
        fused, pair = native.IMPLS[op], getattr(xla, op)
        native.IMPLS[op] = lambda *a, _f=fused, _p=pair, **k: (_f if flag["fused"] else _p)(*a, **k)
    m = er_jax.load_model("smollm2", dtype=args.dtype)
    cfg, sc = m.config, SamplingConfig(1.0)
    ex = Execution("native", None, "unstacked")
    spec = E.StepSpec(cfg, sc, cfg.eos_ids, ex)
    weights = execution_layout(m.weights, ex)
    drafters = {s: execution_layout(derive_drafter(m.weights, s, head="int8"), ex, weights.get("lm_head_p"))
                for s in ("int4", "int8")}
    fns = {}
    for fused in (True, False):
        ar = jax.jit(functools.partial(E.ar_step, spec), donate_argnums=1)
        dj = jax.jit(lambda d, c, last, k: draft(cfg, d, c, last, sc, k, 1, ex)[:2], donate_argnums=1)
        fns[("target", fused)] = ar
        for s in drafters:
            fns[(s, fused)] = dj
    res = {"benchmark": "prologue_fusion_ab", "machine": machine(), "dtype": args.dtype, "reps": args.reps,
           "context": 300, "rows": []}
    for b in args.batches:
        _, keys, last, state, fresh = decode_inputs(cfg, b, 300)

        def call(k, arg):
            flag["fused"] = k[1]
            if k[0] == "target":
                return fns[k](weights, arg)[0]
            return fns[k](drafters[k[0]], arg, last, keys)

        prep = {"target": state}
        outs = {}
        for k in fns:
            for _ in range(2):
                outs[k] = jax.block_until_ready(call(k, prep.get(k[0], lambda c: c)(fresh())))
        same = {}
        for name in ("target", *drafters):
            pairs = zip(jax.tree_util.tree_leaves(outs[(name, True)]), jax.tree_util.tree_leaves(outs[(name, False)]))
            same[name] = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs
                             if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
        times = {k: [] for k in fns}
        for rep in range(args.reps):
            for k in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
                arg = jax.block_until_ready(prep.get(k[0], lambda c: c)(fresh()))
                t0 = time.perf_counter()
                jax.block_until_ready(call(k, arg))
                times[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        row = {"batch": b, "bit_identical": same, "load_1min": os.getloadavg()[0],
               "median_ms": {f"{k[0]}_{'fused' if k[1] else 'unfused'}": 1e3 * v for k, v in med.items()},
               "fused_over_unfused": {n: med[(n, True)] / med[(n, False)] for n in ("target", *drafters)}}
        print(f"B={b}: same bits {same}; fused / unfused medians "
              + ", ".join(f"{n} {r:.3f}" for n, r in row["fused_over_unfused"].items()), flush=True)
        res["rows"].append(row)
    if args.out:
        print("wrote", write_json(args.out, res))


if __name__ == "__main__":
    main()
