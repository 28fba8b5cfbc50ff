"""Pallas kernels (interpret mode on CPU) against their references.

Tolerances: f32 outputs within 2e-5 of the reference, relative to the output's largest magnitude;
bf16 outputs within 2 bf16 ulps (2 * 2^-8) of it. The rejection kernel draws the reference's uniforms
and Gumbel noise from the same keys, so its accept counts and tokens must equal the reference's exactly,
and its log-probs agree to 1e-5; it also passes the reference's chi-square suite (p > 1e-4).
Interpret mode copies whole arrays per grid step, so shapes stay tiny.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from er_jax.cache import KVCache, init_cache
from er_jax.config import ModelConfig, SamplingConfig
from er_jax.execution import Execution
from er_jax.kernels.attention import attention_reference, ragged_attention
from er_jax.kernels.quant_matmul import quant_matmul, quant_matmul_reference
from er_jax.kernels.rejection import rejection_sample, rejection_sample_reference
from er_jax.model import forward, init_weights
from er_jax.quant import derive_drafter, quantize_int4, quantize_int8
from er_jax.sampling import filter_logits, log_probs
from tests.helpers import N_SAMPLES as N
from tests.helpers import P_MIN, V, check_speculative_samples, chi2_pvalue, rejection_pairs
from tests.helpers import log_or_neg_inf as _log
from tests.helpers import slow_after

PAIRS = rejection_pairs()

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2 * 2.0 ** -8}


def assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= TOL[dtype] * scale, f"max error {err} > {TOL[dtype]} * {scale}"


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


# ----------------------------------------------------------------------------- quantized matmul

QM_CASES = [  # (x shape, N, dtype, kwargs)
    ((1, 576), 96, jnp.float32, {}),  # decode M = 1, K = 576 not a multiple of 128
    ((5, 160), 50, jnp.bfloat16, {}),  # N without a power-of-two block: padded path
    ((33, 256), 64, jnp.float32, dict(block_m=16, block_n=32)),  # several M and N blocks
    ((2, 3, 300), 40, jnp.float32, {}),  # leading dims, K = 300
    ((7, 256), 96, jnp.bfloat16, dict(split_k=2, block_k=128)),  # f32 partials summed over K splits
    ((1, 64), 16, jnp.bfloat16, {}),  # K smaller than one group
]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("case", slow_after(range(len(QM_CASES)), keep=2))
def test_quant_matmul_matches_reference(scheme, case):
    shape, n, dtype, kw = QM_CASES[case]
    if scheme == "int4" and "block_k" in kw:
        kw = {**kw, "block_k": 128}
    w = _normal(case, (shape[-1], n)) * jnp.linspace(0.5, 2.0, n)
    qa = quantize_int4(w) if scheme == "int4" else quantize_int8(w)
    x = _normal(100 + case, shape, dtype)
    y = quant_matmul(x, qa, interpret=True, **kw)
    assert y.shape == (*shape[:-1], n) and y.dtype == dtype
    assert_close(y, quant_matmul_reference(x, qa), dtype)


def test_quant_matmul_takes_bf16_activations():
    """The Pallas kernel and XLA's dequantize-and-dot multiply f32 x rounded to bf16 (the paper's 16-bit
    activations), as the reference does: their results on x and on its rounding are the same bits, and
    differ measurably from the reference's product of x itself."""
    from er_jax.kernels.quant_matmul import dequant_matmul
    from er_jax.quant import dequantize
    from tests.test_quant import bf16_round_numpy
    x = np.asarray(_normal(3, (4, 256)))
    xr = jnp.asarray(bf16_round_numpy(x))
    for qa in (quantize_int4(_normal(4, (256, 64))), quantize_int8(_normal(4, (256, 64)))):
        for op in (functools.partial(quant_matmul, interpret=True), dequant_matmul, quant_matmul_reference):
            np.testing.assert_array_equal(np.asarray(op(jnp.asarray(x), qa)), np.asarray(op(xr, qa)))
        unrounded = jnp.einsum("mk,kn->mn", jnp.asarray(x), dequantize(qa), precision=jax.lax.Precision.HIGHEST)
        assert float(jnp.abs(quant_matmul_reference(jnp.asarray(x), qa) - unrounded).max()) > 100 * TOL[jnp.float32]


