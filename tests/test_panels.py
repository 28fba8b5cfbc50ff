"""Panel-major dense weights (er_jax.panels) and the native kernel that reads them, against the references.

Tolerances as in tests/test_native.py (the worst case of f32 summation in any order); integer-valued data
makes every sum exact, so there the kernels must match numpy bit for bit on every ISA.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from er_jax.execution import Execution
from er_jax.kernels import native
from er_jax.kernels.quant_matmul import matmul_reference, quant_matmul_reference
from er_jax.model import drafter_layout, embed_rows, execution_layout, forward, logits_from_hidden, unstack_layers
from er_jax.panels import FUSED, PANEL, PanelArray, as_quant, can_pack, concat, pack, pack_weights, unpack
from er_jax.quant import QuantArray, dequantize, derive_drafter, quantize_int4, quantize_int8
from er_jax.cache import init_cache
from tests.helpers import tiny_model
from tests.test_native import _abs_weights, _check, _data, _gamma, _isas, int4_parts, needs_native

# M: one row, two, a 6-row tile plus remainders, and more than native.MAX_M (run in pieces); K across the
# kernel's 256-row k block; N: whole 4-panel groups plus single panels.
MS = (1, 2, 3, 7, 16, 64, 300)
SHAPES = ((301, 208), (64, 48))


def test_pack_round_trip_and_layout():
    w = jnp.asarray(np.arange(5 * 32, dtype=np.float32).reshape(5, 32))
    pa = pack(w)
    assert isinstance(pa, PanelArray) and pa.data.shape == (2, 5, PANEL) and pa.shape == (5, 32)
    assert pa.dtype == jnp.float32 and pa.nbytes == 5 * 32 * 4
    assert float(pa.data[1, 3, 2]) == float(w[3, PANEL + 2])  # column 16 j + i of row k at [j, k, i]
    np.testing.assert_array_equal(np.asarray(unpack(pa)), np.asarray(w))
    wb = w.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(unpack(pack(wb))), np.asarray(wb))


def test_pack_int8_holds_the_quantized_weight():
    qa = quantize_int8(jnp.asarray(_data(1, 40, 48, seed=1)[1]))
    pa = pack(qa)
    assert pa.data.dtype == jnp.int8 and pa.scale is qa.scale and pa.shape == (40, 48) and pa.dtype == jnp.float32
    assert pa.nbytes == qa.nbytes
    np.testing.assert_array_equal(np.asarray(unpack(pa)), np.asarray(dequantize(qa, jnp.float32)))
    q4 = quantize_int4(jnp.asarray(_data(1, 301, 48, seed=2)[1]))  # 3 groups, 83 padding rows
    p4 = pack(q4)
    assert p4.scheme == "int4" and p4.data.shape == (3, 192, PANEL) and p4.shape == (301, 48)
    assert p4.scale is q4.scale and p4.zero is q4.zero and p4.nbytes == q4.nbytes
    np.testing.assert_array_equal(np.asarray(unpack(p4)), np.asarray(dequantize(q4, jnp.float32)))


def test_int4_panel_lines_hold_each_code_where_the_kernels_read_it():
    """int4 panels in line order (panels.py): the code of row 8b + 2j + e, column 16 p + c sits in nibble j of
    the little-endian uint16 word 2c + e of panel p's 64-byte line b — read here from the codes themselves."""
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 16, (256, 48)).astype(np.uint8)  # K = 256 rows (2 groups), N = 3 panels
    q4 = QuantArray(jnp.asarray(codes[0::2] | (codes[1::2] << 4)), jnp.ones((2, 48)),
                    jnp.zeros((2, 48), jnp.uint8), "int4", 256)
    words = np.asarray(pack(q4).data).reshape(3, 32, 32, 2).astype(np.uint16)  # [panel, line, word, byte]
    words = words[..., 0] | (words[..., 1] << 8)
    for k in (0, 1, 2, 7, 8, 13, 127, 128, 255):
        b, j, e = k // 8, k % 8 // 2, k % 2
        for col in (0, 5, 16, 31, 47):
            p, c = divmod(col, PANEL)
            assert (int(words[p, b, 2 * c + e]) >> (4 * j)) & 0xF == codes[k, col], (k, col)
    np.testing.assert_array_equal(np.asarray(as_quant(pack(q4)).data), np.asarray(q4.data))


