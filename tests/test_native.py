"""The native CPU matmuls (er_jax.kernels.native, csrc/) against their plain references.

Every kernel runs on every ISA path this CPU supports (selected per call with `isa=`; the environment
variable ER_JAX_NATIVE_ISA is checked in a subprocess). Tolerances are the worst-case bound of f32
summation in any order: |y_a - y_b| <= 2 * gamma_n * sum_k |x_k| |w_k|, gamma_n = n u / (1 - n u),
u = 2^-24, with n the number of rounded operations along one output (K plus a few for the int4 group
sums and scales). bf16 outputs add one bf16 ulp (2^-7 relative) for a rounding that flips.
"""
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from er_jax.kernels import native
from er_jax.kernels.quant_matmul import matmul_reference, quant_matmul_reference
from er_jax.quant import QuantArray, dequantize, quantize_int4, quantize_int8, unpack_int4
from tests.helpers import slow_after

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.why_unavailable()}")

MS = (1, 2, 3, 7, 16, 64, 256)
# (K, N): K odd and not a multiple of 128 (int4 padding rows, an odd last byte), N odd (full register
# tiles, single vectors and a scalar tail). The second shape is large enough (>= 96 KiB of int4 weights)
# that the threaded paths (K split across threads at M <= 16, column blocks above) run.
SHAPES = ((301, 141), (1001, 389))
U = 2.0 ** -24


def _gamma(n):
    return n * U / (1 - n * U)


def test_extension_was_built_in_ci():
    """In CI (CI=true) a missing or broken build must fail, not skip."""
    if not IN_CI:
        pytest.skip("only checked with CI set")
    assert native.available(), native.why_unavailable()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@needs_native
def test_every_isa_the_cpu_advertises_is_usable():
    """A SIMD path this CPU has must have been built and have passed the start-up self-check: a path that
    silently dropped out (a failed self-check, a unit not compiled) would leave every test green on a slower
    one. Reads the kernel's view of the CPU from /proc/cpuinfo (Linux x86-64)."""
    flags = _cpu_flags()
    want = {"avx2": {"avx2", "fma"}}
    want["avx512"] = want["avx2"] | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    want["avx512bf16"] = want["avx512"] | {"avx512_bf16"}
    want["amx"] = want["avx512bf16"] | {"amx_tile", "amx_bf16"}  # (and the kernel's permission, Linux >= 5.16)
    have = [isa for isa, need in want.items() if need <= flags]
    assert set(have) <= set(native.usable_isas()), (have, native.info())
    if have and not os.environ.get("ER_JAX_NATIVE_ISA"):
        # The default: AMX where present; vdpbf16ps only on AMD (on Intel it loses to the FMAs, docs/native.md).
        best = have[-1]
        if best == "avx512bf16" and "AuthenticAMD" not in open("/proc/cpuinfo").read():
            best = "avx512"
        assert native.isa() == best


def test_unavailable_reason_is_one_sentence():
    if native.available():
        assert native.why_unavailable() is None and native.isa() in native.ISAS
    else:
        reason = native.why_unavailable()
        assert isinstance(reason, str) and reason and "\n" not in reason


def test_not_built_reports_one_reason_and_falls_back(monkeypatch):
    """Without the library the backend says why in one sentence and every call takes the reference."""
    monkeypatch.setattr(native, "_state", None)
    monkeypatch.setattr(native, "_library_paths", lambda: [])
    assert not native.available() and native.isa() == "" and native.usable_isas() == []
    reason = native.why_unavailable()
    assert "not built" in reason and "\n" not in reason
    x, w = jnp.ones((2, 8)), jnp.ones((8, 3))
    np.testing.assert_array_equal(np.asarray(native.matmul(x, w)), np.full((2, 3), 8.0))
    assert native.info() == {"available": False, "reason": reason}