@pytest.mark.slow
def test_quant_matmul_reads_a_layer_of_a_stacked_weight_in_a_scan():
    """`layer=i` on stacked [L, K, N] weights (traced inside a scan) equals the per-layer product."""
    w, x = _normal(0, (3, 200, 48)), _normal(1, (3, 200))
    for qa in (quantize_int4(w), quantize_int8(w)):
        per_layer = [jax.tree_util.tree_map(lambda a, i=i: a[i], qa) for i in range(3)]
        scan = jax.jit(lambda x, qa: jax.lax.scan(
            lambda c, i: (c, quant_matmul(x, qa, layer=i, interpret=True)), 0, jnp.arange(3))[1])
        got = scan(x, qa)
        for i in range(3):
            assert_close(got[i], quant_matmul_reference(x, per_layer[i]), jnp.float32)


def test_quant_matmul_rejects_bad_input():
    qa = quantize_int4(_normal(0, (256, 32)))
    x = _normal(1, (2, 256))
    with pytest.raises(ValueError, match="last axis"):
        quant_matmul(_normal(1, (2, 255)), qa)
    with pytest.raises(ValueError, match="stacked"):
        quant_matmul(x, quantize_int4(_normal(0, (2, 256, 32))))
    with pytest.raises(ValueError, match="power of two"):
        quant_matmul(x, qa, block_n=48)
    with pytest.raises(ValueError, match="block_k"):
        quant_matmul(x, qa, block_k=256)
    with pytest.raises(ValueError, match="QuantArray"):
        quant_matmul(x, _normal(0, (256, 32)))
    with pytest.raises(ValueError, match="out of range"):
        quant_matmul(x, quantize_int4(_normal(0, (2, 256, 32))), layer=2)


# ----------------------------------------------------------------------------- attention

ATT_CASES = [  # (B, T, H, KV, hd, S, dtype, block_s, num_splits, lengths)
    (1, 1, 4, 2, 16, 40, jnp.float32, None, None, [0]),  # decode, length 0, S not a multiple of the tile
    (3, 4, 4, 1, 16, 64, jnp.float32, 16, 3, [0, 12, 13]),  # verify γ = 3; last positions at block edges 15/16
    (2, 9, 8, 2, 16, 100, jnp.float32, 32, 2, [91, 40]),  # γ = 8, row 0 reaches the last position S - 1
    (2, 3, 6, 3, 32, 7, jnp.bfloat16, None, None, [4, 1]),  # a cache shorter than one tile, G = 2
    (64, 2, 2, 1, 16, 24, jnp.bfloat16, 16, 2, None),  # B = 64, random lengths
    (2, 1, 4, 2, 16, 48, jnp.float32, 16, 1, [47, 16]),  # one split (normalized in the kernel), length at max
    (2, 80, 4, 2, 16, 96, jnp.float32, 16, 2, [0, 16]),  # prefill-like: 160 query rows -> two 128-row tiles
]


@pytest.mark.parametrize("case", slow_after(range(len(ATT_CASES))))
def test_ragged_attention_matches_reference(case):
    b, t, h, kv, hd, s, dtype, bs, splits, lengths = ATT_CASES[case]
    q, k, v = (_normal(10 * case + i, shape, dtype) for i, shape in
               enumerate([(b, t, h, hd), (b, s, kv, hd), (b, s, kv, hd)]))
    if lengths is None:
        lengths = jax.random.randint(jax.random.key(case), (b,), 0, s - t + 1)
    q_pos = jnp.asarray(lengths, jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)
    out = ragged_attention(q, k, v, q_pos, block_s=bs, num_splits=splits, interpret=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, attention_reference(q, k, v, q_pos), dtype)