def test_int4_panels_need_whole_lines():
    """A group size that is not a multiple of 8 cannot be laid out in 8-row lines: such a QuantArray is not
    packed (it runs in its own layout), and a hand-made PanelArray with one is refused."""
    q4 = quantize_int4(jnp.asarray(_data(1, 24, 32, seed=3)[1]), group_size=12)
    assert not can_pack(q4) and can_pack(quantize_int4(jnp.ones((24, 32)), group_size=8))
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(q4)
    bad = PanelArray(jnp.zeros((2, 12, PANEL), jnp.uint8), 24, jnp.ones((2, 32)), jnp.zeros((2, 32), jnp.uint8), 12)
    with pytest.raises(ValueError, match="multiple of 8"):
        native.matmul(jnp.ones((1, 24)), bad)


@pytest.mark.parametrize("bad", [np.zeros((4, 24), np.float32), np.zeros((4, 32), np.int8), np.zeros((2, 4, 32)),
                                 np.zeros((4, 0), np.float32)])
def test_pack_refuses_what_it_cannot_hold(bad):
    assert not can_pack(jnp.asarray(bad))
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(jnp.asarray(bad))


def test_reference_reads_panels():
    x, w = _data(3, 40, 32, seed=0)
    np.testing.assert_array_equal(np.asarray(matmul_reference(jnp.asarray(x), pack(jnp.asarray(w)))),
                                  np.asarray(matmul_reference(jnp.asarray(x), jnp.asarray(w))))


@needs_native
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("wdt", ["float32", "bfloat16"])
@pytest.mark.parametrize("xdt", ["float32", "bfloat16"])
def test_panel_matmul_every_isa(k, n, wdt, xdt):
    _, w = _data(1, k, n, seed=k)
    wj = jnp.asarray(w, wdt)
    pa = pack(wj)
    xs = [jnp.asarray(_data(m, k, 1, seed=m)[0], xdt) for m in MS]
    refs = jax.jit(lambda xs, w: [matmul_reference(x, w) for x in xs])(xs, wj)
    w_abs = _abs_weights(wj.astype(jnp.float32))
    for isa in _isas():
        ys = jax.jit(lambda xs, pa: [native.matmul(x, pa, isa=isa) for x in xs])(xs, pa)
        for x, y, ref in zip(xs, ys, refs):
            assert y.dtype == x.dtype and y.shape == (x.shape[0], n)
            _check(y, ref, x, w_abs)


