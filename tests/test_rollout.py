"""SpecRollout: the public object. Real-model greedy equality and log-prob exactness on SmolLM2, memory,
update_params, and bad input (each refused with a clear ValueError before anything is jitted)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import er_jax
from er_jax.rollout import SpecRollout
from tests.helpers import tiny_model

CHAT = ["What is the capital of France?", "Write a haiku about autumn.", "What is 12 times 7?",
        "Name three colors.", "Explain what a CPU does.", "Say hello in German.",
        "What is the boiling point of water?", "Give me a synonym for happy."]


@pytest.fixture(scope="module")
def smol_ids(smollm2):
    return [smollm2.tokenizer.chat([{"role": "user", "content": p}]) for p in CHAT]


@pytest.mark.slow
def test_smollm2_greedy_speculative_equals_plain(smollm2, smol_ids):
    m = smollm2
    # The stacked layout compiles several times faster than the CPU default (unstacked); both layouts run the
    # same math (tests/test_engine.py checks they agree on tiny models).
    kw = dict(max_batch=8, max_prompt_len=max(map(len, smol_ids)), max_new_tokens=64, layout="stacked")
    rc = er_jax.RolloutConfig(temperature=0.0)
    force = [64] * 8
    ref = SpecRollout(m.config, m.weights, mode="ar", **kw).generate(smol_ids, rc, min_new_tokens=force)
    assert (ref.lengths == 64).all()
    for scheme in ("int4", "int8"):
        for gamma in (1, 3, 7):
            r = SpecRollout(m.config, m.weights, mode="sd", drafter=scheme, draft_length=gamma, **kw)
            out = r.generate(smol_ids, rc, min_new_tokens=force)
            np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=f"{scheme} γ={gamma}")
            assert out.stats["tau"] > 1.5  # the self-drafter really is accepted on a real model


@pytest.mark.slow
def test_smollm2_logprobs_match_teacher_forcing(smollm2, smol_ids):
    m = smollm2
    rc = er_jax.RolloutConfig(temperature=1.0, top_p=0.95, seed=3)
    for mode in ("ar", "sd"):
        r = SpecRollout(m.config, m.weights, mode=mode, draft_length=4, max_batch=4,
                        max_prompt_len=max(map(len, smol_ids)), max_new_tokens=24, layout="stacked")
        out = r.generate(smol_ids[:4], rc)
        for i in range(4):
            n = int(out.lengths[i])
            want = r.get_per_token_logps(smol_ids[i], out.tokens[i, :n], temperature=1.0, top_p=0.95)
            np.testing.assert_allclose(out.logprobs[i, :n], want[0], atol=1e-4)
        # The same seed gives the same rollout, bit for bit: tokens and log-probs (the native kernels' sums do not
        # depend on which thread ran what; before 2026-12-07 the K split of this layout's matmuls made them).
        again = r.generate(smol_ids[:4], rc)
        np.testing.assert_array_equal(again.tokens, out.tokens)
        np.testing.assert_array_equal(again.logprobs, out.logprobs)


@pytest.mark.slow
def test_kv_cache_identical_in_ar_and_sd_and_drafter_bytes():
    cfg, w = tiny_model(hidden_size=256, intermediate_size=384, head_dim=64)
    kw = dict(max_batch=4, max_prompt_len=8, max_new_tokens=8)
    ar = SpecRollout(cfg, w, mode="ar", **kw)
    sd = SpecRollout(cfg, w, mode="sd", draft_length=3, **kw)
    assert ar.kv_cache_bytes == sd.kv_cache_bytes
    assert ar.drafter_bytes == 0 and 0 < sd.drafter_bytes
    out = sd.generate([[1, 2, 3]], er_jax.RolloutConfig(max_new_tokens=4))
    assert out.stats["kv_cache_bytes"] == ar.kv_cache_bytes and out.stats["drafter_bytes"] == sd.drafter_bytes


# unstacked: the layers unrolled, a slow compile
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["stacked", pytest.param("unstacked", marks=pytest.mark.slow)])
def test_greedy_speculative_equals_plain_in_both_layouts(layout):
    cfg, w = tiny_model(seed=3, scale=0.5)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [1], [2, 3, 4, 5, 6, 7, 8]]
    kw = dict(max_batch=4, max_prompt_len=8, max_new_tokens=10, layout=layout)
    rc = er_jax.RolloutConfig(temperature=0.0)
    ref = SpecRollout(cfg, w, mode="ar", **kw).generate(prompts, rc)
    out = SpecRollout(cfg, w, mode="sd", draft_length=3, **kw).generate(prompts, rc)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    # f32 log-probs from 1-row decode vs multi-row verify steps: other kernels, other f32 summation orders
    # (seen: 1.1e-5 on the Intel VM of 2026-12-02, identical with the avx512 path forced); 5e-5 is still
    # ~1000x below any log-prob gap a wrong token or position would make.
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=5e-5)
    assert out.stats["sd_steps"] > 0


def test_update_params_rederives_and_refuses_bad_weights():
    cfg, w = tiny_model()
    r = SpecRollout(cfg, w, mode="sd", draft_length=2, max_batch=2, max_prompt_len=4, max_new_tokens=4,
                    layout="stacked")
    old = r.drafter["layers"]["wq"].scale
    w2 = jax.tree_util.tree_map(lambda a: a * 1.5, w)
    r.update_params(w2)
    assert not np.allclose(r.drafter["layers"]["wq"].scale, old) and len(r.derive_seconds) == 2
    nan = {**w, "embed": w["embed"].at[0, 0].set(jnp.nan)}
    with pytest.raises(ValueError, match="non-finite"):
        r.update_params(nan)
    with pytest.raises(ValueError, match="has shape"):
        r.update_params({**w, "final_norm": w["final_norm"][:-1]})


@pytest.mark.slow
def test_warmup_precompiles_everything():
    cfg, w = tiny_model()
    r = SpecRollout(cfg, w, mode="sd", draft_length=2, max_batch=4, max_prompt_len=8, max_new_tokens=6)
    rc = er_jax.RolloutConfig(seed=1)
    assert r.warmup(rc) > 0
    n = r.compile_count
    for seed in range(3):
        r.generate([[1, 2], [3, 4, 5], [6]], er_jax.RolloutConfig(seed=seed))
    assert r.compile_count == n


@pytest.mark.parametrize("prompts,rc,match", [
    ([], None, "empty"),
    ([[1, 2], []], None, "prompt 1 is empty"),
    ([[1, 64]], None, "outside the vocabulary"),
    ([[1, -1]], None, "outside the vocabulary"),
    ([[1] * 9], None, "max_prompt_len"),
    ([[1]] * 5, None, "max_batch"),
    (["text"], None, "tokenizer"),
    ([[1]], dict(max_new_tokens=100), "exceeds"),
])
def test_bad_prompts(prompts, rc, match):
    cfg, w = tiny_model()
    r = SpecRollout(cfg, w, mode="ar", max_batch=4, max_prompt_len=8, max_new_tokens=8)
    with pytest.raises(ValueError, match=match):
        r.generate(prompts, er_jax.RolloutConfig(**(rc or {})))


@pytest.mark.parametrize("kw,match", [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                                      (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k")])
def test_bad_rollout_config(kw, match):
    with pytest.raises(ValueError, match=match):
        er_jax.RolloutConfig(**kw)


@pytest.mark.parametrize("kw,match", [(dict(mode="fast"), "mode"), (dict(drafter="int2"), "drafter"),
                                      (dict(draft_length=17), "draft_length"),
                                      (dict(max_new_tokens=0), "max_new_tokens"), (dict(kernels="cuda"), "kernels")])
def test_bad_rollout_construction(kw, match):
    cfg, w = tiny_model()
    args = dict(max_batch=2, max_prompt_len=4, max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        SpecRollout(cfg, w, **args)


def test_mis_shaped_weights_refused_at_construction():
    cfg, w = tiny_model()
    with pytest.raises(ValueError, match="has shape"):
        SpecRollout(cfg.replace(hidden_size=32), w, max_batch=2, max_prompt_len=4, max_new_tokens=4)


@pytest.mark.slow
def test_pallas_kernels_end_to_end_equal_xla():
    """Greedy SD through the Pallas kernels (interpret mode on CPU) gives the XLA path's tokens and log-probs."""
    cfg, w = tiny_model(seed=2, scale=0.5)
    kw = dict(mode="sd", draft_length=2, max_batch=2, max_prompt_len=4, max_new_tokens=6)
    prompts = [[1, 2, 3], [4]]
    rc = er_jax.RolloutConfig(temperature=0.0)
    outs = {k: SpecRollout(cfg, w, kernels=k, **kw).generate(prompts, rc) for k in ("xla", "pallas")}
    np.testing.assert_array_equal(outs["pallas"].tokens, outs["xla"].tokens)
    np.testing.assert_allclose(outs["pallas"].logprobs, outs["xla"].logprobs, atol=1e-4)
    assert outs["pallas"].stats["kernels"] == "pallas" and outs["pallas"].stats["sd_steps"] > 0


@pytest.mark.slow
def test_forced_acceptance_is_a_bench_only_bernoulli_acceptance():
    from er_jax.controller import expected_tau
    cfg, w = tiny_model(seed=3, scale=0.5)
    with pytest.raises(ValueError, match="forced_acceptance"):
        SpecRollout(cfg, w, mode="sd", max_batch=2, max_prompt_len=4, max_new_tokens=4, forced_acceptance=1.5)
    r = SpecRollout(cfg, w, mode="sd", draft_length=5, max_batch=16, max_prompt_len=4, max_new_tokens=200,
                    forced_acceptance=0.8, layout="stacked")
    out = r.generate([[1, 2, 3]] * 16, er_jax.RolloutConfig(), min_new_tokens=[200] * 16)
    assert (out.lengths == 200).all() and out.stats["forced_acceptance"] == 0.8
    # ~900 row-steps: the standard error of τ is about 0.06; allow 5 of them.
    assert abs(out.stats["tau"] - expected_tau(0.8, 5)) < 0.3, out.stats["tau"]
    assert all(abs(a - 0.8) < 0.06 for a in out.stats["acceptance_per_position"][:3])