def test_ragged_attention_skips_blocks_past_the_longest_row():
    """Cache blocks wholly beyond max(q_pos[b]) are never read: poison them with NaN."""
    b, t, h, kv, hd, s, bs = 2, 2, 4, 2, 16, 96, 16
    q, k, v = _normal(0, (b, t, h, hd)), _normal(1, (b, s, kv, hd)), _normal(2, (b, s, kv, hd))
    q_pos = jnp.array([[5, 6], [30, 31]], jnp.int32)
    first_unread = (np.asarray(q_pos).max(1) // bs + 1) * bs  # [16, 32]
    poison = jnp.arange(s)[None, :, None, None] >= jnp.asarray(first_unread)[:, None, None, None]
    out = ragged_attention(q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v), q_pos,
                           block_s=bs, num_splits=3, interpret=True)
    assert_close(out, attention_reference(q, k, v, q_pos), jnp.float32)


def test_ragged_attention_reads_a_layer_of_the_stacked_cache_in_a_scan():
    """`layer=i` on the stacked [L, B, S, KV, hd] cache (traced inside a scan) equals attention over k[i]."""
    n_layers, b, t, h, kv, hd, s = 3, 2, 3, 4, 2, 16, 40
    q, k, v = _normal(0, (b, t, h, hd)), _normal(1, (n_layers, b, s, kv, hd)), _normal(2, (n_layers, b, s, kv, hd))
    q_pos = jnp.array([[5, 6, 7], [30, 31, 32]], jnp.int32)
    scan = jax.jit(lambda q, k, v: jax.lax.scan(
        lambda c, i: (c, ragged_attention(q, k, v, q_pos, layer=i, block_s=16, interpret=True)), 0,
        jnp.arange(n_layers))[1])
    got = scan(q, k, v)
    for i in range(n_layers):
        assert_close(got[i], attention_reference(q, k[i], v[i], q_pos), jnp.float32)


def test_ragged_attention_rejects_bad_input():
    q, k = _normal(0, (2, 1, 4, 16)), _normal(1, (2, 8, 2, 16))
    pos = jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(ValueError, match="multiple of KV"):
        ragged_attention(_normal(0, (2, 1, 3, 16)), k, k, pos)
    with pytest.raises(ValueError, match="q_pos"):
        ragged_attention(q, k, k, jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="same shape"):
        ragged_attention(q, k, k[:, :4], pos)
    with pytest.raises(ValueError, match="batch or head_dim"):
        ragged_attention(q, k[:1], k[:1], pos)
    with pytest.raises(ValueError, match="L, B, S, KV, hd"):
        ragged_attention(q, k, k, pos, layer=0)
    with pytest.raises(ValueError, match="out of range"):
        ragged_attention(q, k[None], k[None], pos, layer=1)


# ----------------------------------------------------------------------------- rejection sampling

REJ_CASES = [  # (SamplingConfig, B, γ, V, block_v, num_splits)
    (SamplingConfig(1.0), 4, 3, 37, 8, 2),  # V not a multiple of the tile
    (SamplingConfig(1.0), 64, 1, 20, 8, None),
    (SamplingConfig(0.0), 64, 2, 50, 16, None),  # greedy
    (SamplingConfig(0.0), 1, 8, 100, 32, 3),
    (SamplingConfig(0.7, top_k=5), 3, 5, 37, 8, 2),
    (SamplingConfig(1.3, top_p=0.8), 1, 8, 100, 32, None),
    (SamplingConfig(0.9, top_k=20, top_p=0.9), 2, 7, 64, 16, 2),
]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))  # jitted test helpers: fewer compiles
def _draft(seed, b, gamma, v, sc, close=True):
    """Target logits, drafter logits near them (or not) and draft tokens sampled from the drafter."""
    ks = jax.random.split(jax.random.key(seed), 3)
    t = 2 * jax.random.normal(ks[0], (b, gamma + 1, v))
    d = (t[:, :gamma] if close else 0) + jax.random.normal(ks[1], (b, gamma, v))
    draft_sc = sc if not sc.greedy else SamplingConfig(1.0)  # greedy: still let some drafts be wrong
    tok = jax.random.categorical(ks[2], log_probs(d, draft_sc), axis=-1).astype(jnp.int32)
    return t, d, tok


_reference = jax.jit(rejection_sample_reference, static_argnames="sc")