@needs_native
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("xdt", ["float32", "bfloat16"])
def test_panel_quant_matmul_every_isa(k, n, scheme, xdt):
    qa = (quantize_int8 if scheme == "int8" else quantize_int4)(jnp.asarray(_data(1, k, n, seed=k + 1)[1]))
    pa = pack(qa)
    xs = [jnp.asarray(_data(m, k, 1, seed=50 + m)[0], xdt) for m in MS]
    refs = jax.jit(lambda xs, qa: [quant_matmul_reference(x, qa) for x in xs])(xs, qa)
    w_abs = _abs_weights(qa)
    extra = 4 * (-(-k // 128)) + 4  # the scale (and int4's group sums and zero-point term): a few more roundings
    for isa in _isas():
        ys = jax.jit(lambda xs, pa: [native.matmul(x, pa, isa=isa) for x in xs])(xs, pa)
        for x, y, ref in zip(xs, ys, refs):
            assert y.dtype == x.dtype and y.shape == (x.shape[0], n)
            if scheme == "int4" and x.shape[0] <= INT4_DP_MAX_M.get(isa, 0):
                _check_int4_dp(y, ref, x, qa, extra)
            else:
                _check(y, ref, x, w_abs, extra_ops=extra)


# The rows of M up to which each ISA runs int4 panels on vdpbf16ps (isa_avx512.cc's kInt4DpMaxM; amx's tiles
# take M >= 12). docs/native.md, "int4 at M <= 2" and "Quantized panels in register tiles".
INT4_DP_MAX_M = {"avx512bf16": 31, "amx": 11}


def _check_int4_dp(y, ref, x, qa, extra):
    """The vdpbf16ps int4 kernel's bound: it sums (128 + q) x' in f32, two parts of x per code for f32 x,
    and takes (128 + z) sum x' off per group, x' = bf16(x) + bf16(x - bf16(x)) (within 2^-16 |x| of x; x'
    = x for bf16 x). So |y - ref| <= 2 gamma_n sum |x'| (256 + q + z) s + 2^-16 sum |x| |q - z| s, n = 2 K
    + the group terms, with |x'| <= (1 + 2^-8) |x|."""
    q, z, sc = int4_parts(qa)
    xa = np.abs(np.asarray(jnp.asarray(x, jnp.float32), np.float64))
    tol = (2 * _gamma(2 * qa.in_features + extra) * (1 + 2.0 ** -8) * (xa @ ((256 + q + z) * sc))
           + 2.0 ** -16 * (xa @ (np.abs(q - z) * sc)))
    y, ref = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (y, ref))
    if jnp.dtype(x.dtype) == jnp.bfloat16:
        tol = tol + 2.0 ** -7 * np.maximum(np.abs(ref), np.abs(y))
    err = np.abs(y - ref)
    assert np.all(err <= tol + 1e-30), f"max err {err.max():.3g}, at tol {tol.flat[np.argmax(err - tol)]:.3g}"


@needs_native
@pytest.mark.parametrize("k", [300, 301])  # whole byte rows; an odd K (the last byte's high nibble is padding)
def test_int4_panels_small_m_exact_on_integer_data(k):
    """int4 panels at M = 1, 2 (the decode / draft rows; vdpbf16ps on avx512bf16 / amx, the codes as 128 + q)
    on exact sums: f32 and bf16 x give numpy's product (bf16 x: rounded once to bf16) on every ISA, across
    groups, column blocks and the zero points' offset."""
    rng = np.random.default_rng(k + 7)
    g = -(-k // 128)
    n = 1040  # 65 panels (whole groups of 8 and 4 and a single one), >= 96 KiB: both threads
    q4 = QuantArray(jnp.asarray(rng.integers(0, 256, (64 * g, n)), jnp.uint8), jnp.full((g, n), 0.5),
                    jnp.asarray(rng.integers(0, 16, (g, n)), jnp.uint8), "int4", k)
    w4 = np.asarray(dequantize(q4, jnp.float32), np.float64)
    pa = pack(q4)
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
    for m in (1, 2):
        x = rng.integers(-3, 4, (m, k)).astype(np.float32)
        for isa in _isas():
            np.testing.assert_array_equal(np.asarray(native.matmul(jnp.asarray(x), pa, isa=isa)), x @ w4, err_msg=isa)
            yb = native.matmul(jnp.asarray(x, jnp.bfloat16), pa, isa=isa).astype(jnp.float32)
            np.testing.assert_array_equal(np.asarray(yb), bf(x @ w4), err_msg=isa)


@needs_native
def test_panel_matmul_exact_on_integer_data():
    """Exact sums: every ISA, every M tile and the >MAX_M pieces equal numpy's product bit for bit, with
    leading dimensions and under vmap."""
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, (2, 150, 301)).astype(np.float32)
    w = rng.integers(-4, 5, (301, 208)).astype(np.float32)
    want = x @ w
    for wdt in ("float32", "bfloat16"):  # small integers are exact in bf16
        pa = pack(jnp.asarray(w, wdt))
        for isa in _isas():
            np.testing.assert_array_equal(np.asarray(native.matmul(jnp.asarray(x), pa, isa=isa)), want)
        vm = jax.vmap(lambda xr: native.matmul(xr, pa))(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(vm), want)
    codes = rng.integers(-127, 128, (301, 208))
    pa8 = pack(QuantArray(jnp.asarray(codes, jnp.int8), jnp.full((1, 208), 0.5), None, "int8", 301))
    # int4: any bytes and zero points, power-of-two scales; the reference dequantizes (exact here)
    q4 = QuantArray(jnp.asarray(rng.integers(0, 256, (192, 208)), jnp.uint8), jnp.full((3, 208), 0.5),
                    jnp.asarray(rng.integers(0, 16, (3, 208)), jnp.uint8), "int4", 301)
    want4 = x @ np.asarray(dequantize(q4, jnp.float32), np.float64)
    for isa in _isas():
        np.testing.assert_array_equal(np.asarray(native.matmul(jnp.asarray(x), pa8, isa=isa)), x @ codes * 0.5)
        np.testing.assert_array_equal(np.asarray(native.matmul(jnp.asarray(x), pack(q4), isa=isa)), want4)


@needs_native
@pytest.mark.parametrize("k", [300, 301, 256])  # even; odd (the vdpbf16ps kernel's single last row); AMX tiles
def test_bf16_activations_exact_on_integer_data(k):
    """bf16 x times bf16 panels (the avx512bf16 ISA's vdpbf16ps kernel and the amx ISA's tiles, where the CPU
    has them), on exact sums:
    bf16 x gives numpy's product rounded once to bf16, and f32 x holding bf16 values (the LM head's case,
    which that kernel also takes) numpy's product exactly, on every ISA, across k blocks and M tiles."""
    rng = np.random.default_rng(k)
    x = rng.integers(-3, 4, (2, 150, k)).astype(np.float32)
    w = rng.integers(-4, 5, (k, 208)).astype(np.float32)
    want = x @ w  # |sums| <= 12 k < 2^24: exact in f32
    pa = pack(jnp.asarray(w, jnp.bfloat16))
    want_bf16 = np.asarray(jnp.asarray(want, jnp.bfloat16).astype(jnp.float32))
    for isa in _isas():
        yb = native.matmul(jnp.asarray(x, jnp.bfloat16), pa, isa=isa)
        assert yb.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(yb.astype(jnp.float32)), want_bf16, err_msg=isa)
        np.testing.assert_array_equal(np.asarray(native.matmul(jnp.asarray(x), pa, isa=isa)), want, err_msg=isa)


