"""The decode engine: buckets, compaction, EOS / max_new_tokens, log-probs, compile counts, memory."""
import jax.numpy as jnp
import numpy as np
import pytest

from er_jax.config import SamplingConfig
from er_jax.engine import Engine, batch_bucket, batch_buckets, distinct_prompts, prompt_bucket, shared_prefix
from er_jax.model import forward
from er_jax.quant import derive_drafter
from er_jax.sampling import reported_log_probs, token_logprob
from tests.helpers import FixedGamma, tiny_model

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [1], [2, 3, 4, 5, 6, 7, 8], [9, 9], [4] * 11]


def run(eng, w, d, prompts, sc, gamma, *, max_new=12, min_new=0, eos=(3,), seed=0):
    n = len(prompts)
    return eng.run(w, d, prompts, sc, seed=seed, eos_ids=eos, max_new=np.full(n, max_new, np.int32),
                   min_new=np.full(n, min_new, np.int32), policy=FixedGamma(gamma))


@pytest.fixture(scope="module")
def model():
    cfg, w = tiny_model(seed=3, scale=0.5)
    return cfg, w, derive_drafter(w, "int4")


def check_logprobs(cfg, w, prompts, out, sc, tol=1e-4):
    """Every emitted log-prob equals the teacher-forced recomputation of the final sequence."""
    for i, p in enumerate(prompts):
        n = int(out.lengths[i])
        seq = jnp.asarray([p + [int(t) for t in out.tokens[i, :n]]])
        lp = token_logprob(reported_log_probs(forward(cfg, w, seq)[:, len(p) - 1:-1], sc),
                           jnp.asarray(out.tokens[i:i + 1, :n]))
        np.testing.assert_allclose(np.asarray(lp)[0], out.logprobs[i, :n], atol=tol)


def test_bucket_maps():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    # above 16 rows also 1.5x the powers of two
    assert [batch_bucket(n) for n in (17, 24, 25, 33, 48, 49, 65, 97)] == [24, 24, 32, 48, 48, 64, 96, 128]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 24, 32, 48]
    assert [prompt_bucket(n) for n in (1, 16, 17, 24, 25, 33, 48, 49, 100, 129)] == [16, 16, 24, 24, 32, 48, 48, 64,
                                                                                    128, 192]


@pytest.mark.slow  # the fast lane's log-prob check: test_native_engine.py::test_logprobs_match_teacher_forced
@pytest.mark.parametrize("gamma", [0, 3])
@pytest.mark.parametrize("sc", [SamplingConfig(1.0), SamplingConfig(0.7, top_k=5, top_p=0.9), SamplingConfig(0.0)])
def test_logprobs_are_teacher_forced(model, gamma, sc):
    cfg, w, d = model
    eng = Engine(cfg, max_batch=8, max_prompt_len=12, max_new_tokens=12)
    out = run(eng, w, d, PROMPTS, sc, gamma)
    check_logprobs(cfg, w, PROMPTS, out, sc)


@pytest.mark.slow
def test_greedy_speculative_equals_plain(model):
    cfg, w, _ = model
    eng = Engine(cfg, max_batch=8, max_prompt_len=12, max_new_tokens=12)
    ref = run(eng, w, None, PROMPTS, SamplingConfig(0.0), 0)
    for scheme in ("int4", "int8"):
        d = derive_drafter(w, scheme)
        for gamma in (1, 3, 7):
            out = run(eng, w, d, PROMPTS, SamplingConfig(0.0), gamma)
            np.testing.assert_array_equal(out.tokens, ref.tokens)
            np.testing.assert_array_equal(out.lengths, ref.lengths)
            assert out.stats["sd_steps"] > 0


