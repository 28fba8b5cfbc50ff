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
from er_jax.execution import Execution
from er_jax.model import forward


def draft(config: ModelConfig, drafter, cache: KVCache, last, sc: SamplingConfig, keys, gamma: int,
          ex: Execution):
    """γ drafter steps from `last` (int [B], the not-yet-fed token at position cache.lengths).

    Writes provisional K/V at lengths..lengths+γ-1 of the shared cache. Returns (cache, draft tokens
    int [B, γ], draft logits f32 [B, γ, V]); the cache's lengths are unchanged.
    """
    start = cache.lengths

    def body(carry, i):
        k, v, tok = carry
        logits, c = forward(config, drafter, tok[:, None], KVCache(k, v, start + i), ex=ex)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
        # q's law straight from the logits, as the AR step draws (natively one pass, no [B, V] log_softmax;
        # the reported log-prob it also returns is unused here and dropped by XLA)
        nxt, _ = ex.op("sample_logits")(step_keys, logits[:, 0], sc, ex=ex)
        return (c.k, c.v, nxt), (nxt, logits[:, 0])

    (k, v, _), (toks, logits) = jax.lax.scan(body, (cache.k, cache.v, last), jnp.arange(gamma))
    return KVCache(k, v, start), jnp.swapaxes(toks, 0, 1), jnp.swapaxes(logits, 0, 1)


def verify(config: ModelConfig, weights, cache: KVCache, last, draft_tokens, draft_logits,
           sc: SamplingConfig, keys, ex: Execution):
    """One target forward over [last, d_0..d_{γ-1}] (overwriting the drafter's K/V) and rejection
    sampling (the backend's `rejection_sample` op: see er_jax.kernels.rejection for its semantics).
    Returns (cache, n_accepted, tokens [B, γ+1], logprobs [B, γ+1])."""
    seq = jnp.concatenate([last[:, None], draft_tokens], axis=1)
    target_logits, cache = forward(config, weights, seq, cache, ex=ex)
    n, tokens, logprobs = ex.op("rejection_sample")(target_logits, draft_logits, draft_tokens, sc, keys, ex=ex)
    return cache, n, tokens, logprobs