@needs_native
@pytest.mark.parametrize("k", [256, 300])  # whole 32-row tiles (AMX) or not
@pytest.mark.parametrize("rows", [2, 5, 6, 12, 150])  # M = 2 x rows: register tiles of 4 panels (M = 4), of 2 (10),
# two (12) and three (24) tiles; 300 rows: int8 in 28 tiles, int4 and AMX in converted blocks
def test_quantized_panels_with_bf16_activations_exact_on_integer_data(k, rows):
    """int8 / int4 panels times bf16 x (the vdpbf16ps and AMX paths convert the codes to bf16, int4's as
    code - zero), on exact sums: numpy's product rounded once to bf16, on every ISA."""
    rng = np.random.default_rng(k + rows)
    x = rng.integers(-3, 4, (2, rows, k)).astype(np.float32)
    codes = rng.integers(-127, 128, (k, 208)).astype(np.int8)
    pa8 = pack(QuantArray(jnp.asarray(codes), jnp.full((1, 208), 0.5), None, "int8", k))
    g = -(-k // 128)  # int4: any bytes and zero points, a power-of-two scale (the reference is exact)
    q4 = QuantArray(jnp.asarray(rng.integers(0, 256, (64 * g, 208)), jnp.uint8), jnp.full((g, 208), 0.5),
                    jnp.asarray(rng.integers(0, 16, (g, 208)), jnp.uint8), "int4", k)
    w4 = np.asarray(dequantize(q4, jnp.float32), np.float64)
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
    for isa in _isas():
        xb = jnp.asarray(x, jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(native.matmul(xb, pa8, isa=isa).astype(jnp.float32)),
                                      bf(x @ codes * 0.5), err_msg=isa)
        np.testing.assert_array_equal(np.asarray(native.matmul(xb, pack(q4), isa=isa).astype(jnp.float32)),
                                      bf(x @ w4), err_msg=isa)


@needs_native
def test_panel_matmul_refuses_malformed_panels():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="PanelArray data must be"):
        native.matmul(x, PanelArray(jnp.ones((2, 8, 8)), 8))
    with pytest.raises(ValueError, match="dense PanelArray's data must be float32 / bfloat16"):
        native.matmul(x, PanelArray(jnp.ones((1, 8, 16), jnp.int8), 8))
    with pytest.raises(ValueError, match="int8 PanelArray's data must be int8"):
        native.matmul(x, PanelArray(jnp.ones((1, 8, 16)), 8, jnp.ones((1, 16))))
    with pytest.raises(ValueError, match="int4 PanelArray's zero must be uint8 \\(1, 16\\)"):
        native.matmul(x, PanelArray(jnp.ones((1, 64, 16), jnp.uint8), 8, jnp.ones((1, 16)),
                                    jnp.ones((2, 16), jnp.uint8)))
    with pytest.raises(ValueError, match="last axis must be the weight's K = 8"):
        native.matmul(jnp.ones((2, 9)), pack(jnp.ones((8, 16))))


