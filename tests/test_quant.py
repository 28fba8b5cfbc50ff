import jax
import jax.numpy as jnp
import numpy as np
import pytest

from er_jax.model import forward
from er_jax.quant import (PROJECTIONS, QuantArray, dequantize, derive_drafter, projection_bytes,
                          quantize_int4, quantize_int8, quantized_activations)
from tests.helpers import tiny_model


def paper_int4_numpy(w, group=128):
    """The paper's formula, written independently in numpy, one group at a time (a partial last group)."""
    k, n = w.shape
    out = np.zeros_like(w)
    for g0 in range(0, k, group):
        blk = w[g0:g0 + group]
        mn, mx = blk.min(0), blk.max(0)
        s = (mx - mn) / 15
        zp = np.clip(np.round(-mn / s), 0, 15)
        q = np.clip(np.round(blk / s) + zp, 0, 15)
        out[g0:g0 + group] = (q - zp) * s
    return out


@pytest.mark.parametrize("k", [128, 576, 200, 64])
def test_int4_matches_the_papers_formula(k):
    w = np.asarray(jax.random.normal(jax.random.key(k), (k, 40)), np.float32)
    qa = quantize_int4(jnp.asarray(w))
    assert qa.data.dtype == jnp.uint8 and qa.data.shape == (-(-k // 128) * 64, 40)
    np.testing.assert_allclose(dequantize(qa), paper_int4_numpy(w), rtol=1e-5, atol=1e-6)
    # The error of round-to-nearest is at most half a step per group.
    step = np.repeat(np.asarray(qa.scale), 128, axis=0)[:k]
    assert np.all(np.abs(np.asarray(dequantize(qa)) - w) <= 0.5 * step + 1e-6)


def test_int4_packing_low_nibble_is_even_row():
    w = jnp.tile(jnp.arange(16.0)[:, None], (8, 3))  # rows cycle 0..15; group min 0, max 15 -> s = 1, zp = 0
    qa = quantize_int4(w)
    assert np.all(np.asarray(qa.zero) == 0) and np.allclose(qa.scale, 1.0)
    assert int(qa.data[0, 0]) == 0 | (1 << 4) and int(qa.data[1, 0]) == 2 | (3 << 4)


def test_int4_constant_groups_round_trip():
    w = jnp.concatenate([jnp.full((128, 2), 0.7), jnp.full((128, 2), -0.3), jnp.zeros((128, 2))])
    np.testing.assert_allclose(dequantize(quantize_int4(w)), w, atol=1e-7)


def test_int8_per_channel_symmetric():
    w = jax.random.normal(jax.random.key(1), (96, 24)) * jnp.linspace(0.1, 3, 24)
    qa = quantize_int8(w)
    assert qa.data.dtype == jnp.int8 and qa.scale.shape == (1, 24)
    np.testing.assert_allclose(qa.scale[0], jnp.abs(w).max(0) / 127, rtol=1e-6)
    assert float(jnp.abs(dequantize(qa) - w).max()) <= float(qa.scale.max()) / 2 + 1e-6


@pytest.mark.parametrize("scheme,bound", [("int4", 0.3), ("int8", 0.53)])
def test_drafter_shares_leaves_and_fits_the_memory_bound(scheme, bound):
    cfg, w = tiny_model(hidden_size=256, intermediate_size=384, num_heads=4, head_dim=64)
    w16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), w)
    d = derive_drafter(w16, scheme)
    for name in PROJECTIONS:
        assert isinstance(d["layers"][name], QuantArray)
    for name in ("attn_norm", "mlp_norm", "bq", "bk", "bv"):
        assert d["layers"][name] is w16["layers"][name]
    assert d["embed"] is w16["embed"] and d["final_norm"] is w16["final_norm"]
    assert projection_bytes(d) <= bound * projection_bytes(w16)


def test_drafter_is_a_pure_function_of_the_weights():
    cfg, w = tiny_model()
    a = derive_drafter(w, "int4")
    b = derive_drafter(jax.tree_util.tree_map(jnp.copy, w), "int4")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.array_equal(x, y)
    w2 = {**w, "layers": {**w["layers"], "wq": w["layers"]["wq"] * 2}}
    assert not np.array_equal(derive_drafter(w2, "int4")["layers"]["wq"].scale, a["layers"]["wq"].scale)


def test_drafter_forward_tracks_the_target():
    cfg, w = tiny_model(scale=0.1)
    toks = jax.random.randint(jax.random.key(4), (2, 9), 0, cfg.vocab_size)
    p = jax.nn.softmax(forward(cfg, w, toks))
    tv = {s: float(jnp.abs(p - jax.nn.softmax(forward(cfg, derive_drafter(w, s), toks))).sum(-1).max())
          for s in ("int8", "int4")}
    # Random Gaussian weights are a hard case for 4 bits; int8 must be much closer than int4.
    assert 0 < tv["int8"] < 0.05 and tv["int8"] < tv["int4"] < 0.5


def test_bad_scheme():
    _, w = tiny_model()
    with pytest.raises(ValueError, match="scheme"):
        derive_drafter(w, "int3")


def bf16_round_numpy(x):
    """f32 -> nearest bf16 (ties to even), back in f32: written independently on the bits (finite x)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def test_quantized_activations_are_bf16_rounded_to_nearest_even():
    """The 16-bit activations every quantized matmul multiplies (the paper's W4A16): bf16 keeps 8 significant
    bits, so 1 + 2^-8 is a tie (down to the even 1), 1 + 3 * 2^-8 a tie (up to the even 1 + 2^-6), and anything
    past a tie goes up."""
    x = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -8 + 2.0 ** -20, -(1 + 2.0 ** -8 + 2.0 ** -20),
                  3.0, -0.0, np.inf], np.float32)
    want = np.array([1.0, 1 + 2.0 ** -6, 1 + 2.0 ** -7, -(1 + 2.0 ** -7), 3.0, -0.0, np.inf], np.float32)
    got = quantized_activations(jnp.asarray(x))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))
    r = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(quantized_activations(jnp.asarray(r))), bf16_round_numpy(r))
    assert bool(jnp.isnan(quantized_activations(jnp.float32(np.nan))))
    xb = jnp.asarray(r, jnp.bfloat16)
    assert quantized_activations(xb) is xb  # 16-bit x is multiplied as it is
