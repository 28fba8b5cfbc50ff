"""The rejection sampler alone: exact distributions, checked by chi-square (fail when p < 1e-4)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from er_jax.config import SamplingConfig
from er_jax.sampling import filter_logits
from er_jax.kernels.rejection import rejection_sample_reference
from tests.helpers import N_SAMPLES as N
from tests.helpers import P_MIN, V, check_speculative_samples, chi2_pvalue, rejection_pairs
from tests.helpers import log_or_neg_inf as _log


PAIRS = rejection_pairs()


@functools.partial(jax.jit, static_argnames="sc")
def _run(key, t_logits, d_logits, sc):
    """Sample N independent speculative steps: draft tokens from q, then the reference verification."""
    k_draft, k_rej = jax.random.split(key)
    b, gamma = d_logits.shape[:2]
    from er_jax.sampling import log_probs
    d_tok = jax.random.categorical(k_draft, log_probs(d_logits, sc), axis=-1).astype(jnp.int32)
    return rejection_sample_reference(t_logits, d_logits, d_tok, sc, jax.random.split(k_rej, b))


def test_at_least_twenty_pairs():
    assert len(PAIRS) >= 20


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_pair_distributions(i):
    """γ = 2 with (p0, q0) = pair i, (p1, q1) = pair i+1, bonus from p2 = p of pair i+2.
    Emitted token 0 ~ p0; token 1 given acceptance of draft 0 ~ p1; recovered tokens ~ residuals;
    bonus ~ p2; acceptance rate of draft 0 = sum(min(p0, q0)) (binomial)."""
    (p0, q0), (p1, q1), (p2, _) = PAIRS[i], PAIRS[(i + 1) % len(PAIRS)], PAIRS[(i + 2) % len(PAIRS)]
    t = np.broadcast_to(np.stack([_log(p0), _log(p1), _log(p2)]), (N, 3, V))
    d = np.broadcast_to(np.stack([_log(q0), _log(q1)]), (N, 2, V))
    n, tok, lp = jax.device_get(_run(jax.random.key(100 + i), jnp.asarray(t), jnp.asarray(d), SamplingConfig(1.0)))
    check_speculative_samples(n, tok, lp, (PAIRS[i], PAIRS[(i + 1) % len(PAIRS)], PAIRS[(i + 2) % len(PAIRS)]))


@pytest.mark.parametrize("sc", [SamplingConfig(0.7, top_k=3), SamplingConfig(1.3, top_p=0.6),
                                SamplingConfig(0.9, top_k=4, top_p=0.8)])
@pytest.mark.slow
def test_processing_applies_to_both_p_and_q(sc):
    """Raw logits with temperature / top-k / top-p: the emitted token follows the processed target."""
    rng = np.random.default_rng(7)
    zt = rng.normal(size=(2, V)).astype(np.float32) * 2
    zd = rng.normal(size=(1, V)).astype(np.float32) * 2
    t = np.broadcast_to(zt, (N, 2, V))
    d = np.broadcast_to(zd, (N, 1, V))
    n, tok, _ = jax.device_get(_run(jax.random.key(5), jnp.asarray(t), jnp.asarray(d), sc))

    def processed(z):  # written independently of er_jax.sampling
        z = z / sc.temperature
        order = np.argsort(-z)
        keep = np.zeros(V, bool)
        keep[order[: sc.top_k or V]] = True
        e = np.where(keep, np.exp(z - z.max()), 0)
        ps = e[order] / e.sum()
        inside = (np.cumsum(ps) - ps) < sc.top_p
        keep2 = np.zeros(V, bool)
        keep2[order[inside]] = True
        e = np.where(keep & keep2, e, 0)
        return e / e.sum()

    p0 = processed(zt[0])
    assert chi2_pvalue(np.bincount(tok[:, 0], minlength=V), p0) > P_MIN
    np.testing.assert_allclose(jax.nn.softmax(filter_logits(jnp.asarray(zt[0]) / sc.temperature, sc.top_k,
                                                             sc.top_p)), p0, atol=1e-6)


def test_greedy_accepts_iff_argmax_agrees():
    t = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4, V)), jnp.float32)
    d_tok = jnp.argmax(t[:, :3], -1).astype(jnp.int32).at[1, 1].set(0).at[2, 0].set(0).at[3].set(0)
    d_tok = jnp.where(jnp.argmax(t[:, :3], -1) == 0, 1, d_tok).at[0].set(jnp.argmax(t[0, :3], -1))
    d = jax.nn.one_hot(d_tok, V) * 10
    n, tok, _ = rejection_sample_reference(t, d, d_tok, SamplingConfig(0.0), jax.random.split(jax.random.key(0), 4))
    agree = np.asarray(d_tok == jnp.argmax(t[:, :3], -1))
    want_n = np.array([np.cumprod(a).sum() for a in agree])
    assert list(np.asarray(n)) == list(want_n)
    for b in range(4):
        assert int(tok[b, want_n[b]]) == int(jnp.argmax(t[b, want_n[b]]))
