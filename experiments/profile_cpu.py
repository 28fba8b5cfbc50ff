"""Where a CPU decode step's time goes (SmolLM2-135M, issue 12 step 3): timers on the engine's own jitted
steps and on each of their parts, compiled separately with the same shapes, for the xla and native backends.

    python experiments/profile_cpu.py [--backends xla native] [--context 300] [--reps 15] [--dtype float32]

Steps timed (median of --reps, after warm-up; each a jitted call that blocks on its result, i.e. one host
round trip, as in the engine's loop; the calls that carry the cache — the AR step, layers, kv_write — donate
it, as the engine does, so none of them pays a copy of it):
  ar_b1 / ar_b64: one engine AR step (`engine.ar_step`: forward + sampling + bookkeeping), batch 1 / 64,
      every row with --context cached tokens;
  draft_b1_<scheme>: one drafter step (`speculative.draft` with γ = 1: drafter forward + sampling; the cache
      donated and fed back, as the engine runs it) at
      batch 1, int8 and int4 drafters, shared f32 head and (if derive_drafter supports it) the int8 head.
Parts (same shapes): `matmuls` (the 7 projections x 30 layers, chained, nothing else), `layers` (the full
decoder stack without the LM head: matmuls + norms + RoPE + KV write + attention), `attention` (30
attention calls over the cache), `kv_write` (30 scatter updates), `lm_head` (final norm + x @ embed.T),
`sampling` (T = 1: log_softmax over 49152, the backend's `sample` op as `ar_step` calls it, and the reported
log-prob), `bookkeeping` (engine._emit; the K/V, donated in the engine, are not returned, so no cache copy is
timed), `round_trip` (a trivial jitted call on the decode state + a host read of 4 scalars).
Writes experiments/results/<--out> (default cpu_profile.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402


def timeit(fn, reps):
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), float(min(ts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["xla", "native"])
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--out", default="cpu_profile.json")
    args = ap.parse_args()

    import er_jax
    from er_jax import engine as E
    from er_jax.cache import KVCache, init_cache
    from er_jax.config import SamplingConfig
    from er_jax.execution import Execution
    from er_jax.model import _layer, execution_layout, linear, logits_from_hidden
    from er_jax.quant import derive_drafter
    from er_jax.sampling import log_probs, reported_log_probs, token_logprob
    from er_jax.speculative import draft

    m = er_jax.load_model("smollm2", dtype=args.dtype)
    cfg = m.config
    dt = cfg.jnp_dtype
    sc = SamplingConfig(1.0)
    derived = {}
    import inspect
    heads = ["shared"] + (["int8"] if "head" in inspect.signature(derive_drafter).parameters else [])
    for scheme in ("int8", "int4"):
        for head in heads:
            kw = {"head": head} if head != "shared" else {}
            derived[f"{scheme}_{head}head"] = derive_drafter(m.weights, scheme, **kw)
    max_len = args.context + 32
    results = {"machine": machine(), "model": f"smollm2 ({args.dtype})", "context": args.context,
               "reps": args.reps, "rows": []}

    def record(backend, what, batch, fn, **extra):
        med, best = timeit(fn, args.reps)
        row = dict(backend=backend, what=what, batch=batch, median_ms=1e3 * med, fastest_ms=1e3 * best, **extra)
        results["rows"].append(row)
        print(f"{backend:6s} {what:28s} B={batch:3d}  median {1e3 * med:8.2f} ms  fastest {1e3 * best:8.2f} ms",
              flush=True)

    for backend in args.backends:
        ex = Execution(backend, None, "unstacked")
        spec = E.StepSpec(cfg, sc, cfg.eos_ids, ex)
        weights = execution_layout(m.weights, ex)  # what SpecRollout runs on this backend
        drafters = {n: execution_layout(d, ex, weights.get("lm_head_p")) for n, d in derived.items()}
        for b in args.batches:
            cache = init_cache(cfg, b, max_len)
            key = jax.random.key(0)
            cache = KVCache(jax.random.normal(key, cache.k.shape, dt) * 0.1,
                            jax.random.normal(jax.random.fold_in(key, 1), cache.v.shape, dt) * 0.1,
                            jnp.full((b,), args.context, jnp.int32))
            width = 64
            fresh = lambda: KVCache(cache.k.copy(), cache.v.copy(), cache.lengths.copy())  # noqa: E731 (to donate)
            st = E.DecodeState(cache=fresh(), last=jnp.ones(b, jnp.int32), n_gen=jnp.ones(b, jnp.int32),
                               done=jnp.zeros(b, bool), row=jnp.arange(b, dtype=jnp.int32),
                               keys=jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(b)),
                               max_new=jnp.full(b, 10**6, jnp.int32), min_new=jnp.zeros(b, jnp.int32),
                               out_tokens=jnp.zeros((b + 1, width), jnp.int32),
                               out_logps=jnp.zeros((b + 1, width), jnp.float32),
                               out_len=jnp.zeros(b + 1, jnp.int32))
            # The whole engine AR step with the state donated, as the engine runs it (each call's state feeds the
            # next: the contexts grow by one token per call, --reps + 2 in all).
            ar = jax.jit(functools.partial(E.ar_step, spec), donate_argnums=1)
            box = {"st": st, "kv": fresh()}

            def ar_call():
                box["st"] = ar(weights, box["st"])[0]
                return box["st"].last

            record(backend, "ar_step (engine)", b, ar_call)
            x = jnp.ones((b, 1, cfg.hidden_size), dt) * 0.01
            pos = jnp.full((b, 1), args.context, jnp.int32)

            def layers_fn(w, x, k_all, v_all):
                for i, lw in enumerate(w["layers"]):
                    def kv_write(k, v, i=i):
                        nonlocal k_all, v_all
                        k_all, v_all = ex.op("kv_write")(k_all, v_all, k, v, pos, ex=ex, layer=i)
                        return k_all, v_all, i
                    x = _layer(cfg, lw, x, pos, kv_write, ex)
                return x, k_all, v_all

            def matmuls_fn(w, x):  # the layers' projections as the layout holds them (fused or not), chained
                acc = x
                qd, inter = cfg.num_heads * cfg.head_dim, cfg.intermediate_size
                for lw in w["layers"]:
                    y = acc
                    qkv = [linear(y, lw[n], ex, n) for n in (["wqkv"] if "wqkv" in lw else ["wq", "wk", "wv"])]
                    q = qkv[0][..., :qd] + 0 * sum(t.sum() for t in qkv)
                    o = linear(q, lw["wo"], ex, "wo")
                    if "w_gate_up" in lw:
                        gu = linear(o, lw["w_gate_up"], ex, "w_gate_up")
                        h = gu[..., :inter] * gu[..., inter:]
                    else:
                        h = linear(o, lw["w_gate"], ex, "w_gate") * linear(o, lw["w_up"], ex, "w_up")
                    acc = acc + linear(h, lw["w_down"], ex, "w_down")
                return acc

            def attn_fn(k_all, v_all):
                q = jnp.ones((b, 1, cfg.num_heads, cfg.head_dim), dt)
                out = q
                for i in range(cfg.num_layers):
                    out = out + ex.op("attention")(out, k_all, v_all, pos, ex=ex, layer=i)
                return out

            def kvw_fn(k_all, v_all):
                kn = jnp.ones((b, 1, cfg.num_kv_heads, cfg.head_dim), dt)
                for i in range(cfg.num_layers):
                    k_all, v_all = ex.op("kv_write")(k_all, v_all, kn, kn, pos, ex=ex, layer=i)
                return k_all, v_all

            def head_fn(w, x):
                return logits_from_hidden(cfg, w, x, ex)

            logits = jnp.asarray(np.random.default_rng(0).normal(size=(b, cfg.vocab_size)), jnp.float32)

            def sampling_fn(st, logits):
                tok = ex.op("sample")(E._step_keys(st), log_probs(logits, sc), ex=ex, greedy=False)  # as ar_step
                return tok, token_logprob(reported_log_probs(logits, sc), tok)

            def emit_fn(st, tok, lp):  # everything but the K/V: in the engine they are donated, here not
                new = E._emit(spec, st, tok[:, None], lp[:, None], jnp.ones_like(st.n_gen), st.cache)
                return dataclasses.replace(new, cache=new.cache.lengths)  # (returning them would time a copy)

            trivial = jax.jit(lambda st: (st.done, st.n_gen + 1, st.cache.lengths, st.n_gen))
            mj, aj, hj, sj, ej = (jax.jit(f) for f in (matmuls_fn, attn_fn, head_fn, sampling_fn, emit_fn))
            lj = jax.jit(layers_fn, donate_argnums=(2, 3))  # the cache donated, as in the engine
            kj = jax.jit(kvw_fn, donate_argnums=(0, 1))

            def donated(fn, *a):  # fn(*a, k, v) -> (..., k, v): the box's cache passed in and replaced
                out = fn(*a, box["kv"].k, box["kv"].v)
                box["kv"] = KVCache(out[-2], out[-1], cache.lengths)
                return out[0]

            record(backend, "layers (no head)", b, lambda: donated(lj, weights, x))
            record(backend, "matmuls (30 layers, projections)", b, lambda: mj(weights, x))
            record(backend, "attention (30 layers)", b, lambda: aj(cache.k, cache.v))
            record(backend, "kv_write (30 layers)", b, lambda: donated(kj))
            record(backend, "lm_head (shared f32)", b, lambda: hj(weights, x))
            st = box["st"]
            record(backend, "sampling T=1", b, lambda: sj(st, logits)[0])
            tok = jnp.ones(b, jnp.int32)
            lp = jnp.zeros(b, jnp.float32)
            record(backend, "bookkeeping (_emit)", b, lambda: ej(st, tok, lp).last)
            record(backend, "round_trip (trivial jit+read)", b,
                   lambda: [np.asarray(a) for a in trivial(st)])
            if b == 1:
                for name, d in drafters.items():
                    # The cache donated and fed back, as the engine runs a draft (the draft writes its K/V in
                    # place; an undonated cache would be copied by every call).
                    dj = jax.jit(lambda d, c, k: draft(cfg, d, c, st.last, sc, k, 1, ex)[:2], donate_argnums=1)
                    box["kv"] = fresh()

                    def draft_call(d=d):
                        box["kv"], toks = dj(d, box["kv"], st.keys)
                        return toks

                    record(backend, f"draft_step {name}", b, draft_call)
                    mjd = jax.jit(matmuls_fn)
                    record(backend, f"matmuls {name}", b, lambda d=d: mjd(d, x))
                    if name.endswith("int8head"):
                        record(backend, "lm_head (int8)", b, lambda d=d: hj(d, x))
    print("wrote", write_json(args.out, results))


if __name__ == "__main__":
    main()
