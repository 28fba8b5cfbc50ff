"""Fused speculative verification (rejection sampling) with vocab-tiled online softmax statistics.

Same interface, randomness and output semantics as `rejection_sample_reference` (below, the plain-jnp
definition and the XLA backend): target logits [B, γ+1, V], drafter logits [B, γ, V], draft tokens [B, γ], a static
SamplingConfig and one typed PRNG key per row -> (n_accepted [B], tokens [B, γ+1], target log-probs
[B, γ+1]). Given the same keys it draws the same uniforms and Gumbel noise as the reference, so the
two agree token for token up to float rounding at decision boundaries.

Lowering: `er_jax.kernels.call` (interpret mode on CPU, Triton on GPU with `_tuning`). Body: ref slices,
`lax.fori_loop`, jnp reductions (max / sum / argmax) only.

Two passes, neither materializes a softmax of the logits in HBM:
1. `_stats_kernel`, grid (B, γ+1, splits): for every target row and drafter row, one sweep over its
   vocab range in tiles of `block_v` with an online max / sum of exp (and, greedy, a running argmax).
   The wrapper merges the splits into log-normalizers (tiny [B, γ+1] arrays), gathers the logits of
   the draft tokens and decides acceptance: u * q(x) < p(x), n = leading accepts.
2. `_residual_kernel`, grid (B, splits): reads only row n of the target and of the drafter and samples
   normalize(max(0, p_n - q_n)) by Gumbel-max over the tiles (q_γ := 0, so the bonus token comes from
   p_γ; a residual that vanishes falls back to p_n, as in the reference). Greedy skips this pass: the
   emitted token is the target argmax of row n.
Top-k / top-p: the per-row cutoff logit (the smallest raw logit that `er_jax.sampling.filter_logits`
keeps) is computed outside the kernels with that function (a sort over V, as in the reference) and
passed in; inside, a token counts iff its raw logit >= the cutoff. Temperature 0 (greedy) reports the
raw log_softmax, like the reference.
The Gumbel noise [B, V] comes from jax.random outside the kernel (no backend-neutral in-kernel PRNG);
it is read once, in pass 2.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from er_jax.config import SamplingConfig
from er_jax.kernels import Tuning, call, check_positive_pow2, clamped_tile, prev_pow2, resolve_interpret
from er_jax.sampling import filter_logits, log_probs, reported_log_probs, sample, token_logprob

DEFAULT_BLOCK_V = 2048
TARGET_PROGRAMS = 256
MAX_SPLITS = 64
_NEG = -1e30  # running-max start (finite: an all-masked tile never gives inf - inf)


def rejection_sample_reference(target_logits, draft_logits, draft_tokens, sc: SamplingConfig, keys,
                               sample_fn=sample):
    """Standard speculative sampling, per row.

    target_logits [B, γ+1, V], draft_logits [B, γ, V], draft_tokens int [B, γ], keys [B] typed PRNG keys.
    Accept draft i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection n sample from
    normalize(max(0, p_n - q_n)); when all γ are accepted sample the bonus token from p_γ.
    Returns (n_accepted int [B], tokens int [B, γ+1], logprobs f32 [B, γ+1]): tokens[:, :n] are the
    accepted drafts, tokens[:, n] the corrected / bonus token; entries past n repeat tokens[:, n].
    logprobs are the target's reported log-probs of those tokens.
    `sample_fn(keys, logp, greedy)` draws the corrected token (default: Gumbel-max, `er_jax.sampling.sample`).
    """
    b, g1, v = target_logits.shape
    gamma = g1 - 1
    logp = log_probs(target_logits, sc)  # [B, γ+1, V]
    logq = log_probs(draft_logits, sc)  # [B, γ, V]
    k_u, k_x = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k))(keys), 1, 0)
    u = jax.vmap(lambda k: jax.random.uniform(k, (gamma,)))(k_u)  # [B, γ]
    p_x = jnp.exp(token_logprob(logp[:, :gamma], draft_tokens))
    q_x = jnp.exp(token_logprob(logq, draft_tokens))
    accept = u * q_x < p_x  # u < p/q without dividing; q_x > 0 for a token drafted from q
    n = jnp.sum(jnp.cumprod(accept, axis=1), axis=1).astype(jnp.int32)  # leading accepts

    p_n = jnp.exp(jnp.take_along_axis(logp, n[:, None, None], axis=1)[:, 0])  # [B, V]
    q_pad = jnp.concatenate([jnp.exp(logq), jnp.zeros((b, 1, v), logq.dtype)], axis=1)  # q_γ := 0
    q_n = jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    # p == q up to rounding makes the residual vanish; a rejection then had ~zero probability and p is exact.
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)
    extra = sample_fn(k_x, jnp.log(residual), sc.greedy)

    pos = jnp.arange(g1)[None, :]
    drafted = jnp.concatenate([draft_tokens, draft_tokens[:, -1:]], axis=1)
    tokens = jnp.where(pos < n[:, None], drafted, extra[:, None]).astype(jnp.int32)
    logprobs = token_logprob(reported_log_probs(target_logits, sc), tokens)
    return n, tokens, logprobs


def _scaled(z, temperature):
    return z if temperature == 1.0 else z / temperature


def _stats_kernel(*refs, block_v, vocab, splits, gamma, temperature, greedy, filtered):
    """Per (row b, position i, split c): online max / sum-exp of the kept, temperature-scaled target
    logits (greedy: raw logits plus their argmax) and, sampling, the same for the drafter row i."""
    refs = list(refs)
    t_ref = refs.pop(0)
    d_ref = None if greedy else refs.pop(0)
    thr_t_ref, thr_d_ref = (refs.pop(0), refs.pop(0)) if filtered else (None, None)
    m_t_ref, l_t_ref = refs.pop(0), refs.pop(0)
    if greedy:
        best_ref, arg_ref = refs.pop(0), refs.pop(0)
    else:
        m_d_ref, l_d_ref = refs.pop(0), refs.pop(0)

    i = pl.program_id(1)
    n_tiles = pl.cdiv(vocab, block_v)
    per = pl.cdiv(n_tiles, splits)
    lo = pl.program_id(2) * per
    hi = jnp.minimum(lo + per, n_tiles)

    def sweep(z_ref, thr, lo, hi, with_argmax):
        def body(tile, carry):
            m, l, best, arg = carry
            start, idx, fresh = clamped_tile(tile, block_v, vocab)
            z = z_ref[pl.ds(start, block_v)].astype(jnp.float32)
            keep = fresh if thr is None else fresh & (z >= thr)
            s = jnp.where(keep, _scaled(z, temperature), -jnp.inf)
            tile_max = jnp.max(s)
            m_new = jnp.maximum(m, tile_max)
            l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new))
            if with_argmax:  # strict '>': the first maximal index wins, as jnp.argmax
                better = tile_max > best
                arg = jnp.where(better, start + jnp.argmax(s).astype(jnp.int32), arg)
                best = jnp.where(better, tile_max, best)
            return m_new, l, best, arg

        init = (jnp.float32(_NEG), jnp.float32(0.0), jnp.float32(-jnp.inf), jnp.int32(0))
        return lax.fori_loop(lo, hi, body, init)

    thr_t = None if thr_t_ref is None else thr_t_ref[...]
    m, l, best, arg = sweep(t_ref, thr_t, lo, hi, greedy)
    m_t_ref[...] = m
    l_t_ref[...] = l
    if greedy:
        best_ref[...] = best
        arg_ref[...] = arg
    else:  # position γ has no drafter row: an empty sweep
        thr_d = None if thr_d_ref is None else thr_d_ref[...]
        m, l, _, _ = sweep(d_ref, thr_d, lo, jnp.where(i < gamma, hi, lo), False)
        m_d_ref[...] = m
        l_d_ref[...] = l


def _residual_kernel(*refs, block_v, vocab, splits, gamma, temperature, filtered):
    """Per (row b, split c): Gumbel-max over its vocab range of log max(0, p_n - q_n) and of log p_n,
    and the residual's mass."""
    refs = list(refs)
    n_ref, t_ref, d_ref, lse_p_ref, lse_q_ref = refs[:5]
    refs = refs[5:]
    thr_p_ref, thr_q_ref = (refs.pop(0), refs.pop(0)) if filtered else (None, None)
    g_ref, best_r_ref, arg_r_ref, best_p_ref, arg_p_ref, sum_r_ref = refs

    n = n_ref[...]
    has_q = n < gamma
    row_q = jnp.minimum(n, gamma - 1)
    lse_p, lse_q = lse_p_ref[...], lse_q_ref[...]
    n_tiles = pl.cdiv(vocab, block_v)
    per = pl.cdiv(n_tiles, splits)
    lo = pl.program_id(1) * per
    hi = jnp.minimum(lo + per, n_tiles)

    def body(tile, carry):
        best_r, arg_r, best_p, arg_p, sum_r = carry
        start, idx, fresh = clamped_tile(tile, block_v, vocab)
        cols = pl.ds(start, block_v)
        zt = t_ref[n, cols].astype(jnp.float32)
        zq = d_ref[row_q, cols].astype(jnp.float32)
        keep_p = fresh if thr_p_ref is None else fresh & (zt >= thr_p_ref[...])
        keep_q = has_q & (fresh if thr_q_ref is None else fresh & (zq >= thr_q_ref[...]))
        p = jnp.exp(jnp.where(keep_p, _scaled(zt, temperature) - lse_p, -jnp.inf))
        q = jnp.exp(jnp.where(keep_q, _scaled(zq, temperature) - lse_q, -jnp.inf))
        r = jnp.maximum(p - q, 0.0)
        g = g_ref[cols]
        score_r = jnp.where(r > 0, jnp.log(r) + g, -jnp.inf)
        score_p = jnp.where(p > 0, jnp.log(p) + g, -jnp.inf)
        tr, tp = jnp.max(score_r), jnp.max(score_p)
        arg_r = jnp.where(tr > best_r, start + jnp.argmax(score_r).astype(jnp.int32), arg_r)
        arg_p = jnp.where(tp > best_p, start + jnp.argmax(score_p).astype(jnp.int32), arg_p)
        return jnp.maximum(best_r, tr), arg_r, jnp.maximum(best_p, tp), arg_p, sum_r + jnp.sum(r)

    ninf, zero = jnp.float32(-jnp.inf), jnp.int32(0)
    best_r, arg_r, best_p, arg_p, sum_r = lax.fori_loop(lo, hi, body, (ninf, zero, ninf, zero, jnp.float32(0)))
    best_r_ref[...] = best_r
    arg_r_ref[...] = arg_r
    best_p_ref[...] = best_p
    arg_p_ref[...] = arg_p
    sum_r_ref[...] = sum_r