def test_execution_layout_packs_only_for_native():
    cfg, w = tiny_model()
    native_ex, xla_ex = Execution("native", None, "unstacked"), Execution("xla", None, "unstacked")
    assert execution_layout(w, Execution("native", None, "stacked")) is w
    plain = execution_layout(w, xla_ex)
    assert "lm_head_p" not in plain and not isinstance(plain["layers"][0]["wq"], PanelArray)
    packed = execution_layout(w, native_ex)
    assert all(isinstance(lw[n], PanelArray) for lw in packed["layers"] for n in ("wqkv", "w_gate_up", "wo", "w_down"))
    # q / k / v and gate / up are fused: the fused matrix is its parts side by side, and the parts are gone
    for lw, lw0 in zip(packed["layers"], unstack_layers(w)["layers"]):
        for fused, names in FUSED.items():
            assert not any(n in lw for n in names)
            np.testing.assert_array_equal(np.asarray(unpack(lw[fused])),
                                          np.concatenate([np.asarray(lw0[n]) for n in names], axis=1))
    assert not isinstance(packed["layers"][0]["attn_norm"], PanelArray)
    head = w["embed"].T if cfg.tie_embeddings else w["lm_head"]
    np.testing.assert_array_equal(np.asarray(unpack(packed["lm_head_p"])), np.asarray(head))
    _, wt = tiny_model(tie_embeddings=True)
    np.testing.assert_array_equal(np.asarray(unpack(execution_layout(wt, native_ex)["lm_head_p"])),
                                  np.asarray(wt["embed"].T))
    # a drafter sharing the target's head gets that packed head, not a second copy; its int8 / int4
    # projections are packed; a drafter's own int8 head is packed in place of lm_head_q
    for scheme in ("int8", "int4"):
        d = execution_layout(derive_drafter(w, scheme), native_ex, packed["lm_head_p"])
        assert d["lm_head_p"] is packed["lm_head_p"]
        assert all(lw[n].scheme == scheme for lw in d["layers"] for n in ("wqkv", "w_gate_up", "w_down"))
        q = derive_drafter(w, scheme)["layers"]
        for i, lw in enumerate(d["layers"]):  # scales (and int4 zeros) travel with their columns
            parts = [jax.tree_util.tree_map(lambda a, i=i: a[i], q[n]) for n in FUSED["wqkv"]]
            np.testing.assert_array_equal(np.asarray(unpack(lw["wqkv"])),
                                          np.concatenate([np.asarray(unpack(pack(p))) for p in parts], axis=1))
    own = derive_drafter(w, "int8", head="int8")
    dq = execution_layout(own, native_ex, packed["lm_head_p"])
    assert "lm_head_q" not in dq
    np.testing.assert_array_equal(np.asarray(dq["lm_head_p"].scale), np.asarray(own["lm_head_q"].scale))
    with pytest.raises(ValueError, match="expects the stacked layout"):
        pack_weights(unstack_layers(w))
    with pytest.raises(ValueError, match="share scheme, dtype, K and group size"):
        concat([pack(jnp.ones((8, 16))), pack(jnp.ones((9, 16)))])
    with pytest.raises(ValueError, match="share scheme"):
        concat([pack(jnp.ones((8, 16))), pack(jnp.ones((8, 16), jnp.bfloat16))])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [False, True])