@pytest.mark.slow
def test_eos_and_max_new_tokens(model):
    cfg, w, d = model
    eng = Engine(cfg, max_batch=8, max_prompt_len=12, max_new_tokens=12)
    for gamma in (0, 3):
        out = run(eng, w, d, PROMPTS, SamplingConfig(1.0), gamma, max_new=9, eos=(3, 7, 11), seed=4)
        for i in range(len(PROMPTS)):
            toks = list(out.tokens[i, : out.lengths[i]])
            assert 1 <= len(toks) <= 9
            eos_at = [j for j, t in enumerate(toks) if t in (3, 7, 11)]
            # a row stops at its first EOS (kept as its last token) or at max_new_tokens
            assert eos_at == [] and len(toks) == 9 or eos_at == [len(toks) - 1]
            assert (out.tokens[i, out.lengths[i]:] == 0).all() and (out.logprobs[i, out.lengths[i]:] == 0).all()
        forced = run(eng, w, d, PROMPTS, SamplingConfig(1.0), gamma, max_new=9, min_new=9, eos=(3, 7, 11), seed=4)
        assert (forced.lengths == 9).all()


@pytest.mark.slow
def test_rows_do_not_depend_on_the_batch_they_sit_in(model):
    """Per-row PRNG: a row's AR sample is the same alone or in a batch (up to float noise in argmax ties)."""
    cfg, w, d = model
    eng = Engine(cfg, max_batch=8, max_prompt_len=12, max_new_tokens=12)
    full = run(eng, w, d, PROMPTS, SamplingConfig(1.0), 0, seed=9)
    alone = run(eng, w, d, PROMPTS[:1], SamplingConfig(1.0), 0, seed=9)
    np.testing.assert_array_equal(full.tokens[0], alone.tokens[0])


def test_rows_sharing_a_prompt_are_prefilled_once(model):
    """GRPO's G samples of a prompt: prefill runs once per distinct prompt (the step's prompt batch is the
    distinct prompts' bucket), each row gets its prompt's cache entries (the emitted log-probs equal a
    teacher-forced recomputation of every row) and its own key (greedy rows of one prompt agree with the
    prompt decoded alone)."""
    cfg, w, d = model
    a, b, c = PROMPTS[1], PROMPTS[3], PROMPTS[0]
    prompts = [a, b, a, a, c, b]  # 6 rows (bucket 8, two padding slots), 3 distinct prompts (bucket 4)
    distinct, src = distinct_prompts(prompts)
    assert distinct == [a, b, c] and src.tolist() == [0, 1, 0, 0, 2, 1]
    eng = Engine(cfg, max_batch=8, max_prompt_len=12, max_new_tokens=12)
    for gamma in (0, 3):
        out = run(eng, w, d, prompts, SamplingConfig(1.0), gamma, seed=5)
        check_logprobs(cfg, w, prompts, out, SamplingConfig(1.0))
    prefills = {shapes[-3][0] for (kind, *_), shapes in eng._signatures if kind == "prefill"}  # prompts, lens, src
    assert prefills == {(4, prompt_bucket(len(b)))}, prefills  # (distinct bucket, prompt bucket), not 8 rows
    greedy = run(eng, w, d, prompts, SamplingConfig(0.0), 0)
    for i, p in enumerate(prompts):
        alone = run(eng, w, d, [p], SamplingConfig(0.0), 0)
        np.testing.assert_array_equal(greedy.tokens[i], alone.tokens[0])
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        eng.warmup(w, d, (0,), SamplingConfig(1.0), (3,), group_size=0)


def test_shared_prefix_counts():
    """Hand-counted: chat-like prompts (30 shared tokens + 6-14 of their own) feed the 30 once (32 + 16 x 16
    positions instead of 16 x 48); never all of a prompt; not where it saves nothing or does not fit."""
    head = list(range(100, 130))
    chat = [head + [200 + n] * n for n in range(6, 15)] * 2  # 18 prompts (distinct or not: same answer)
    assert shared_prefix(chat, 16, 512) == 30
    assert shared_prefix(chat, 16, 47) == 0  # 32 + 16 positions do not fit a 47-position cache
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]], 2, 64) == 0  # 2 tokens: 16 + 2 x 16 > 2 x 16
    assert shared_prefix([head, head + [7]], 2, 512) == 0  # 29 shared: 32 + 2 x 16 = 2 x 32
    assert shared_prefix([head + [7], head + [7, 8]] * 4, 8, 512) == 30  # capped: each keeps >= 1 token
    assert shared_prefix([head + [1]], 1, 512) == 0  # one prompt
    assert shared_prefix([[1] + head, [2] + head], 2, 512) == 0  # first tokens differ