def _same_as_reference(got, want):
    n, tok, lp = map(np.asarray, got)
    n_r, tok_r, lp_r = map(np.asarray, want)
    np.testing.assert_array_equal(n, n_r)
    np.testing.assert_array_equal(tok, tok_r)
    np.testing.assert_array_equal(np.isfinite(lp), np.isfinite(lp_r))
    np.testing.assert_allclose(np.where(np.isfinite(lp), lp, 0), np.where(np.isfinite(lp_r), lp_r, 0), atol=1e-5)


@pytest.mark.parametrize("case", slow_after(range(len(REJ_CASES))))
def test_rejection_sample_equals_reference_on_the_same_keys(case):
    sc, b, gamma, v, bv, splits = REJ_CASES[case]
    t, d, tok = _draft(case, b, gamma, v, sc)
    keys = jax.random.split(jax.random.key(1000 + case), b)
    got = rejection_sample(t, d, tok, sc, keys, block_v=bv, num_splits=splits, interpret=True)
    _same_as_reference(got, _reference(t, d, tok, sc=sc, keys=keys))
    n = np.asarray(got[0])
    assert got[0].dtype == jnp.int32 and got[1].dtype == jnp.int32 and got[2].dtype == jnp.float32
    assert 0 <= n.min() and n.max() <= gamma


@pytest.mark.slow
def test_rejection_sample_bf16_logits_and_far_drafts():
    sc = SamplingConfig(1.0, top_k=8)
    t, d, tok = _draft(7, 8, 4, 40, sc, close=False)
    t, d = t.astype(jnp.bfloat16), d.astype(jnp.bfloat16)
    keys = jax.random.split(jax.random.key(3), 8)
    got = rejection_sample(t, d, tok, sc, keys, block_v=16, interpret=True)
    _same_as_reference(got, _reference(t, d, tok, sc=sc, keys=keys))


def test_rejection_greedy_accepts_iff_argmax_agrees():
    t = _normal(1, (4, 4, V))
    amax = jnp.argmax(t[:, :3], -1).astype(jnp.int32)
    d_tok = amax.at[1, 1].add(1).at[2, 0].add(1).at[3].add(1) % V
    d = jax.nn.one_hot(d_tok, V) * 10
    n, tok, lp = rejection_sample(t, d, d_tok, SamplingConfig(0.0), jax.random.split(jax.random.key(0), 4),
                                  interpret=True)
    assert list(np.asarray(n)) == [3, 1, 0, 0]
    for b in range(4):
        assert int(tok[b, int(n[b])]) == int(jnp.argmax(t[b, int(n[b])]))
    np.testing.assert_allclose(lp, jnp.take_along_axis(jax.nn.log_softmax(t), tok[..., None], -1)[..., 0], atol=1e-5)


def test_rejection_sample_rejects_bad_input():
    sc, keys = SamplingConfig(1.0), jax.random.split(jax.random.key(0), 2)
    t, d, tok = _draft(0, 2, 3, 10, sc)
    with pytest.raises(ValueError, match="draft_logits"):
        rejection_sample(t, d[:, :2], tok, sc, keys)
    with pytest.raises(ValueError, match="PRNG keys"):
        rejection_sample(t, d, tok, sc, jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="SamplingConfig"):
        rejection_sample(t, d, tok, {"temperature": 1.0}, keys)


CHUNK = 100  # interpret mode copies whole outputs per grid step (quadratic in B): sample in chunks


