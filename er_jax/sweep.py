"""The timing sweep behind `er-jax sweep`, and its CSV (and rollout-trace) I/O.

The sweep times the engine's real jitted steps — the AR step (γ = 0) and the SD step (γ drafts + verify +
rejection sampling + bookkeeping), and separately the draft scan and the verify pass alone — on a synthetic
decode state whose rows all hold `context` clean cache entries (the cache is sized `context` + headroom, as
the engine sizes it for a rollout of that length). Each unit is compiled and warmed up first, then timed
`reps` times (median, block_until_ready). The CSV has one row per unit: kind (ar | draft | verify | sd),
batch, context, gamma, wall_s, tau (tokens per row per SD step, from the step's accepted counts; measured on
the synthetic state — random last tokens, zero K/V — so it says little about acceptance on real text).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from er_jax import controller
from er_jax.config import ModelConfig

CSV_FIELDS = ("kind", "batch", "context", "gamma", "wall_s", "tau")


def _check_grid(batches, contexts, gammas):
    from er_jax.engine import MAX_DRAFT
    batches, contexts, gammas = ([int(x) for x in v] for v in (batches, contexts, gammas))
    if not batches or min(batches) < 1:
        raise ValueError(f"--batches must be integers >= 1, got {batches}")
    if not contexts or min(contexts) < 1:
        raise ValueError(f"--contexts must be integers >= 1, got {contexts}")
    if not gammas or min(gammas) < 0 or max(gammas) > MAX_DRAFT:
        raise ValueError(f"--gammas must be integers in [0, {MAX_DRAFT}] (0 = plain AR step), got {gammas}")
    return sorted(set(batches)), sorted(set(contexts)), sorted(set(gammas))


def _median_time(fn, state, reps: int, warmup: int):
    """`fn(state)` prepares a unit's inputs (untimed) and returns `run`; `run()` does the device work and
    returns (next state, extra). Runs warmup + reps times (the first compiles); returns (median seconds of
    the timed runs, their extras, the final state)."""
    import jax

    times, extras = [], []
    for i in range(warmup + reps):
        run = fn(state)
        t0 = time.perf_counter()
        out = jax.block_until_ready(run())
        dt = time.perf_counter() - t0
        state, extra = out
        if i >= warmup:
            times.append(dt)
            extras.append(extra)
    return float(np.median(times)), extras, state


def sweep(config: ModelConfig, weights, *, batches: Sequence[int], contexts: Sequence[int],
          gammas: Sequence[int], drafter: str = "int4", reps: int = 5, warmup: int = 2, temperature: float = 1.0,
          seed: int = 0, kernels: str | None = None, layout: str | None = None,
          progress: bool = True) -> list[dict]:
    """Time the engine's jitted units over batch × context × γ (see the module docstring). Returns CSV rows.
    The weights and drafter are those a SpecRollout would run (same execution layout, kernels and drafter
    derivation; `layout` / `kernels` None: SpecRollout's defaults for this backend)."""
    import jax
    import jax.numpy as jnp

    from er_jax.cache import KVCache
    from er_jax.config import SamplingConfig
    from er_jax.engine import Engine, StepSpec
    from er_jax.rollout import SpecRollout
    from er_jax.speculative import draft, verify

    batches, contexts, gammas = _check_grid(batches, contexts, gammas)
    if reps < 1 or warmup < 1:
        raise ValueError(f"reps and warmup must be >= 1 (warm-up compiles), got {reps}, {warmup}")
    spec_gammas = [g for g in gammas if g > 0]
    # A minimal SpecRollout gives the exact execution weights (layout, dtype, drafter) rollouts use.
    r = SpecRollout(config, weights, max_batch=1, max_prompt_len=1, max_new_tokens=1, drafter=drafter,
                    mode="sd" if spec_gammas else "ar", kernels=kernels, **({"layout": layout} if layout else {}))
    weights, qweights, ex = r.weights, r.drafter, r.ex
    del r
    sc = SamplingConfig(temperature=temperature)
    spec = StepSpec(config, sc, (), ex)  # no EOS: rows never finish inside a timed step
    draft_fns = {g: jax.jit(lambda d, c, last, keys, g=g: draft(config, d, c, last, sc, keys, g, ex),
                            donate_argnums=(1,)) for g in spec_gammas}
    verify_fn = jax.jit(lambda w, c, last, toks, logits, keys: verify(config, w, c, last, toks, logits, sc, keys,
                                                                      ex), donate_argnums=(1,))
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    from tqdm import tqdm

    bar = tqdm(total=len(batches) * len(contexts) * len(gammas), desc="sweep", unit="cell",
               disable=not progress or None, leave=False, file=sys.stderr)
    for context in contexts:
        for b in batches:
            # The cache is sized for a rollout whose prompts hold `context` tokens (as SpecRollout sizes it).
            eng = Engine(config, max_batch=b, max_prompt_len=context, max_new_tokens=max(gammas) + 2, ex=ex)
            big = np.full(b, eng.max_new_tokens, np.int32)
            st = eng.initial_state(b, b, seed, big, big)
            last_np = rng.integers(0, config.vocab_size, b).astype(np.int32)
            keys = jax.random.split(jax.random.key(seed), b)

            def fresh(st):  # every timed unit starts from rows holding `context` clean entries
                return dataclasses.replace(
                    st, cache=KVCache(st.cache.k, st.cache.v, jnp.full((b,), context, jnp.int32)),
                    last=jnp.asarray(last_np), n_gen=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool))

            for g in gammas:
                bar.set_postfix_str(f"B={b} S={context} γ={g}")
                if g == 0:
                    def ar(st):
                        st = jax.block_until_ready(fresh(st))
                        return lambda: eng.step("ar", spec, 0, weights, None, st)

                    wall, _, st = _median_time(ar, st, reps, warmup)
                    rows.append(dict(kind="ar", batch=b, context=context, gamma=0, wall_s=wall, tau=None))
                    bar.update()
                    continue

                def dr(st, g=g):
                    st = jax.block_until_ready(fresh(st))
                    def run():
                        cache, toks, logits = draft_fns[g](qweights, st.cache, st.last, keys)
                        return dataclasses.replace(st, cache=cache), (toks, logits)
                    return run

                wall_d, extras, st = _median_time(dr, st, reps, warmup)
                toks, logits = extras[-1]

                def ve(st):
                    st = jax.block_until_ready(fresh(st))
                    def run():
                        cache, n_acc, _, _ = verify_fn(weights, st.cache, st.last, toks, logits, keys)
                        return dataclasses.replace(st, cache=cache), n_acc
                    return run

                wall_v, _, st = _median_time(ve, st, reps, warmup)

                def sd(st, g=g):
                    st = jax.block_until_ready(fresh(st))
                    return lambda: eng.step("sd", spec, g, weights, qweights, st)

                wall_s, accs, st = _median_time(sd, st, reps, warmup)
                tau = float(np.mean([np.asarray(a) + 1 for a in accs]))
                rows += [dict(kind="draft", batch=b, context=context, gamma=g, wall_s=wall_d, tau=None),
                         dict(kind="verify", batch=b, context=context, gamma=g, wall_s=wall_v, tau=None),
                         dict(kind="sd", batch=b, context=context, gamma=g, wall_s=wall_s, tau=tau)]
                bar.update()
            st = eng = None  # free this cell's cache before the next one is allocated
    bar.close()
    return rows