def _data(m, k, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    return x, w


def _abs_weights(qa_or_w):
    """|w| as the kernel's error analysis sees it: int4 (|q| + z) * s (the zero point is folded out)."""
    if not isinstance(qa_or_w, QuantArray):
        return np.abs(np.asarray(qa_or_w, np.float64))
    if qa_or_w.scheme == "int8":
        return np.abs(np.asarray(qa_or_w.data, np.float64) * np.asarray(qa_or_w.scale, np.float64))
    q, z, s = int4_parts(qa_or_w)
    return (q + z) * s


def int4_parts(qa):
    """An int4 QuantArray's codes, zero points and scales per weight, [K, N] float64 each."""
    q = np.asarray(unpack_int4(qa.data), np.float64)[: qa.in_features]
    g = np.arange(qa.in_features) // qa.group_size
    return q, np.asarray(qa.zero, np.float64)[g], np.asarray(qa.scale, np.float64)[g]


def _check(y, ref, x, w_abs, extra_ops=0):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert y.shape == ref.shape
    xa = np.abs(np.asarray(jnp.asarray(x, jnp.float32), np.float64)).reshape(-1, w_abs.shape[0])
    mag = (xa @ w_abs).reshape(ref.shape)
    tol = 2 * _gamma(w_abs.shape[0] + extra_ops) * mag
    if jnp.dtype(x.dtype) == jnp.bfloat16:
        tol = tol + 2.0 ** -7 * np.maximum(np.abs(ref), np.abs(y))
    err = np.abs(y - ref)
    assert np.all(err <= tol + 1e-30), f"max err {err.max():.3g}, at tol {tol.flat[np.argmax(err - tol)]:.3g}"


def _isas():
    return native.usable_isas() if native.available() else []


@needs_native
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("wdt", ["float32", "bfloat16"])
@pytest.mark.parametrize("xdt", ["float32", "bfloat16"])
def test_dense_every_isa(k, n, wdt, xdt):
    _, w = _data(1, k, n, seed=k)
    wj = jnp.asarray(w, wdt)
    xs = [jnp.asarray(_data(m, k, 1, seed=m)[0], xdt) for m in MS]
    refs = jax.jit(lambda xs, w: [matmul_reference(x, w) for x in xs])(xs, wj)
    w_abs = _abs_weights(wj.astype(jnp.float32))
    for isa in _isas():  # one compile per ISA for every M
        ys = jax.jit(lambda xs, w: [native.matmul(x, w, isa=isa) for x in xs])(xs, wj)
        for x, y, ref in zip(xs, ys, refs):
            assert y.dtype == x.dtype and y.shape == (x.shape[0], n)
            _check(y, ref, x, w_abs)


@needs_native
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("xdt", ["float32", "bfloat16"])
def test_quant_every_isa(k, n, scheme, xdt):
    x0, w = _data(1, k, n, seed=k)
    qa = (quantize_int8 if scheme == "int8" else quantize_int4)(jnp.asarray(w))
    w_abs = _abs_weights(qa)
    xs = [jnp.asarray(_data(m, k, 1, seed=100 + m)[0], xdt) for m in MS]
    refs = jax.jit(lambda xs, qa: [quant_matmul_reference(x, qa) for x in xs])(xs, qa)
    for isa in _isas():
        ys = jax.jit(lambda xs, qa: [native.quant_matmul(x, qa, isa=isa) for x in xs])(xs, qa)
        for x, y, ref in zip(xs, ys, refs):
            assert y.dtype == x.dtype and y.shape == (x.shape[0], n)
            # int4: group sums, the zero-point term and the scale add a few roundings per group
            _check(y, ref, x, w_abs, extra_ops=4 * (-(-k // 128)) + 4)


@needs_native
def test_quantized_weights_take_bf16_activations_every_isa():
    """Quantized weights (QuantArray and panels, int8 and int4) multiply f32 x rounded to bf16, on every ISA and
    at every M path (the M <= 2 streaming kernels, the register-converting tiles, the converted-block path
    from kInt4DpMinM / kInt8DpMinM rows): the result is the kernel's on the rounded x, bit for bit, within f32
    summation of numpy's rounded product, and measurably not the product of x itself."""
    from er_jax.panels import pack
    from tests.test_quant import bf16_round_numpy
    k, n = 300, 208
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    weights = {"int8": quantize_int8(w), "int4": quantize_int4(w)}
    for m in (1, 2, 5, 8, 16):
        x = rng.standard_normal((m, k)).astype(np.float32)
        xr = bf16_round_numpy(x)
        assert np.any(xr != x)
        for scheme, qa in weights.items():
            wq = np.asarray(dequantize(qa), np.float64)
            want, unrounded = xr @ wq, x @ wq
            bound = 2 * _gamma(k + 4 * 3 + 4) * (np.abs(xr) @ np.abs(wq))
            assert np.max(np.abs(unrounded - want) - 2 * bound) > 0  # unrounded x would fail the check below
            for isa in _isas():
                for op, wt in ((native.quant_matmul, qa), (native.matmul, pack(qa))):
                    y = np.asarray(op(jnp.asarray(x), wt, isa=isa))
                    np.testing.assert_array_equal(y, np.asarray(op(jnp.asarray(xr), wt, isa=isa)),
                                                  err_msg=f"{scheme} M={m} {isa}")
                    assert np.all(np.abs(y - want) <= bound), f"{scheme} M={m} {isa}"


@needs_native
def test_isas_agree_bitwise_on_integer_data():
    """Integer-valued data: every sum is exact in f32, so every ISA path must give identical bits."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-3, 4, (7, 301)), jnp.float32)
    w = jnp.asarray(rng.integers(-4, 5, (301, 389)), jnp.float32)
    qa8 = QuantArray(jnp.asarray(rng.integers(-127, 128, (301, 389)), jnp.int8), jnp.ones((1, 389)), None, "int8", 301)
    # int4 with power-of-two scales, any codes and zero points (301 rows: 3 groups, 83 padding rows)
    qa4 = QuantArray(jnp.asarray(rng.integers(0, 256, (192, 389)), jnp.uint8), jnp.full((3, 389), 0.5),
                     jnp.asarray(rng.integers(0, 16, (3, 389)), jnp.uint8), "int4", 301)
    outs = [(native.matmul(x, w, isa=i), native.quant_matmul(x, qa8, isa=i), native.quant_matmul(x, qa4, isa=i))
            for i in _isas()]
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(outs[0][0]), np.asarray(x) @ np.asarray(w))
    np.testing.assert_array_equal(np.asarray(outs[0][2]), np.asarray(quant_matmul_reference(x, qa4)))


@needs_native
@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int4"])
def test_k_split_result_does_not_depend_on_which_thread_ran_what(kind):
    """Row-major weights at M <= 16 split K across the threads; each K range writes its own partial sums and
    they are added in a fixed order, so repeated calls agree bit for bit. (Before, each thread added the ranges
    it happened to claim into its own accumulator: 4-200 of 200 calls differed from the first, M = 1 / 4.)"""
    rng = np.random.default_rng(5)
    k, n = 1536, 576  # >= 96 KiB in every format: both threads run (on a machine that has two)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    w = w.astype(jnp.bfloat16) if kind == "bfloat16" else quantize_int8(w) if kind == "int8" else quantize_int4(w)
    f = jax.jit(lambda x: native.matmul(x, w) if kind == "bfloat16" else native.quant_matmul(x, w))
    for m in (1, 4):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        first = np.asarray(f(x))
        for _ in range(50):
            np.testing.assert_array_equal(np.asarray(f(x)), first)


@pytest.mark.slow
@needs_native
def test_leading_dims_jit_vmap_scan():
    rng = np.random.default_rng(2)
    k, n, layers = 260, 260, 3
    x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((layers, k, n)) / np.sqrt(k), jnp.float32)
    q4 = quantize_int4(ws)  # stacked [L, ...] QuantArray
    q8 = quantize_int8(ws)
    w0 = ws[0]
    q40 = jax.tree_util.tree_map(lambda a: a[0], q4)
    w_abs = _abs_weights(w0)

    # leading dims of x flattened into M; jit
    _check(jax.jit(native.matmul)(x, w0), matmul_reference(x, w0), x, w_abs)
    _check(jax.jit(native.quant_matmul)(x, q40), quant_matmul_reference(x, q40), x, _abs_weights(q40), 40)

    # vmap over x only (folded into one call) and over the weights (one call per weight)
    xb = jnp.asarray(rng.standard_normal((4, 5, k)), jnp.float32)
    _check(jax.vmap(lambda xi: native.matmul(xi, w0))(xb), matmul_reference(xb, w0), xb, w_abs)
    y = jax.vmap(lambda qa: native.quant_matmul(x, qa))(q4)
    ref = jnp.stack([quant_matmul_reference(x, jax.tree_util.tree_map(lambda a: a[i], q4)) for i in range(layers)])
    _check(y, ref, jnp.broadcast_to(x, (layers, *x.shape)), _abs_weights(q40) * 2, 40)
    y = jax.vmap(native.quant_matmul)(jnp.broadcast_to(x, (layers, *x.shape)), q8)
    ref = jnp.stack([quant_matmul_reference(x, jax.tree_util.tree_map(lambda a: a[i], q8)) for i in range(layers)])
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)

    # lax.scan over stacked layers, inside jit
    def body(h, w):
        return native.matmul(h, w), None

    def body_q(h, qa):
        return native.quant_matmul(h, qa), None

    h_ref = x
    for i in range(layers):
        h_ref = matmul_reference(h_ref, ws[i])
    h = jax.jit(lambda x, ws: jax.lax.scan(body, x, ws)[0])(x, ws)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=1e-4, atol=1e-5)
    hq = jax.jit(lambda x, q: jax.lax.scan(body_q, x, q)[0])(x, q4)
    hq_ref = x
    for i in range(layers):
        hq_ref = quant_matmul_reference(hq_ref, jax.tree_util.tree_map(lambda a: a[i], q4))
    np.testing.assert_allclose(np.asarray(hq), np.asarray(hq_ref), rtol=1e-4, atol=1e-5)


def test_routes_to_reference_outside_its_domain():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
    x_big = jnp.asarray(rng.standard_normal((native.MAX_M + 1, 64)), jnp.float32)
    if native.available():  # past MAX_M even an explicit isa takes the reference
        np.testing.assert_allclose(np.asarray(native.matmul(x_big, w, isa=native.isa())),
                                   np.asarray(matmul_reference(x_big, w)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(native.matmul(x_big, w)), np.asarray(matmul_reference(x_big, w)),
                               rtol=1e-5, atol=1e-5)
    x16 = x_big[:3].astype(jnp.float16)
    y = native.matmul(x16, w)
    assert y.dtype == jnp.float16
    qa = quantize_int4(w)
    y = native.quant_matmul(x16, qa)
    assert y.dtype == jnp.float16 and y.shape == (3, 48)
    assert native.matmul(x_big[:0], w).shape == (0, 48)


def test_bad_input_raises_value_error():
    w = jnp.ones((8, 4), jnp.float32)
    qa = quantize_int8(w)
    x = jnp.ones((2, 8), jnp.float32)
    with pytest.raises(ValueError, match="float"):
        native.matmul(jnp.ones((2, 8), jnp.int32), w)
    with pytest.raises(ValueError, match="2-D"):
        native.matmul(x, jnp.ones((2, 8, 4)))
    with pytest.raises(ValueError, match="K = 8"):
        native.matmul(jnp.ones((2, 7)), w)
    with pytest.raises(ValueError, match="float"):
        native.matmul(x, jnp.ones((8, 4), jnp.int8))
    with pytest.raises(ValueError, match="QuantArray"):
        native.quant_matmul(x, w)
    with pytest.raises(ValueError, match="K = 8"):
        native.quant_matmul(jnp.ones((2, 9)), qa)
    with pytest.raises(ValueError, match="int8 data must be int8"):
        native.quant_matmul(x, QuantArray(qa.data.astype(jnp.int32), qa.scale, None, "int8", 8))
    q4 = quantize_int4(w)
    with pytest.raises(ValueError, match="zero must be uint8"):
        native.quant_matmul(x, QuantArray(q4.data, q4.scale, None, "int4", 8))
    with pytest.raises(ValueError, match="2-D"):
        native.quant_matmul(x, quantize_int8(jnp.ones((2, 8, 4))))
    if native.available():
        with pytest.raises(ValueError, match="isa"):
            native.matmul(x, w, isa="sse9")


def _run_isolated(code, **env):
    full = {**os.environ, **env, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@needs_native
def test_env_var_forces_each_isa_and_rejects_unknown():
    code = ("import numpy as np, jax.numpy as jnp\n"
            "from er_jax.kernels import native\n"
            "x = jnp.asarray(np.arange(6.0).reshape(2, 3), jnp.float32); w = jnp.ones((3, 5), jnp.float32)\n"
            "y = native.matmul(x, w)\n"
            "print(native.isa(), native.available(), float(y.sum()), native.why_unavailable())")
    for isa in _isas():
        out = _run_isolated(code, ER_JAX_NATIVE_ISA=isa).split()
        assert out[:3] == [isa, "True", "75.0"], out
    out = _run_isolated(code, ER_JAX_NATIVE_ISA="mmx")
    assert out.startswith(" False 75.0") or "False 75.0" in out and "ER_JAX_NATIVE_ISA=mmx" in out, out


# (L, B, S, KV, G, hd, T): decode (T = 1), verify (T = γ + 1) and a prefill-like T whose T * G rows span
# several work items; G = 1 / 3 / 7, hd a multiple of the vector width or not (a scalar tail). A work item
# takes all KV heads of its batch row when there are at least 2 items per thread, else one: B = 1 with one
# chunk always takes one head, and threads=1 makes every B >= 2 shape take all of them. With an f32 cache,
# 2+ threads, fewer than 2 batch rows per thread and all query rows in one chunk, a row's >= 128 keys are
# split into parts (attend_split): the last four shapes, one query of each of their rows placed near the
# cache's end.
ATTN_SHAPES = ((3, 2, 40, 3, 3, 64, 1), (2, 3, 37, 2, 4, 32, 5), (1, 1, 300, 3, 3, 64, 12), (2, 2, 70, 1, 7, 20, 40),
               (2, 1, 50, 3, 3, 64, 1), (1, 6, 33, 2, 3, 20, 2), (1, 3, 45, 2, 3, 128, 3),  # hd 64 / 128: unrolled
               (2, 1, 300, 3, 3, 64, 1), (1, 2, 200, 3, 3, 64, 8), (1, 1, 150, 2, 3, 20, 1), (1, 1, 257, 1, 4, 128, 3))


@needs_native
@pytest.mark.parametrize("dt", slow_after(["bfloat16", "float32"]))
def test_attention_every_isa(dt):
    """Attention over the stacked cache, read in place at a traced layer, against attention_reference on
    that layer's slice. Positions span 0 .. S + 2 (past the cache's end: every key visible). Scores and
    outputs are O(1) here, so f32 agrees to ~1e-6 (bound 2e-5); bf16 to its rounding of p and of the
    output (observed <= 2e-3, bound 3e-2) — a masking, head-mapping or layer error moves outputs by O(0.1)."""
    from er_jax.kernels.attention import attention_reference
    rng = np.random.default_rng(7)
    tol = 2e-5 if dt == "float32" else 3e-2
    for (L, B, S, KV, G, hd, T) in ATTN_SHAPES:
        k, v = (jnp.asarray(rng.normal(size=(L, B, S, KV, hd)), dt) for _ in range(2))
        q = jnp.asarray(rng.normal(size=(B, T, KV * G, hd)), dt)
        pos = jnp.asarray(rng.integers(0, S + 3, size=(B, T)), jnp.int32)
        if S >= 150:  # every batch row long enough to split (one query of each row near the cache's end)
            pos = pos.at[:, 0].set(S - 1 - jnp.arange(B, dtype=jnp.int32))
        refs = [attention_reference(q, k[i], v[i], pos) for i in range(L)]
        for isa, threads in [(isa, None) for isa in _isas()] + [(None, 1)]:
            f = jax.jit(lambda q, k, v, p, i: native.attention(q, k, v, p, layer=i, isa=isa, threads=threads))
            for i in range(L):
                got = f(q, k, v, pos, jnp.int32(i))
                assert got.dtype == q.dtype and got.shape == q.shape
                err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - refs[i].astype(jnp.float32))))
                assert err < tol, (isa, threads, dt, (L, B, S, KV, G, hd, T), i, err)
        one = native.attention(q, k[0], v[0], pos)  # one layer's [B, S, KV, hd], no layer=
        assert float(jnp.max(jnp.abs(one.astype(jnp.float32) - refs[0].astype(jnp.float32)))) < tol


@needs_native
@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_attention_never_reads_past_a_rows_keys(dt):
    """Cache rows past a query's position may hold anything (NaN here): the kernel must not read them, on
    any ISA, at hd = 64 / 128 (the unrolled kernels; a bf16 cache's value pass in register tiles) and 20 (the
    run-time loop), for decode and verify rows. Tolerances as in test_attention_every_isa."""
    from er_jax.kernels.attention import attention_reference
    rng = np.random.default_rng(11)
    tol = 2e-5 if dt == "float32" else 3e-2
    shapes = ((3, 40, 3, 3, 64, 1), (2, 37, 2, 2, 20, 4), (2, 33, 1, 3, 64, 8), (2, 30, 2, 2, 128, 3),
              (1, 300, 3, 3, 64, 1), (2, 260, 2, 3, 20, 5), (1, 200, 1, 4, 128, 8))  # split keys (>= 2 threads)
    for (B, S, KV, G, hd, T) in shapes:
        k, v = (rng.normal(size=(1, B, S, KV, hd)).astype(np.float32) for _ in range(2))
        pos = rng.integers(S // 2 if S >= 150 else 0, S - T, size=(B, 1)) + np.arange(T)[None, :]
        q = jnp.asarray(rng.normal(size=(B, T, KV * G, hd)), dt)
        past = np.arange(S)[None, :] > pos.max(axis=1)[:, None]  # [B, S]: no query of the row sees these keys
        # Copies: jax may alias a numpy buffer and read it after the NaNs below are written (it did, 2026-12-07).
        ref = attention_reference(q, jnp.asarray(k[0].copy(), dt), jnp.asarray(v[0].copy(), dt),
                                  jnp.asarray(pos, jnp.int32))
        k[:, past], v[:, past] = np.nan, np.nan
        for isa in _isas():
            got = native.attention(q, jnp.asarray(k, dt), jnp.asarray(v, dt), jnp.asarray(pos, jnp.int32), layer=0,
                                   isa=isa)
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
            assert err < tol, (isa, (B, S, KV, G, hd, T), err)


# -- sampling -----------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("v", slow_after([49152, 1, 7, 1001]))
def test_sample_every_isa(v):
    """Inverse-CDF sampling against an independent float64 CDF: the token must be the one whose interval
    [c_{j-1}, c_j) holds u * total, up to the f32 rounding of the weights (the kernel's exp: ~2e-7 relative
    per weight, bound 1e-5 of the total). Entries at -inf (weight 0) are never drawn; the plain-jnp
    reference (f32 cumsum) agrees with the kernel on every row whose u * total is not within 1e-4 of a step."""
    from er_jax.sampling import sample_inverse_cdf_reference
    rng = np.random.default_rng(v)
    b = 64
    logw = rng.normal(size=(b, v)).astype(np.float32) * 3
    logw[rng.random((b, v)) < 0.2] = -np.inf
    logw[:, rng.integers(v)] = rng.normal(size=b).astype(np.float32)  # every row keeps a finite entry
    u = rng.random(b).astype(np.float32)
    u[:3] = (0.0, np.nextafter(np.float32(1), np.float32(0)), 0.5)
    z = logw.astype(np.float64) - logw.max(axis=1, keepdims=True)
    c = np.cumsum(np.exp(z), axis=1)
    total, x = c[:, -1], u.astype(np.float64) * c[:, -1]
    ref = np.asarray(sample_inverse_cdf_reference(jnp.asarray(u), jnp.asarray(logw)))
    for isa in _isas():
        tok = np.asarray(native.sample_inverse_cdf(jnp.asarray(u), jnp.asarray(logw), isa=isa))
        assert tok.dtype == np.int32 and tok.shape == (b,)
        assert np.isfinite(logw[np.arange(b), tok]).all(), (isa, "drew a zero-weight entry")
        lo = np.where(tok > 0, c[np.arange(b), np.maximum(tok - 1, 0)], 0.0)
        hi = c[np.arange(b), tok]
        slack = 1e-5 * total
        assert ((lo <= x + slack) & (x < hi + slack)).all(), (isa, np.nonzero(~((lo <= x + slack) & (x < hi + slack))))
        far = np.min(np.abs(c - x[:, None]), axis=1) > 1e-4 * total
        np.testing.assert_array_equal(tok[far], ref[far], err_msg=isa)


@needs_native
def test_sample_law_and_edges():
    """native.sample (one uniform per row from the keys, then the kernel) draws from softmax(logp): a
    chi-square over 20000 rows sharing one 8-entry distribution (two entries at -inf) fails with
    probability 1e-4 for a correct sampler. Greedy is argmax; a row with no finite entry gets token 0."""
    from tests.helpers import chi2_pvalue
    logp = jnp.log(jnp.asarray([0.3, 0.0, 0.05, 0.2, 0.15, 0.0, 0.25, 0.05], jnp.float32))
    n = 20_000
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(3), r))(jnp.arange(n))
    tok = np.asarray(jax.jit(native.sample)(keys, jnp.broadcast_to(logp, (n, 8))))
    assert chi2_pvalue(np.bincount(tok, minlength=8), np.exp(np.asarray(logp, np.float64))) > 1e-4
    lp = jnp.asarray([[0.0, -1.0, 2.0], [-jnp.inf, -jnp.inf, -jnp.inf]], jnp.float32)
    assert np.asarray(native.sample(keys[:2], lp, greedy=True)).tolist() == [2, 0]
    assert int(native.sample_inverse_cdf(jnp.asarray([0.5], jnp.float32), lp[1:])[0]) == 0
    with pytest.raises(ValueError, match=r"u \[B\] and logw \[B, V\]"):
        native.sample_inverse_cdf(jnp.zeros(3), jnp.zeros((2, 4)))


@needs_native
@pytest.mark.parametrize("sc", [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.3, top_k=3),
                                dict(temperature=0.9, top_p=0.8), dict(temperature=0.0)])
def test_sample_logits_law_and_logprob(sc):
    """native.sample_logits (the token and its log-prob from one pass over the raw logits) against the
    reference's definitions, not its draws: each row's reported log-prob is `reported_log_probs(logits)` at
    the drawn token (to f32 rounding), the token is never an excluded one, and over 20000 rows sharing one
    8-entry row the draws pass a chi-square against exp(log_probs) (false-failure probability 1e-4 per case).
    Greedy: argmax and log_softmax, as the reference."""
    from er_jax.config import SamplingConfig
    from er_jax.sampling import log_probs, reported_log_probs, sample_logits_reference
    from tests.helpers import chi2_pvalue
    sc = SamplingConfig(**sc)
    logits = jnp.asarray([1.0, -2.0, 0.3, 2.2, -jnp.inf, 0.9, 1.7, -0.4], jnp.float32) * 1.5
    n = 20_000
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(7), r))(jnp.arange(n))
    rows = jnp.broadcast_to(logits, (n, 8))
    tok, lp = jax.jit(lambda k, z: native.sample_logits(k, z, sc))(keys, rows)
    tok, lp = np.asarray(tok), np.asarray(lp)
    want_p = np.exp(np.asarray(log_probs(logits[None], sc)[0], np.float64))
    assert tok.dtype == np.int32 and lp.dtype == np.float32 and tok.shape == lp.shape == (n,)
    assert (want_p[tok] > 0).all()
    np.testing.assert_allclose(lp, np.asarray(reported_log_probs(logits[None], sc)[0])[tok], atol=2e-6)
    if sc.greedy:
        ref_tok, ref_lp = sample_logits_reference(keys[:4], rows[:4], sc)
        assert (tok[:4] == np.asarray(ref_tok)).all() and np.allclose(lp[:4], np.asarray(ref_lp), atol=2e-6)
    else:
        assert chi2_pvalue(np.bincount(tok, minlength=8), want_p) > 1e-4


# -- the KV cache write ------------------------------------------------------------------------------
def _write_numpy(k_all, v_all, k, v, pos, layer):
    """The expected cache, by a plain loop: jnp's `.at[].set` rules (negative from the end, else dropped)."""
    ka, va = np.array(k_all), np.array(v_all)
    S = ka.shape[2]
    for b in range(pos.shape[0]):
        for t in range(pos.shape[1]):
            s = int(pos[b, t]) + (S if pos[b, t] < 0 else 0)
            if 0 <= s < S:
                ka[layer, b, s], va[layer, b, s] = np.asarray(k[b, t]), np.asarray(v[b, t])
    return ka, va


@needs_native
@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_kv_write_in_place_matches_reference(dt):
    """native.kv_write == cache.write_layer == a plain loop, bit for bit (a copy), at a static and a traced
    layer, T = 1 and T = 3, positions past either end; and under jit with the cache donated the compiled
    module copies no cache (the point of the op: XLA's CPU scatter round-tripped a bf16 cache through f32)."""
    from er_jax.cache import write_layer
    rng = np.random.default_rng(3)
    L, B, S, KV, hd = 3, 4, 9, 2, 5
    k_all, v_all = (jnp.asarray(rng.normal(size=(L, B, S, KV, hd)), dt) for _ in range(2))
    for T, pos in [(1, [[0], [8], [-1], [9]]), (3, [[0, 1, 2], [6, 7, 8], [-10, -9, -8], [8, 9, 10]])]:
        k, v = (jnp.asarray(rng.normal(size=(B, T, KV, hd)), jnp.float32) for _ in range(2))
        pos = jnp.asarray(pos, jnp.int32)
        kc, vc = k.astype(dt), v.astype(dt)
        for layer in (0, 2):
            want = _write_numpy(k_all, v_all, kc, vc, np.asarray(pos), layer)
            for got in (jax.jit(lambda *a: native.kv_write(*a, layer=layer))(k_all, v_all, k, v, pos),
                        jax.jit(lambda *a: native.kv_write(*a[:5], layer=a[5]))(k_all, v_all, k, v, pos,
                                                                                 jnp.int32(layer)),
                        write_layer(k_all, v_all, k, v, pos, layer)):
                for g, w in zip(got, want):
                    assert g.dtype == jnp.dtype(dt)
                    np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), w.astype(np.float32))
    f = jax.jit(lambda ka, va, k, p: native.kv_write(ka, va, k, k, p, layer=1), donate_argnums=(0, 1))
    hlo = f.lower(k_all, v_all, k, pos).compile().as_text()
    cache_shape = f"[{L},{B},{S},{KV},{hd}]"
    assert "er_jax_native_kv_write" in hlo
    assert not [ln for ln in hlo.splitlines() if " copy(" in ln and cache_shape in ln], hlo
    # On a device mesh the op is the reference's scatter, which GSPMD partitions (no opaque custom call).
    on_mesh = types.SimpleNamespace(mesh="a mesh")
    g = jax.jit(lambda ka, va, k, p: native.kv_write(ka, va, k, k, p, ex=on_mesh, layer=1))
    assert "er_jax_native_kv_write" not in g.lower(k_all, v_all, k, pos).as_text()


def test_kv_write_refuses_bad_shapes():
    ka = jnp.zeros((2, 3, 5, 2, 4))
    with pytest.raises(ValueError, match=r"kv_write: want"):
        native.kv_write(ka, ka, jnp.zeros((3, 1, 2, 4)), jnp.zeros((3, 1, 2, 4)), jnp.zeros((3, 2), jnp.int32), layer=0)
    with pytest.raises(ValueError, match=r"kv_write: want"):
        native.kv_write(ka, ka, jnp.zeros((2, 1, 2, 4)), jnp.zeros((2, 1, 2, 4)), jnp.zeros((2, 1), jnp.int32), layer=0)


def test_attention_refuses_bad_input():
    q, k = jnp.ones((1, 1, 6, 8)), jnp.ones((2, 1, 5, 3, 8))
    with pytest.raises(ValueError, match="needs layer="):
        native.attention(q, k, k, jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, S, KV, hd\]"):
        native.attention(q, k[0, 0], k[0, 0], jnp.zeros((1, 1), jnp.int32))


# -- the layer's pointwise ops (kernels/pointwise.py) ----------------------------------------------------
# Shapes: rows x width with widths that are and are not multiples of the vector width (scalar tails), and a
# 64 x 576 one (SmolLM2's hidden size at batch 64) past the size from which the rows split over threads.
POINTWISE_ROWS = ((1, 3), (5, 7), (64, 1))


def _close(got, want, rtol, what):
    """|got - want| <= rtol |want| + rtol * max |want| elementwise (f32 reorderings), or, for bf16 outputs,
    one bf16 rounding on top (2^-7 relative: two nearly equal f32 values can round to neighbouring bf16)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    g, w = (np.asarray(a.astype(jnp.float32), np.float64) for a in (got, want))
    if want.dtype == jnp.bfloat16:
        rtol += 2.0 ** -7
    bound = rtol * (np.abs(w) + np.abs(w).max())
    assert np.all(np.abs(g - w) <= bound), (what, float(np.max(np.abs(g - w) - bound)))


@needs_native
@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_pointwise_ops_every_isa(dt):
    """rms_norm, silu_mul and rope_qkv against their references on every ISA. f32 bounds: the sum of D
    squares in another order (gamma_D, halved by the square root) for rms_norm; a few ulps for the exp /
    divide of silu (Cephes' expf: ~2e-7) and the fused multiply-adds of RoPE. A wrong weight, sign, branch,
    head or table row moves an output by O(|x|)."""
    from er_jax.kernels import pointwise as P
    rng = np.random.default_rng(11)
    for b, t in POINTWISE_ROWS:
        for d in (576, 77):
            x = jnp.asarray(rng.normal(size=(b, t, d)) * 3, dt)
            w = jnp.asarray(1 + 0.2 * rng.normal(size=(d,)), dt)
            want = P.rms_norm_reference(x, w, 1e-5)
            gu = jnp.asarray(rng.normal(size=(b, t, 2 * d)) * 4, dt)  # |gate| up to ~16: both sigmoid branches
            want_s = P.silu_mul(gu)
            for isa in _isas():
                _close(native.rms_norm(x, w, eps=1e-5, isa=isa), want, _gamma(d) + 8 * U, ("rms_norm", isa, d))
                _close(native.silu_mul(gu, isa=isa), want_s, 16 * U, ("silu_mul", isa, d))
        for heads, kv, hd in ((9, 3, 64), (2, 1, 20), (4, 2, 128)):
            qkv = jnp.asarray(rng.normal(size=(b, t, (heads + 2 * kv) * hd)), dt)
            pos = jnp.asarray(rng.integers(0, 5000, size=(b, t)), jnp.int32)
            tables = P.rope_tables(pos, hd, 1e5)
            want = P.rope_qkv(qkv, tables, heads=heads, kv_heads=kv)
            for isa in _isas():
                got = jax.jit(lambda a, c: native.rope_qkv(a, c, heads=heads, kv_heads=kv, isa=isa))(qkv, tables)
                for part, g, wnt in zip("qkv", got, want):
                    _close(g, wnt, 4 * U, ("rope_qkv", isa, hd, part))


def test_pointwise_ops_refuse_bad_input_and_fall_back_on_a_mesh():
    from er_jax.kernels import pointwise as P
    x = jnp.ones((2, 3, 8))
    with pytest.raises(ValueError, match=r"rms_norm: want x \[..., D\] and w \[D\]"):
        native.rms_norm(x, jnp.ones((4,)), eps=1e-5)
    with pytest.raises(ValueError, match=r"rms_norm: want"):
        native.rms_norm(x, jnp.ones((1, 8)), eps=1e-5)
    with pytest.raises(ValueError, match=r"silu_mul: want gate \| up \[..., 2 I\]"):
        native.silu_mul(jnp.ones((2, 7)))
    with pytest.raises(ValueError, match=r"rope_qkv: want q \| k \| v"):
        native.rope_qkv(jnp.ones((2, 3, 71)), P.rope_tables(jnp.zeros((2, 3), jnp.int32), 10, 1e4), heads=3, kv_heads=1)
    with pytest.raises(ValueError, match=r"rope_qkv: want an even head_dim and cos / sin \[2, 3, 4\]"):
        native.rope_qkv(jnp.ones((2, 3, 40)), P.rope_tables(jnp.zeros((2, 2), jnp.int32), 8, 1e4), heads=3, kv_heads=1)
    on_mesh = types.SimpleNamespace(mesh="a mesh")
    hlo = jax.jit(lambda x: native.silu_mul(x, ex=on_mesh)).lower(jnp.ones((2, 8))).as_text()
    assert "er_jax_native" not in hlo