def test_drafter_layout_fuses_derivation_and_packing_bit_for_bit(dtype, tie):
    """The native drafter layout (quantization and packing in one program) is the packed layout of
    derive_drafter's drafter, bit for bit, for both schemes and heads; the leaves it does not change are the
    caller's own arrays (a shared embedding, LM head or packed target head is never copied)."""
    _, w = tiny_model(tie_embeddings=tie)
    w = jax.tree_util.tree_map(lambda a: a.astype(dtype) if a.dtype == jnp.float32 else a, w)
    ex = Execution("native", None, "unstacked")
    target = execution_layout(w, ex)
    for scheme in ("int8", "int4"):
        for head in ("shared", "int8"):
            got = drafter_layout(w, ex, scheme, head, target["lm_head_p"])
            want = execution_layout(derive_drafter(w, scheme, head=head), ex, target["lm_head_p"])
            assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert (got["lm_head_p"] is target["lm_head_p"]) == (head == "shared")
            assert got["lm_head_p"].scheme == ("int8" if head == "int8" else "dense")
            if dtype == "float32":
                assert got["embed"] is w["embed"]
            if not tie:
                assert got["lm_head"] is w["lm_head"]
    # the stacked layout and the XLA backend: derive_drafter's drafter itself (per layer for XLA)
    d = drafter_layout(w, Execution("xla", None, "stacked"), "int8", "int8")
    assert d["layers"]["wq"].scheme == "int8" and d["lm_head_q"].scheme == "int8" and d["embed"] is w["embed"]
    assert isinstance(drafter_layout(w, Execution("xla", None, "unstacked"), "int4")["layers"], tuple)


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), "xla"])
@pytest.mark.parametrize("drafter", [None, "int8", "int4"])
def test_packed_forward_matches_the_stacked_reference(backend, drafter):
    """Prefill and a cached decode step on the packed layout give the stacked XLA forward's logits (the
    target, and int8 / int4 drafters with their own int8 head).

    Target: the native kernels sum in another order than XLA; on logits up to ~8 that differed by up to 2e-5,
    so 1e-4, the engine tests' tolerance for native vs XLA. Drafters: their matmuls round x to bf16, so an
    activation that lands within an f32 rounding of a bf16 tie rounds the other way on one side (2^-8 of it)
    and that spreads through the later layers. On 150 random prompts per drafter and ISA (avx2, avx512bf16;
    2026-12-07) 26-99% of them differed by more than 1e-4, at most by 0.058 on logits of ~7.6; so 0.25,
    4x that. Each packed matrix is checked on its own below, where both sides take the same bf16 x."""
    cfg, w = tiny_model()
    if drafter:
        w = derive_drafter(w, drafter, head="int8")
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, cfg.vocab_size)
    ex = Execution(backend, None, "unstacked")
    packed = execution_layout(w, ex)
    tol = 0.25 if drafter else 1e-4
    ref = forward(cfg, w, tokens)
    got = forward(cfg, packed, tokens, ex=ex)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=tol, atol=tol)
    lr, _ = forward(cfg, w, tokens, init_cache(cfg, 2, 8))
    lg, _ = forward(cfg, packed, tokens, init_cache(cfg, 2, 8), ex=ex)
    np.testing.assert_allclose(np.asarray(lg), np.asarray(lr), rtol=tol, atol=tol)
    if not drafter or backend != "native":
        return
    rng = np.random.default_rng(0)  # every packed (fused) matrix times bf16 x: the stacked parts' product
    deq = {n: np.asarray(dequantize(a, jnp.float32), np.float64)
           for n, a in w["layers"].items() if isinstance(a, QuantArray)}
    for layer, lw in enumerate(packed["layers"]):
        for name, pa in lw.items():
            if not isinstance(pa, PanelArray):
                continue
            want_w = np.concatenate([deq[n][layer] for n in FUSED.get(name, (name,))], axis=1)
            for m in (1, 2, 5, 10):
                x = np.asarray(jnp.asarray(rng.standard_normal((m, want_w.shape[0])), jnp.bfloat16), np.float32)
                want = x.astype(np.float64) @ want_w
                err = np.abs(np.asarray(native.matmul(jnp.asarray(x), pa)) - want).max()
                assert err <= 1e-5 * np.abs(want).max(), (layer, name, m, err)


