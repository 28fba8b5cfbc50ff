import jax
import jax.numpy as jnp
import numpy as np
import pytest

from er_jax.cache import KVCache, cache_bytes, gather_rows, init_cache
from er_jax.model import forward, rope, validate_weights
from tests.helpers import tiny_model


def test_rope_matches_complex_rotation():
    # Rotate-half RoPE equals multiplying (x_i + i x_{i+hd/2}) by e^{i pos theta^(-2i/hd)}.
    x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
    pos = jnp.array([[0, 5, 17]])
    out = np.asarray(rope(x, pos, 100.0))
    xn = np.asarray(x)
    z = xn[..., :4] + 1j * xn[..., 4:]
    ang = np.asarray(pos)[..., None, None] * 100.0 ** (-np.arange(0, 8, 2) / 8)
    zr = z * np.exp(1j * ang)
    np.testing.assert_allclose(out, np.concatenate([zr.real, zr.imag], -1), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_cached_decode_matches_teacher_forcing_at_ragged_lengths(tie):
    cfg, w = tiny_model(tie_embeddings=tie)
    toks = jax.random.randint(jax.random.key(1), (3, 12), 0, cfg.vocab_size)
    full = forward(cfg, w, toks)
    # Prefill rows to different lengths, then decode 1 and then 3 tokens per row at per-row positions.
    plen = jnp.array([2, 5, 8])
    padded = jnp.where(jnp.arange(12)[None] < plen[:, None], toks, 0)
    cache = init_cache(cfg, 3, 16)
    logits, cache = forward(cfg, w, padded[:, :8], cache)
    cache = KVCache(cache.k, cache.v, plen)
    rows = jnp.arange(3)
    for t in (1, 3):
        idx = cache.lengths[:, None] + jnp.arange(t)[None]
        new = toks[rows[:, None], idx]
        logits, cache = forward(cfg, w, new, cache)
        want = full[rows[:, None], idx]
        np.testing.assert_allclose(logits, want, atol=2e-5)
        cache = KVCache(cache.k, cache.v, cache.lengths + t)


def test_logit_index_selects_positions():
    cfg, w = tiny_model()
    toks = jax.random.randint(jax.random.key(2), (2, 6), 0, cfg.vocab_size)
    full = forward(cfg, w, toks)
    idx = jnp.array([[1, 5], [0, 3]])
    got = forward(cfg, w, toks, logit_index=idx)
    np.testing.assert_allclose(got, jnp.take_along_axis(full, idx[:, :, None], 1), atol=1e-6)


def test_bf16_forward_close_to_f32():
    cfg, w = tiny_model()
    cfg16 = cfg.replace(dtype="bfloat16")
    w16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), w)
    toks = jax.random.randint(jax.random.key(3), (2, 7), 0, cfg.vocab_size)
    a = jax.nn.softmax(forward(cfg, w, toks))
    b = jax.nn.softmax(forward(cfg16, w16, toks))
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.05


def test_cache_bytes_and_row_gather():
    cfg, _ = tiny_model()
    c = init_cache(cfg, 4, 10)
    assert c.nbytes == cache_bytes(cfg, 4, 10) == 2 * 4 * 10 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    c = KVCache(c.k.at[:, 2].set(1.0), c.v, jnp.array([1, 2, 3, 4]))
    g = gather_rows(c, jnp.array([2, 0]))
    assert g.k.shape[1] == 2 and float(g.k[:, 0].min()) == 1.0 and list(g.lengths) == [3, 1]


def test_validate_weights_reports_bad_shapes_and_structure():
    cfg, w = tiny_model()
    validate_weights(cfg, w)
    bad = {**w, "layers": {**w["layers"], "wq": w["layers"]["wq"][:, :, :-1]}}
    with pytest.raises(ValueError, match=r"\['layers'\]\['wq'\] has shape"):
        validate_weights(cfg, bad)
    missing = {k: v for k, v in w.items() if k != "final_norm"}
    with pytest.raises(ValueError, match="structure"):
        validate_weights(cfg, missing)


@pytest.mark.slow
def test_unstacked_layout_matches_stacked():
    from er_jax.model import unstack_layers
    cfg, w = tiny_model()
    wu = unstack_layers(w)
    toks = jax.random.randint(jax.random.key(5), (2, 5), 0, cfg.vocab_size)
    np.testing.assert_allclose(forward(cfg, wu, toks), forward(cfg, w, toks), atol=2e-5)
    c = init_cache(cfg, 2, 8)
    c = KVCache(c.k, c.v, jnp.array([0, 2]))
    (a, ca), (b, cb) = forward(cfg, wu, toks[:, :3], c), forward(cfg, w, toks[:, :3], c)
    np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(ca.k, cb.k, atol=2e-5)
