"""Tiny models and statistics shared by the tests."""
import jax
import numpy as np
import pytest
from scipy import stats

from er_jax.config import ModelConfig
from er_jax.model import init_weights


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, rope_theta=10000.0, qkv_bias=True, eos_ids=(3,), name="tiny-test")
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, scale: float = 0.3, **kw):
    cfg = tiny_config(**kw)
    return cfg, init_weights(cfg, jax.random.key(seed), scale=scale)


def chi2_pvalue(counts, probs, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells with small expected counts are pooled into one."""
    counts = np.asarray(counts, float)
    probs = np.asarray(probs, float)
    assert counts[probs == 0].sum() == 0, "a zero-probability outcome was observed"
    n = counts.sum()
    exp = probs * n
    big = exp >= min_expected
    obs_c = list(counts[big]) + ([counts[~big].sum()] if (~big).any() else [])
    exp_c = list(exp[big]) + ([exp[~big].sum()] if (~big).any() else [])
    obs_c, exp_c = np.array(obs_c), np.array(exp_c)
    keep = exp_c > 0
    if keep.sum() < 2:
        return 1.0
    return float(stats.chisquare(obs_c[keep], exp_c[keep] * obs_c[keep].sum() / exp_c[keep].sum()).pvalue)


# -- the rejection sampler's statistical suite (tests/test_rejection.py on the reference, tests/test_kernels.py on
#    the kernel). Each check fails when its p-value < P_MIN = 1e-4, i.e. with probability 1e-4 for a correct
#    sampler; a pair test makes at most 6 checks, so its false-failure rate is <= 6e-4 (< 1e-3) on any machine:
#    the samples are fresh draws of a fixed key, and float differences between CPUs only redraw them.
N_SAMPLES = 30_000
V = 6
P_MIN = 1e-4


def _dist(rng, zeros=()):
    p = rng.dirichlet(np.full(V, 0.7))
    p[list(zeros)] = 0
    return p / p.sum()


def rejection_pairs():
    """>= 20 (p, q) pairs: random, equal, disjoint supports, one-hot q, zero cells, near-equal, peaked."""
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(6):
        pairs.append((_dist(rng), _dist(rng)))
    p = _dist(rng)
    pairs.append((p, p.copy()))  # p == q: everything accepted
    pairs.append((np.array([.5, .5, 0, 0, 0, 0]), np.array([0, 0, .2, .3, .5, 0])))  # disjoint supports
    pairs.append((np.array([.1, .2, .3, .4, 0, 0]), np.array([0, 0, 0, 0, 0, 1.])))  # disjoint, one-hot q
    pairs.append((_dist(rng), np.eye(V)[2]))  # one-hot q inside p's support
    pairs.append((np.eye(V)[1], _dist(rng)))  # one-hot p
    pairs.append((np.eye(V)[3], np.eye(V)[3]))  # both one-hot, equal
    pairs.append((_dist(rng, zeros=(0, 5)), _dist(rng, zeros=(1,))))  # zero-probability cells
    pairs.append((_dist(rng, zeros=(2, 3)), _dist(rng, zeros=(2, 3, 4))))
    q = _dist(rng)
    pairs.append((0.98 * q + 0.02 * _dist(rng), q))  # near-equal (acceptance ~ 0.98)
    pairs.append((np.array([.9, .02, .02, .02, .02, .02]), np.array([.02, .02, .02, .02, .02, .9])))
    pairs.append((np.full(V, 1 / V), _dist(rng)))
    pairs.append((_dist(rng), np.full(V, 1 / V)))
    pairs.append((_dist(rng, zeros=(4,)), _dist(rng, zeros=(4,))))
    pairs.append((np.array([0, .5, .5, 0, 0, 0]), np.array([0, .1, .9, 0, 0, 0])))
    pairs.append((np.array([.3, 0, .3, 0, .4, 0]), np.array([.3, .3, 0, .4, 0, 0])))
    return pairs



def log_or_neg_inf(p):
    """log p as f32, -inf where p = 0."""
    return np.where(p > 0, np.log(np.maximum(p, 1e-300)), -np.inf).astype(np.float32)


def residual(p, q):
    """The distribution a rejected draft is resampled from: norm(max(p - q, 0)), or p when p <= q."""
    r = np.maximum(p - q, 0)
    return r / r.sum() if r.sum() > 0 else p


def check_speculative_samples(n, tok, lp, pairs3, what: str = "") -> None:
    """γ = 2 samples with (p0, q0), (p1, q1), (p2, _) = pairs3: emitted token 0 ~ p0; token 1 given acceptance
    of draft 0 ~ p1; recovered tokens ~ residuals; bonus ~ p2; acceptance of draft 0 ~ Binomial(sum(min(p0, q0)));
    no zero-probability token; reported log-probs are the target's."""
    (p0, q0), (p1, q1), (p2, _) = pairs3
    count = lambda x: np.bincount(x, minlength=V)
    checks = [(tok[:, 0], p0), (tok[n >= 1, 1], p1), (tok[n == 0, 0], residual(p0, q0)),
              (tok[n == 1, 1], residual(p1, q1)), (tok[n == 2, 2], p2)]
    for samples, probs in checks:
        if len(samples) >= 100:
            assert chi2_pvalue(count(samples), probs) > P_MIN, what
        assert count(samples)[probs == 0].sum() == 0, f"{what}: a zero-probability token was emitted"
    acc = np.minimum(p0, q0).sum()
    if 0 < acc < 1:
        assert stats.binomtest(int((n >= 1).sum()), len(n), acc).pvalue > P_MIN, what
    else:
        assert (n >= 1).mean() == acc, what
    np.testing.assert_allclose(lp[:, 0], log_or_neg_inf(p0)[tok[:, 0]], atol=1e-5, err_msg=what)


class FixedGamma:
    """A test double for a controller policy: always the same γ (0 = plain AR)."""

    def __init__(self, gamma: int):
        self.gamma = gamma

    def gammas(self):
        return (self.gamma,)

    def start_rollout(self):
        pass

    def choose(self, batch_bucket, active, mean_context):
        return self.gamma

    def observe(self, record):
        pass

    def end_rollout(self):
        pass


def slow_after(values, keep: int = 1):
    """Parametrize values whose first `keep` run in the fast lane (`-m "not slow"`); the others are marked
    slow (the README's full command runs every one). Tuples are unpacked for multi-name parametrize."""
    return [v if i < keep else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
            for i, v in enumerate(values)]
