"""Logit processing (temperature, top-k, top-p), sampling and the log-probs we report.

The sampled distribution for logits z is `softmax(filter(z / T))` (top-k first, then top-p on what is
left), or a point mass on argmax(z) when T = 0. The reported log-prob of a token is its log-probability
under that distribution; for greedy decoding (a point mass) we report the raw `log_softmax(z)` instead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from er_jax.config import SamplingConfig


def filter_logits(z, top_k: int | None, top_p: float):
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf. Ties at a cut stay in."""
    if top_k is not None and top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    if top_p < 1.0:
        zs = jnp.sort(z, axis=-1)[..., ::-1]
        ps = jax.nn.softmax(zs, axis=-1)
        mass_before = jnp.cumsum(ps, axis=-1) - ps
        # Smallest prefix whose mass reaches top_p: keep a token while the mass before it is < top_p.
        cut = jnp.min(jnp.where(mass_before < top_p, zs, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z < cut, -jnp.inf, z)
    return z


def sampling_logits(logits, sc: SamplingConfig):
    """filter(z / T), f32 [..., V]: the sampled distribution's unnormalized log-weights (not for greedy)."""
    return filter_logits(logits.astype(jnp.float32) / sc.temperature, sc.top_k, sc.top_p)


def log_probs(logits, sc: SamplingConfig):
    """Log-probabilities of the distribution we sample from, f32 [..., V] (-inf where excluded)."""
    if sc.greedy:
        z = logits.astype(jnp.float32)
        hot = jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=jnp.bool_)
        return jnp.where(hot, 0.0, -jnp.inf)
    return jax.nn.log_softmax(sampling_logits(logits, sc), axis=-1)


def reported_log_probs(logits, sc: SamplingConfig):
    """Per-token log-probs returned to the RL loss (see module docstring)."""
    if sc.greedy:
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return log_probs(logits, sc)


def sample(keys, logp, greedy: bool = False):
    """One token per row: keys [B] (typed PRNG keys), logp [B, V] -> int32 [B]. `greedy` (logp is a point
    mass) skips drawing V Gumbel variates per row."""
    if greedy:
        return jnp.argmax(logp, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)


def sample_logits_reference(keys, logits, sc: SamplingConfig, sample_op=None):
    """One token per row from the distribution of logits [B, V] under `sc` (`log_probs`) and its reported
    log-prob (`reported_log_probs`): (int32 [B], f32 [B]). `sample_op(keys, logp, greedy)` draws (default:
    `sample`, Gumbel-max)."""
    tok = (sample_op or sample)(keys, log_probs(logits, sc), sc.greedy)
    return tok, token_logprob(reported_log_probs(logits, sc), tok)


def uniforms(keys):
    """One uniform in [0, 1) per row: keys [B] (typed PRNG keys) -> f32 [B]."""
    return jax.vmap(jax.random.uniform)(keys)


def sample_inverse_cdf_reference(u, logw):
    """One token per row by inverse CDF, the law of `sample`: u f32 [B] in [0, 1), logw [B, V] log-weights
    (log-probabilities, or logits) -> int32 [B], the first j whose cumulative weight exceeds u * total, with
    w = exp(logw - max) and entries more than 87.3 below the row's max counted as 0 (w < 1e-37). One uniform
    per row instead of V Gumbel variates; the native backend's `sample` (kernels/native.py) computes this
    with f64 sums, so the two agree except where u * total falls within f32 rounding of a CDF step. A row
    without a finite maximum gets token 0."""
    z = logw.astype(jnp.float32)
    m = jnp.max(z, axis=-1, keepdims=True)
    finite = jnp.isfinite(m[..., 0])
    w = jnp.where(z - m >= -87.3, jnp.exp(z - m), 0.0)
    c = jnp.cumsum(w, axis=-1)
    tok = jnp.sum(c <= u[:, None] * c[:, -1:], axis=-1)
    return jnp.where(finite, jnp.minimum(tok, z.shape[-1] - 1), 0).astype(jnp.int32)


def token_logprob(logp, tokens):
    """logp [..., V], tokens int [...] -> [...]: the log-prob of each token."""
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
