"""Sequence-level losslessness: the joint law of whole sampled continuations under speculative decoding
equals the exact law computed by teacher forcing (chi-square over all 3-token continuations, p > 1e-4)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from er_jax.config import SamplingConfig
from er_jax.engine import Engine
from er_jax.execution import Execution
from er_jax.kernels import native
from er_jax.model import forward, init_weights, unstack_layers
from er_jax.quant import derive_drafter
from er_jax.sampling import log_probs
from tests.helpers import FixedGamma, chi2_pvalue, tiny_config

V, T, N = 8, 3, 20_000
PROMPT = [1, 4, 2]


@pytest.fixture(scope="module")
def toy():
    cfg = tiny_config(vocab_size=V, hidden_size=32, intermediate_size=48, num_heads=2, num_kv_heads=1,
                      head_dim=16, eos_ids=())
    return cfg, init_weights(cfg, jax.random.key(11), scale=0.6)


def exact_joint(cfg, w, sc):
    """P(t1 t2 t3 | PROMPT) for all V^3 continuations, from teacher-forced forward passes."""
    seqs = np.array([PROMPT + list(c) for c in itertools.product(range(V), repeat=T)], np.int32)
    lp = log_probs(forward(cfg, w, jnp.asarray(seqs)), sc)  # [V^3, len, V]
    steps = [np.asarray(lp[np.arange(len(seqs)), len(PROMPT) - 1 + i, seqs[:, len(PROMPT) + i]]) for i in range(T)]
    return np.exp(sum(steps))


def sample_joint(cfg, w, drafter, sc, gamma, ex=Execution()):
    eng = Engine(cfg, max_batch=N, max_prompt_len=len(PROMPT), max_new_tokens=T, max_draft=gamma, ex=ex)
    out = eng.run(w, drafter, [PROMPT] * N, sc, seed=gamma, eos_ids=(), max_new=np.full(N, T, np.int32),
                  min_new=np.zeros(N, np.int32), policy=FixedGamma(gamma))
    assert (out.lengths == T).all()
    idx = (out.tokens[:, 0] * V + out.tokens[:, 1]) * V + out.tokens[:, 2]
    return np.bincount(idx, minlength=V ** T), out


CASES = [("int4", g, SamplingConfig(1.0)) for g in (1, 2, 3)] + \
        [("int8", g, SamplingConfig(1.0)) for g in (1, 2, 3)] + \
        [("int4", 2, SamplingConfig(1.0, top_p=0.8)), ("int8", 3, SamplingConfig(0.8, top_k=4, top_p=0.9))]


@pytest.mark.slow
@pytest.mark.parametrize("scheme,gamma,sc", CASES)
def test_joint_law_of_continuations(toy, scheme, gamma, sc):
    cfg, w = toy
    counts, out = sample_joint(cfg, w, derive_drafter(w, scheme), sc, gamma)
    assert out.stats["sd_steps"] > 0 and out.stats["ar_steps"] == 0
    assert chi2_pvalue(counts, exact_joint(cfg, w, sc)) > 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.why_unavailable()}")
@pytest.mark.parametrize("scheme,gamma,sc", [CASES[4], CASES[-1]])
def test_joint_law_on_the_native_backend(toy, scheme, gamma, sc):
    """The same law through the native backend (its kernels, and its inverse-CDF sampler for drafts,
    corrections and plain steps); p > 1e-4 per case."""
    cfg, w = toy
    ex = Execution("native", None, "unstacked")
    drafter = unstack_layers(derive_drafter(w, scheme, head="int8"))
    counts, out = sample_joint(cfg, unstack_layers(w), drafter, sc, gamma, ex)
    assert out.stats["sd_steps"] > 0
    assert chi2_pvalue(counts, exact_joint(cfg, w, sc)) > 1e-4


@pytest.mark.slow
def test_joint_law_with_a_bad_drafter(toy):
    """A drafter from unrelated weights rejects often: the residual path carries the law."""
    cfg, w = toy
    other = derive_drafter(init_weights(cfg, jax.random.key(99), scale=0.6), "int8")
    counts, out = sample_joint(cfg, w, other, SamplingConfig(1.0), 3)
    assert out.stats["tau"] < 2.5
    assert chi2_pvalue(counts, exact_joint(cfg, w, SamplingConfig(1.0))) > 1e-4


@pytest.mark.slow
def test_ar_joint_law(toy):
    cfg, w = toy
    counts, _ = sample_joint(cfg, w, None, SamplingConfig(1.0), 0)
    assert chi2_pvalue(counts, exact_joint(cfg, w, SamplingConfig(1.0))) > 1e-4