def test_shared_prefix_is_fed_once(model):
    """Prompts opening with the same 20 tokens: the prefill feeds those once ([1, 24] prefix) and every row
    still carries its own prompt: emitted log-probs equal a teacher-forced recomputation of each whole
    sequence, greedy rows equal their prompt decoded alone (no prefix to share), and warmup(prompts=)
    compiles that prefill."""
    cfg, w, d = model
    head = [int(t) for t in np.random.default_rng(0).integers(1, cfg.vocab_size, 20)]
    prompts = [head + [5], head + [8, 9, 10], head + [2, 3], head + [5], head + [4] * 6]
    assert shared_prefix(distinct_prompts(prompts)[0], 4, 64) == 20
    eng = Engine(cfg, max_batch=8, max_prompt_len=26, max_new_tokens=10)
    added = eng.warmup(w, d, (0, 3), SamplingConfig(1.0), (3,), prompts=prompts)
    prefix_shapes = {shape for (kind, *_), shapes in eng._signatures if kind == "prefill" for shape, _ in shapes}
    assert (1, prompt_bucket(20)) in prefix_shapes and added > 0
    warm = eng.compile_count
    for gamma in (0, 3):
        out = run(eng, w, d, prompts, SamplingConfig(1.0), gamma, seed=4, max_new=10)
        check_logprobs(cfg, w, prompts, out, SamplingConfig(1.0))
    assert eng.compile_count == warm, "warmup(prompts=) missed a shape"
    greedy = run(eng, w, d, prompts, SamplingConfig(0.0), 0, max_new=10)
    for i, p in enumerate(prompts):
        alone = run(eng, w, d, [p], SamplingConfig(0.0), 0, max_new=10)
        np.testing.assert_array_equal(greedy.tokens[i], alone.tokens[0])


@pytest.mark.slow
def test_compaction_and_compile_count(model):
    cfg, w, d = model
    eng = Engine(cfg, max_batch=8, max_prompt_len=12, max_new_tokens=12)
    prompts = PROMPTS + [[7, 7]]
    out = run(eng, w, d, prompts, SamplingConfig(1.0), 2, eos=(3, 5, 9), seed=1)
    active = out.stats["active_per_step"]
    assert active[0] <= 7 and min(active) < 4, active  # rows finish at different steps
    count = eng.compile_count
    assert count <= 1 + 4 + 3 * 2  # prefill + SD per bucket (8,4,2,1) + compactions
    # Compile every bucket, step and compaction up front; then rollouts under other seeds (whose rows finish at
    # other steps, so they compact differently) must not compile anything.
    eng.warmup(w, d, (2,), SamplingConfig(1.0), (3, 5, 9), prompt_lens=[len(p) for p in prompts])
    warm = eng.compile_count
    lengths = {tuple(out.lengths)}
    for seed in (2, 3, 4):
        lengths.add(tuple(run(eng, w, d, prompts, SamplingConfig(1.0), 2, eos=(3, 5, 9), seed=seed).lengths))
        assert eng.compile_count == warm, f"seed {seed} compiled something new"
    assert len(lengths) > 1  # the seeds really changed the rollouts


def test_kv_budget_is_enforced_up_front():
    cfg, _ = tiny_model()
    eng = Engine(cfg, max_batch=4, max_prompt_len=16, max_new_tokens=32, max_draft=16)
    assert eng.max_len == 16 + 32 + 17 and eng.kv_bytes == 2 * 4 * eng.max_len * 2 * 2 * 16 * 4
    with pytest.raises(ValueError, match="KV cache needs"):
        Engine(cfg, max_batch=4, max_prompt_len=16, max_new_tokens=32, kv_budget_bytes=eng.kv_bytes - 1)