def test_bf16_embedding_is_packed_as_bits_and_gathered_without_a_table_conversion():
    """The native layout keeps a bf16 embedding as its uint16 bits: `embed_rows` returns exactly the bf16 rows,
    and a gather inside a loop (the drafter's) compiles without any whole-table op — a bf16 table there was
    converted to f32 as a whole and hoisted out of the loop by XLA's CPU backend (41 ms a SmolLM2 draft step)."""
    cfg, w = tiny_model()
    w = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, w)
    packed = execution_layout(w, Execution("native", None, "unstacked"))
    assert packed["embed"].dtype == jnp.uint16 and w["embed"].dtype == jnp.bfloat16
    tokens = jnp.array([[0, 3, cfg.vocab_size - 1]])
    got = embed_rows(packed["embed"], tokens, jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(w["embed"][tokens].astype(jnp.float32)))
    assert execution_layout(w, Execution("xla", None, "unstacked"))["embed"].dtype == jnp.bfloat16
    # a tied head read from the bits (no packed head: the einsum fallback) is the bf16 table's
    cft, wt = tiny_model(tie_embeddings=True)
    wt = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, wt)
    bits = {k: v for k, v in execution_layout(wt, Execution("native", None, "unstacked")).items() if k != "lm_head_p"}
    h = jax.random.normal(jax.random.key(2), (2, cft.hidden_size)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(logits_from_hidden(cft, bits, h)),
                                  np.asarray(logits_from_hidden(cft, {**bits, "embed": wt["embed"]}, h)))

    def loop(table, tok):
        def body(_, c):
            t, acc = c
            x = embed_rows(table, t[None], jnp.float32)
            return (jnp.argmax(x).astype(jnp.int32) % cfg.vocab_size, acc + x.sum())
        return jax.lax.fori_loop(0, 3, body, (tok, jnp.float32(0)))

    v, d = w["embed"].shape
    for table, expect_table_ops in ((packed["embed"], False), (w["embed"], True)):
        hlo = jax.jit(loop).lower(table, jnp.int32(1)).compile().as_text()
        made = (re.search(rf"= \w+\[{v},{d}\]\S* ([\w-]+)\(", ln) for ln in hlo.splitlines())
        table_ops = [m.group(0) for m in made if m and m.group(1) not in ("parameter", "get-tuple-element", "bitcast")]
        # the bf16 table shows what the guard catches (if XLA stops doing it, this half says so)
        assert bool(table_ops) == expect_table_ops, table_ops