def _tuning(block_v: int) -> Tuning:
    """Triton launch parameters: a [block_v] f32 tile per operand, 8 elements per thread (8 warps at the
    default 2048), no dot; 3 stages prefetch the next vocab tiles of this streaming, bandwidth-bound loop
    (8 KiB a tile per operand)."""
    return Tuning(num_warps=max(1, min(8, block_v // 256)), num_stages=3)


def _auto_splits(programs: int, n_tiles: int) -> int:
    return max(1, min(n_tiles, MAX_SPLITS, -(-TARGET_PROGRAMS // programs)))


def _merge_lse(m, l):
    """log-sum-exp from per-split (max, sum of exp(x - max)) along the last axis."""
    mm = jnp.max(m, axis=-1, keepdims=True)
    return mm[..., 0] + jnp.log(jnp.sum(l * jnp.exp(m - mm), axis=-1))


def _merge_argmax(best, arg):
    """The index of the overall maximum (the earliest split on ties: splits cover increasing ids)."""
    return jnp.take_along_axis(arg, jnp.argmax(best, axis=-1)[..., None], axis=-1)[..., 0]


def _cutoff(logits, sc: SamplingConfig):
    """Smallest raw logit that top-k / top-p keeps, per row ([..., V] -> [...])."""
    z = logits.astype(jnp.float32)
    kept = filter_logits(z / sc.temperature, sc.top_k, sc.top_p) > -jnp.inf
    return jnp.min(jnp.where(kept, z, jnp.inf), axis=-1)


def _take(a, idx):
    """a [B, R, ...], idx int [B, K] -> a[b, idx[b, k], ...]."""
    return jax.vmap(lambda row, i: row[i])(a, idx)


def _token_logits(logits, tokens):
    return jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("sc", "block_v", "num_splits", "interpret"))
def _rejection_sample(target_logits, draft_logits, draft_tokens, keys, *, sc, block_v, num_splits, interpret):
    b, g1, v = target_logits.shape
    gamma = g1 - 1
    greedy = sc.greedy
    temperature = 1.0 if greedy else float(sc.temperature)
    filtered = not greedy and ((sc.top_k is not None and sc.top_k < v) or sc.top_p < 1.0)
    bv = min(block_v or DEFAULT_BLOCK_V, prev_pow2(v))
    n_tiles = -(-v // bv)
    splits = min(num_splits or _auto_splits(b * g1, n_tiles), n_tiles)
    common = dict(block_v=bv, vocab=v, splits=splits, gamma=gamma, temperature=temperature, filtered=filtered)

    # The reference's randomness, drawn the same way: one uniform per draft, Gumbel noise for the residual.
    k_u, k_x = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k))(keys), 1, 0)
    u = jax.vmap(lambda k: jax.random.uniform(k, (gamma,)))(k_u)

    # ---- pass 1: per-row statistics
    row_spec = pl.BlockSpec((None, None, v), lambda i, j, c: (i, j, 0))
    draft_spec = pl.BlockSpec((None, None, v), lambda i, j, c: (i, jnp.minimum(j, gamma - 1), 0))
    operands, in_specs = [target_logits], [row_spec]
    if not greedy:
        operands.append(draft_logits)
        in_specs.append(draft_spec)
    if filtered:
        thr_t, thr_d = _cutoff(target_logits, sc), _cutoff(draft_logits, sc)
        operands += [thr_t, thr_d]
        in_specs += [pl.BlockSpec((None, None), lambda i, j, c: (i, j)),
                     pl.BlockSpec((None, None), lambda i, j, c: (i, jnp.minimum(j, gamma - 1)))]
    out_dtypes = [jnp.float32, jnp.float32] + ([jnp.float32, jnp.int32] if greedy else [jnp.float32, jnp.float32])
    stats = call(
        functools.partial(_stats_kernel, greedy=greedy, **common), grid=(b, g1, splits), tuning=_tuning(bv),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, None), lambda i, j, c: (i, j, c))] * 4,
        out_shape=[jax.ShapeDtypeStruct((b, g1, splits), dt) for dt in out_dtypes],
        interpret=interpret, name="rejection_stats")(*operands)
    lse_t = _merge_lse(stats[0], stats[1])  # [B, γ+1]: log-normalizer of the processed target rows

    def logprob(z, lse, thr):
        lp = _scaled(z, temperature) - lse
        return lp if thr is None else jnp.where(z >= thr, lp, -jnp.inf)

    # ---- acceptance
    if greedy:
        amax = _merge_argmax(stats[2], stats[3])  # [B, γ+1]
        accept = draft_tokens == amax[:, :gamma]
    else:
        lse_d = _merge_lse(stats[2], stats[3])[:, :gamma]  # position γ has no drafter row
        p_x = jnp.exp(logprob(_token_logits(target_logits[:, :gamma], draft_tokens), lse_t[:, :gamma],
                              thr_t[:, :gamma] if filtered else None))
        q_x = jnp.exp(logprob(_token_logits(draft_logits, draft_tokens), lse_d, thr_d if filtered else None))
        accept = u * q_x < p_x
    n = jnp.sum(jnp.cumprod(accept, axis=1), axis=1).astype(jnp.int32)

    # ---- pass 2: the corrected / bonus token
    if greedy:
        extra = _take(amax, n[:, None])[:, 0]
    else:
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(k_x)
        row_q = jnp.minimum(n, gamma - 1)[:, None]
        splits2 = min(num_splits or _auto_splits(b, n_tiles), n_tiles)
        scalar = pl.BlockSpec((None,), lambda i, c: (i,))
        operands = [n, target_logits, draft_logits, _take(lse_t, n[:, None])[:, 0], _take(lse_d, row_q)[:, 0]]
        in_specs = [scalar, pl.BlockSpec((None, g1, v), lambda i, c: (i, 0, 0)),
                    pl.BlockSpec((None, gamma, v), lambda i, c: (i, 0, 0)), scalar, scalar]
        if filtered:
            operands += [_take(thr_t, n[:, None])[:, 0], _take(thr_d, row_q)[:, 0]]
            in_specs += [scalar, scalar]
        operands.append(gumbel)
        in_specs.append(pl.BlockSpec((None, v), lambda i, c: (i, 0)))
        res = call(
            functools.partial(_residual_kernel, **{**common, "splits": splits2}), grid=(b, splits2),
            tuning=_tuning(bv),
            in_specs=in_specs, out_specs=[pl.BlockSpec((None, None), lambda i, c: (i, c))] * 5,
            out_shape=[jax.ShapeDtypeStruct((b, splits2), dt)
                       for dt in (jnp.float32, jnp.int32, jnp.float32, jnp.int32, jnp.float32)],
            interpret=interpret, name="rejection_residual")(*operands)
        best_r, arg_r, best_p, arg_p, sum_r = res
        extra = jnp.where(jnp.sum(sum_r, axis=1) > 0, _merge_argmax(best_r, arg_r), _merge_argmax(best_p, arg_p))

    pos = jnp.arange(g1)[None, :]
    drafted = jnp.concatenate([draft_tokens, draft_tokens[:, -1:]], axis=1)
    tokens = jnp.where(pos < n[:, None], drafted, extra[:, None]).astype(jnp.int32)
    logprobs = logprob(_token_logits(target_logits, tokens), lse_t, thr_t if filtered else None)
    return n, tokens, logprobs