def write_csv(path: str, rows: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_FIELDS})


def read_csv(path: str) -> list[dict]:
    """Rows of a sweep CSV (kind, batch, context, gamma, wall_s, tau; tau empty = None)."""
    if not os.path.isfile(path):
        raise ValueError(f"no sweep CSV at {path!r}; write one with `er-jax sweep --out {path}`")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(CSV_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a sweep CSV, missing columns {sorted(missing)} (need {CSV_FIELDS})")
        rows = []
        for i, r in enumerate(reader):
            try:
                rows.append(dict(kind=r["kind"], batch=int(r["batch"]), context=float(r["context"]),
                                 gamma=int(r["gamma"]), wall_s=float(r["wall_s"]),
                                 tau=float(r["tau"]) if r["tau"] not in ("", None) else None))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: bad row {i + 2}: {e}") from None
    if not rows:
        raise ValueError(f"{path} holds no timing rows")
    return rows


def read_trace(path: str) -> list[dict]:
    """Step records of a rollout trace (SpecRollout.generate(trace_path=...)), as controller Timings' dicts.
    Records without a timing (wall_s = 0) are skipped."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if rec.get("wall_s", 0) > 0:
                    out.append(controller.as_timing(rec).to_dict())
    if not out:
        raise ValueError(f"{path} holds no timed step records")
    return out


def measured_speedups(rows: Sequence[dict], gamma: int | None = None) -> list[dict]:
    """(batch, context, γ) cells holding both an "ar" and an "sd" timing: measured speedup τ·T_ar/T_sd."""
    ar = {(r["batch"], r["context"]): r["wall_s"] for r in rows if r["kind"] == "ar"}
    out = []
    for r in rows:
        if r["kind"] == "sd" and (gamma is None or r["gamma"] == gamma) and (r["batch"], r["context"]) in ar:
            tau = r["tau"] if r["tau"] is not None else float(r["gamma"])
            out.append(dict(batch=r["batch"], context=r["context"], gamma=r["gamma"], tau=tau,
                            speedup=tau * ar[(r["batch"], r["context"])] / r["wall_s"]))
    return out
