"""Tiny models and statistics shared by the tests."""
import jax
import numpy as np
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