@functools.partial(jax.jit, static_argnames="sc")
def _run_kernel(key, t_logits, d_logits, sc):
    """The reference suite's sampler (tests/test_rejection.py `_run`) with the kernel, N in chunks."""
    k_draft, k_rej = jax.random.split(key)
    n_rows = t_logits.shape[0]
    d_tok = jax.random.categorical(k_draft, log_probs(d_logits, sc), axis=-1).astype(jnp.int32)
    chunk = lambda a: a.reshape(n_rows // CHUNK, CHUNK, *a.shape[1:])
    args = (chunk(t_logits), chunk(d_logits), chunk(d_tok), chunk(jax.random.split(k_rej, n_rows)))
    out = jax.lax.map(lambda a: rejection_sample(*a[:3], sc, a[3], block_v=4, num_splits=1, interpret=True), args)
    return jax.tree.map(lambda a: a.reshape(n_rows, *a.shape[2:]), out)


@pytest.mark.slow
def test_rejection_kernel_chi_square_suite():
    """tests/test_rejection.py::test_pair_distributions for every pair, sampled by the kernel (γ = 2,
    V = 6 with 4-wide tiles, so the last tile is clamped; split merging is covered above)."""
    for i in range(len(PAIRS)):
        (p0, q0), (p1, q1), (p2, _) = PAIRS[i], PAIRS[(i + 1) % len(PAIRS)], PAIRS[(i + 2) % len(PAIRS)]
        t = np.broadcast_to(np.stack([_log(p0), _log(p1), _log(p2)]), (N, 3, V))
        d = np.broadcast_to(np.stack([_log(q0), _log(q1)]), (N, 2, V))
        n, tok, lp = jax.device_get(_run_kernel(jax.random.key(100 + i), jnp.asarray(t), jnp.asarray(d),
                                                SamplingConfig(1.0)))
        check_speculative_samples(n, tok, lp, (PAIRS[i], PAIRS[(i + 1) % len(PAIRS)], PAIRS[(i + 2) % len(PAIRS)]),
                                  f"pair {i}")


@pytest.mark.slow
@pytest.mark.parametrize("sc", [SamplingConfig(0.7, top_k=3), SamplingConfig(1.3, top_p=0.6),
                                SamplingConfig(0.9, top_k=4, top_p=0.8)])
def test_rejection_kernel_processing_applies_to_p_and_q(sc):
    """The emitted first token follows the processed target distribution (top-k / top-p cutoffs)."""
    rng = np.random.default_rng(7)
    zt = rng.normal(size=(2, V)).astype(np.float32) * 2
    zd = rng.normal(size=(1, V)).astype(np.float32) * 2
    t, d = np.broadcast_to(zt, (N, 2, V)), np.broadcast_to(zd, (N, 1, V))
    n, tok, _ = jax.device_get(_run_kernel(jax.random.key(5), jnp.asarray(t), jnp.asarray(d), sc))
    p0 = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(zt[0]) / sc.temperature, sc.top_k, sc.top_p)))
    assert chi2_pvalue(np.bincount(tok[:, 0], minlength=V), p0) > P_MIN


# ----------------------------------------------------------------------------- end to end

_forward = jax.jit(forward, static_argnames=("config", "ex"))
E2E_CONFIG = ModelConfig(vocab_size=64, hidden_size=160, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, name="tiny-kernels")


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["int4", "int8"])
def test_forward_pallas_equals_xla(drafter):
    """Greedy logits of a tiny random model's derived drafter (Pallas matmul and attention):
    kernels="pallas" vs "xla", without a cache (teacher forcing) and with a ragged cache (verify-style
    T = 4 at the rows' own lengths)."""
    cfg = E2E_CONFIG
    w = derive_drafter(init_weights(cfg, jax.random.key(0), scale=0.3), drafter)
    toks = jax.random.randint(jax.random.key(1), (2, 7), 0, cfg.vocab_size)
    a, b = (_forward(cfg, w, toks, ex=Execution(kn)) for kn in ("pallas", "xla"))
    assert_close(a, b, jnp.float32)
    assert np.array_equal(np.argmax(a, -1), np.argmax(b, -1))

    c = init_cache(cfg, 2, 24)
    c = KVCache(_normal(5, c.k.shape), _normal(6, c.v.shape), jnp.array([3, 19], jnp.int32))  # stale entries
    (a, ca), (b, cb) = (_forward(cfg, w, toks[:, :4], c, ex=Execution(kn)) for kn in ("pallas", "xla"))
    assert_close(a, b, jnp.float32)
    assert np.array_equal(np.argmax(a, -1), np.argmax(b, -1))
    assert_close(ca.k, cb.k, jnp.float32)
    assert_close(ca.v, cb.v, jnp.float32)