def rejection_sample(target_logits, draft_logits, draft_tokens, sc: SamplingConfig, keys, *, block_v=None,
                     num_splits=None, interpret=None):
    """Exact speculative verification; drop-in for `rejection_sample_reference`.

    target_logits [B, γ+1, V], draft_logits [B, γ, V] (any float dtype), draft_tokens int [B, γ],
    sc a SamplingConfig (static), keys [B] typed PRNG keys. Returns (n_accepted int32 [B],
    tokens int32 [B, γ+1], logprobs f32 [B, γ+1]) with the reference's meaning. block_v: power-of-two
    vocab tile (default 2048); num_splits: vocab ranges per row run in parallel (default: enough for
    ~256 programs); interpret: default None (interpret mode when lowered for CPU, compiled elsewhere).
    """
    if not isinstance(sc, SamplingConfig):
        raise ValueError(f"sc must be an er_jax.config.SamplingConfig, got {type(sc).__name__}")
    if target_logits.ndim != 3 or draft_logits.ndim != 3 or draft_tokens.ndim != 2:
        raise ValueError(f"expected target_logits [B, γ+1, V], draft_logits [B, γ, V], draft_tokens [B, γ]; got "
                         f"{target_logits.shape}, {draft_logits.shape}, {draft_tokens.shape}")
    b, g1, v = target_logits.shape
    if g1 < 2:
        raise ValueError(f"target_logits needs γ+1 >= 2 positions, got {g1}")
    if draft_logits.shape != (b, g1 - 1, v) or draft_tokens.shape != (b, g1 - 1):
        raise ValueError(f"with target_logits {target_logits.shape} expected draft_logits {(b, g1 - 1, v)} and "
                         f"draft_tokens {(b, g1 - 1)}; got {draft_logits.shape} and {draft_tokens.shape}")
    if not jnp.issubdtype(draft_tokens.dtype, jnp.integer):
        raise ValueError(f"draft_tokens must be integers, got {draft_tokens.dtype}")
    if keys.shape != (b,) or not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        raise ValueError(f"keys must be {b} typed PRNG keys (jax.random.split(jax.random.key(s), {b})), got "
                         f"{keys.dtype} {keys.shape}")
    check_positive_pow2("block_v", block_v)
    if num_splits is not None and int(num_splits) < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return _rejection_sample(target_logits, draft_logits, draft_tokens.astype(jnp.int32), keys, sc=sc,
                             block_v=block_v, num_splits=num_splits, interpret=resolve_interpret(interpret))
