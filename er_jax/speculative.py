"""Self-speculative decoding: draft (scan over γ with the quantized drafter), verify (one target
forward over γ+1 positions) and exact rejection sampling.

Shared KV cache: the drafter writes provisional K/V for positions L..L+γ-1 into the target's cache; the
verify pass rewrites positions L..L+γ with clean target K/V; whatever lies past a row's new length is
ignored by the length mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from er_jax.cache import KVCache
from er_jax.config import ModelConfig, SamplingConfig
from er_jax.model import forward
from er_jax.sampling import log_probs, reported_log_probs, sample, token_logprob


def rejection_sample_reference(target_logits, draft_logits, draft_tokens, sc: SamplingConfig, keys):
    """Standard speculative sampling, per row.

    target_logits [B, γ+1, V], draft_logits [B, γ, V], draft_tokens int [B, γ], keys [B] typed PRNG keys.
    Accept draft i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection n sample from
    normalize(max(0, p_n - q_n)); when all γ are accepted sample the bonus token from p_γ.
    Returns (n_accepted int [B], tokens int [B, γ+1], logprobs f32 [B, γ+1]): tokens[:, :n] are the
    accepted drafts, tokens[:, n] the corrected / bonus token; entries past n repeat tokens[:, n].
    logprobs are the target's reported log-probs of those tokens.
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
    extra = sample(k_x, jnp.log(residual), sc.greedy)

    pos = jnp.arange(g1)[None, :]
    drafted = jnp.concatenate([draft_tokens, draft_tokens[:, -1:]], axis=1)
    tokens = jnp.where(pos < n[:, None], drafted, extra[:, None]).astype(jnp.int32)
    logprobs = token_logprob(reported_log_probs(target_logits, sc), tokens)
    return n, tokens, logprobs


def draft(config: ModelConfig, drafter, cache: KVCache, last, sc: SamplingConfig, keys, gamma: int,
          kernels: str, mesh=None):
    """γ drafter steps from `last` (int [B], the not-yet-fed token at position cache.lengths).

    Writes provisional K/V at lengths..lengths+γ-1 of the shared cache. Returns (cache, draft tokens
    int [B, γ], draft logits f32 [B, γ, V]); the cache's lengths are unchanged.
    """
    start = cache.lengths

    def body(carry, i):
        k, v, tok = carry
        logits, c = forward(config, drafter, tok[:, None], KVCache(k, v, start + i), kernels=kernels, mesh=mesh)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
        nxt = sample(step_keys, log_probs(logits[:, 0], sc), sc.greedy)
        return (c.k, c.v, nxt), (nxt, logits[:, 0])

    (k, v, _), (toks, logits) = jax.lax.scan(body, (cache.k, cache.v, last), jnp.arange(gamma))
    return KVCache(k, v, start), jnp.swapaxes(toks, 0, 1), jnp.swapaxes(logits, 0, 1)


def verify(config: ModelConfig, weights, cache: KVCache, last, draft_tokens, draft_logits,
           sc: SamplingConfig, keys, kernels: str, mesh=None):
    """One target forward over [last, d_0..d_{γ-1}] (overwriting the drafter's K/V) and rejection
    sampling. Returns (cache, n_accepted, tokens [B, γ+1], logprobs [B, γ+1])."""
    seq = jnp.concatenate([last[:, None], draft_tokens], axis=1)
    target_logits, cache = forward(config, weights, seq, cache, kernels=kernels, mesh=mesh)
    if kernels == "pallas" and mesh is not None:
        from er_jax.kernels import sharded
        n, tokens, logprobs = sharded.rejection_sample(target_logits, draft_logits, draft_tokens, sc, keys, mesh)
    elif kernels == "pallas":
        from er_jax.kernels.rejection import rejection_sample
        n, tokens, logprobs = rejection_sample(target_logits, draft_logits, draft_tokens, sc, keys)
    else:
        n, tokens, logprobs = rejection_sample_reference(target_logits, draft_logits, draft_tokens, sc, keys)
    return cache, n, tokens, logprobs
