"""Native CPU matmuls through the XLA FFI (C++ sources in csrc/, design and numbers in docs/native.md).

- `matmul(x, w)`: x [..., K] @ w [K, N], x and w float32 or bfloat16, f32 accumulation, result in x.dtype;
  w may be an `er_jax.panels.PanelArray` (f32 / bf16, int8 or int4 in panel-major layout, what
  `model.execution_layout` gives this backend), which runs native at every M.
- `quant_matmul(x, qa)`: x [..., K] @ an `er_jax.quant.QuantArray` [K, N] ("int8" per-channel or "int4"
  group-128 asymmetric), read in its own layout (docs/internals.md), f32 / bf16 activations.
- the rest of a decode step: `attention`, `kv_write`, `sample` / `sample_logits`, and the layer's pointwise
  `rms_norm`, `silu_mul`, `rope_qkv` (kernels/pointwise.py).

Both are jit-, vmap- and scan-safe (`jax.ffi.ffi_call` with vmap_method="expand_dims": the handler
broadcasts leading dimensions and, when only x is batched, folds them into M so the weights are still read
once). Whatever they do not handle goes to the plain-jnp references, with the same result dtype: other
float dtypes (f16), more rows than `AUTO_MAX_M` (XLA is faster there), empty operands, a non-CPU default backend,
or an extension that is not built. Malformed input (non-float x, wrong ranks, K mismatch) raises ValueError.

The kernels pick an ISA at load time (AVX-512 / AVX2 / portable, best the CPU runs and that passes a
start-up self-check; "avx512bf16" is the AVX-512 path plus vdpbf16ps for bf16 activations times bf16 / int8 /
int4 panels, the default only on AMD; "amx" adds AMX tiles for those at 12+ rows); the env var
`ER_JAX_NATIVE_ISA=amx|avx512bf16|avx512|avx2|portable` forces one, and the `isa=` keyword of
`matmul` / `quant_matmul` selects one per call (tests, benchmarks). Threads: XLA's own intra-op pool by
default (`ER_JAX_NATIVE_POOL=own` for a private pool sized from the CPU affinity).
"""
from __future__ import annotations

import ctypes
import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from er_jax.cache import write_layer
from er_jax.config import platform
from er_jax.kernels import pointwise
from er_jax.kernels.attention import attention_reference
from er_jax.kernels.quant_matmul import matmul_reference, quant_matmul_reference
from er_jax.kernels.rejection import rejection_sample_reference
from er_jax.panels import PANEL, PanelArray
from er_jax.quant import QuantArray
from er_jax.sampling import sample as gumbel_sample
from er_jax.sampling import (sample_inverse_cdf_reference, sample_logits_reference, sampling_logits,
                             token_logprob, uniforms)

ISAS = {"portable": 1, "avx2": 2, "avx512": 3, "avx512bf16": 4, "amx": 5}
# The kernels' domain: M = product of x's leading dimensions (rows x positions) up to MAX_M.
MAX_M = 256
# Without an explicit `isa=`, rows beyond these go to XLA (dense: Eigen's f32 GEMM; quantized: dequantize
# + dot), which was as fast or faster there on the 2-core AVX2 machine (docs/native.md, "Large M"). With
# `isa=` the kernel runs for any M <= MAX_M.
AUTO_MAX_M = {"dense": 32, "quant": 64}
# ... and f32 x f32 products of fewer rows than this go to XLA too: at M = 1 its f32 GEMV and our kernel are
# level (18-26 GB/s each, XLA ahead on SmolLM2's head and [576, 1536]); at M = 2 XLA's falls to 7-9 GB/s and
# ours runs 13-19 (docs/cpu_profile.md, "Night"). bf16 / quantized weights stay native at every M.
XLA_F32_BELOW_M = 2

_TARGETS = ("er_jax_native_dense", "er_jax_native_panel", "er_jax_native_panel_int8", "er_jax_native_panel_int4",
            "er_jax_native_int8", "er_jax_native_int4", "er_jax_native_attention", "er_jax_native_sample",
            "er_jax_native_kv_write", "er_jax_native_rms_norm", "er_jax_native_silu_mul", "er_jax_native_rope_qkv")
_state: dict | None = None


def _library_paths() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(glob.glob(os.path.join(here, "_er_jax_native*.so")))


def _load() -> dict:
    """Load the extension and register its FFI targets, once per process."""
    global _state
    if _state is not None:
        return _state
    st = {"lib": None, "reason": None, "isa": None}
    paths = _library_paths()
    if not paths:
        st["reason"] = ("the native CPU kernels were not built (no C++17 compiler at install time, or "
                        "ER_JAX_NATIVE_BUILD=0): reinstall er_jax with g++ or clang++ present (pip install -e .)")
    else:
        try:
            lib = ctypes.CDLL(paths[0])
            for fn in ("er_jax_native_isa", "er_jax_native_error", "er_jax_native_notes", "er_jax_native_pool"):
                getattr(lib, fn).restype = ctypes.c_char_p
            for fn in ("er_jax_native_usable", "er_jax_native_max_threads", "er_jax_native_affinity_cpus"):
                getattr(lib, fn).restype = ctypes.c_int
            isa = lib.er_jax_native_isa().decode()
            if not isa:
                st["reason"] = f"the native CPU kernels cannot run: {lib.er_jax_native_error().decode()}"
            else:
                for name in _TARGETS:
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
                st["lib"], st["isa"] = lib, isa
        except (OSError, AttributeError) as e:
            st["reason"] = f"the native CPU kernels ({os.path.basename(paths[0])}) could not be loaded: {e}"
    _state = st
    return st


def available() -> bool:
    """True when the extension is built, loads, and has kernels this CPU can run."""
    return _load()["lib"] is not None


def why_unavailable() -> str | None:
    """One sentence saying why `available()` is False (None when it is True)."""
    return _load()["reason"]


def isa() -> str:
    """The ISA path the kernels use by default ("avx512bf16", "avx512", "avx2", "portable"), or "" when unavailable."""
    return _load()["isa"] or ""


def usable_isas() -> list[str]:
    """Every ISA path this CPU runs (and that passed the start-up self-check), best last."""
    lib = _load()["lib"]
    return [] if lib is None else [n for n, c in ISAS.items() if lib.er_jax_native_usable(c)]


def info() -> dict:
    """What the loaded kernels run with: ISA, pool ("xla" = XLA's intra-op pool, "own"), threads."""
    st = _load()
    if st["lib"] is None:
        return {"available": False, "reason": st["reason"]}
    lib = st["lib"]
    return {"available": True, "isa": st["isa"], "usable_isas": usable_isas(),
            "pool": lib.er_jax_native_pool().decode(), "max_threads": lib.er_jax_native_max_threads(),
            "affinity_cpus": lib.er_jax_native_affinity_cpus(), "notes": lib.er_jax_native_notes().decode(),
            "library": _library_paths()[0]}


def _isa_code(isa_name: str | None) -> int:
    if isa_name is None:
        return 0
    if isa_name not in ISAS:
        raise ValueError(f"isa must be one of {sorted(ISAS)} or None, got {isa_name!r}")
    if isa_name not in usable_isas():
        raise ValueError(f"the {isa_name} kernels cannot run here (usable: {usable_isas()})")
    return ISAS[isa_name]


_NATIVE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _check_x(x, k: int, what: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{what}: x must be an array, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"{what}: x must have at least one axis (its last is K), got a scalar")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what}: x must be a float array (float32 / bfloat16), got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has shape {tuple(x.shape)}; its last axis must be the weight's K = {k}")


def _native_ok(x, m: int, n: int, k: int, kind: str, isa_name) -> bool:
    limit = MAX_M if isa_name is not None else AUTO_MAX_M[kind]
    return (jnp.dtype(x.dtype) in _NATIVE_DTYPES and 0 < m <= limit and n > 0 and k > 0 and available()
            and platform() == "cpu")


def matmul(x, w, *, ex=None, name=None, isa: str | None = None, threads: int | None = None):
    """x [..., K] @ w [K, N] -> [..., N] in x.dtype (f32 accumulation). `ex` / `name`: the backend seam's
    uniform signature, ignored. `isa`: run this ISA's kernel for any M <= MAX_M (tests, benchmarks);
    default: the process's ISA up to AUTO_MAX_M rows, XLA beyond. `threads`: cap this call's threads."""
    del ex, name
    if isinstance(w, PanelArray):
        return _panel_matmul(x, w, isa, threads)
    if not hasattr(w, "shape") or not hasattr(w, "dtype") or w.ndim != 2:
        raise ValueError(f"matmul: w must be a 2-D [K, N] array, got {getattr(w, 'shape', type(w).__name__)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"matmul: w must be a float array (float32 / bfloat16), got {w.dtype}")
    k, n = w.shape
    _check_x(x, k, "matmul")
    m = math.prod(x.shape[:-1])
    f32_gemv = isa is None and m < XLA_F32_BELOW_M and x.dtype == w.dtype == jnp.float32
    if f32_gemv or not (_native_ok(x, m, n, k, "dense", isa) and jnp.dtype(w.dtype) in _NATIVE_DTYPES):
        return matmul_reference(x, w)
    x2 = _rows(x)
    return jax.ffi.ffi_call("er_jax_native_dense", jax.ShapeDtypeStruct((*x2.shape[:-1], n), x.dtype),
                            vmap_method="expand_dims")(x2, w, isa=np.int32(_isa_code(isa)),
                                                       threads=np.int32(threads or 0)).reshape(*x.shape[:-1], n)


def _rows(x):
    """x as the handlers take it: leading dimensions (with unbatched weights, all of them are rows of one
    matmul) kept as they are, so that XLA inserts no copy between the model's [B, T, ...] arrays and a
    call (reshaping [B, 1, K] to [B, K] and back made it copy, with a size-1 axis laid out as the major
    one, around every call); a vector becomes one row."""
    return x.reshape(1, -1) if x.ndim == 1 else x


def _panel_matmul(x, pa: PanelArray, isa, threads):
    """`matmul` with panel-major weights (dense f32 / bf16, or int8 / int4 in QuantArray's schemes): native
    for every M (products of more than MAX_M rows run in MAX_M-row pieces, each reading the weights once),
    the reference only where the kernels cannot run."""
    d, scheme, k = pa.data, pa.scheme, pa.in_features
    if d.ndim != 3 or d.shape[2] != PANEL:
        raise ValueError(f"matmul: PanelArray data must be [N/{PANEL}, rows, {PANEL}], got {tuple(d.shape)}")
    n = d.shape[0] * PANEL
    groups = -(-k // pa.group_size)
    want = {"dense": {"data": (d.dtype, (d.shape[0], k, PANEL)) if jnp.dtype(d.dtype) in _NATIVE_DTYPES else None},
            "int8": {"data": (jnp.int8, (d.shape[0], k, PANEL)), "scale": (jnp.float32, (1, n))},
            "int4": {"data": (jnp.uint8, (d.shape[0], groups * pa.group_size // 2, PANEL)),
                     "scale": (jnp.float32, (groups, n)), "zero": (jnp.uint8, (groups, n))}}[scheme]
    if scheme == "int4" and (pa.group_size < 8 or pa.group_size % 8):
        raise ValueError(f"matmul: int4 panels need a group_size that is a multiple of 8 (their 8-row lines), "
                         f"got {pa.group_size}; keep such weights as a QuantArray (panels.can_pack is False)")
    for field, spec in want.items():
        a = getattr(pa, field)
        if spec is None or jnp.dtype(a.dtype) != jnp.dtype(spec[0]) or tuple(a.shape) != spec[1]:
            expect = "float32 / bfloat16" if spec is None else f"{jnp.dtype(spec[0])} {spec[1]}"
            raise ValueError(f"matmul: a {scheme} PanelArray's {field} must be {expect} for K={k}, N={n}; got "
                             f"{a.dtype} {tuple(a.shape)}")
    m = math.prod(x.shape[:-1])
    _check_x(x, k, "matmul")
    if not (jnp.dtype(x.dtype) in _NATIVE_DTYPES and m > 0 and available() and platform() == "cpu"):
        return matmul_reference(x, pa)
    code = _isa_code(isa)
    target, operands = {"dense": ("er_jax_native_panel", (d,)), "int8": ("er_jax_native_panel_int8", (d, pa.scale)),
                        "int4": ("er_jax_native_panel_int4", (d, pa.scale, pa.zero))}[scheme]
    run = lambda xs: jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((*xs.shape[:-1], n), x.dtype),
                                      vmap_method="expand_dims")(xs, *operands, isa=np.int32(code),
                                                                 threads=np.int32(threads or 0))
    if m <= MAX_M:
        return run(_rows(x)).reshape(*x.shape[:-1], n)
    x2 = x.reshape(m, k)
    return jnp.concatenate([run(x2[i:i + MAX_M]) for i in range(0, m, MAX_M)]).reshape(*x.shape[:-1], n)


def quant_matmul(x, qa, *, ex=None, name=None, isa: str | None = None, threads: int | None = None):
    """x [..., K] @ dequantize(qa) -> [..., N] in x.dtype (f32 accumulation), qa a 2-D QuantArray read in
    place. `ex` / `name` are ignored (the backend seam's signature); `isa`, `threads` as in `matmul`."""
    del ex, name
    if not isinstance(qa, QuantArray):
        raise ValueError(f"quant_matmul: qa must be an er_jax.quant.QuantArray, got {type(qa).__name__}")
    if qa.data.ndim != 2:
        raise ValueError(f"quant_matmul: only 2-D [K, N] QuantArrays (one layer); got data of shape "
                         f"{tuple(qa.data.shape)}")
    k, n = qa.in_features, qa.data.shape[-1]
    _check_x(x, k, "quant_matmul")
    if qa.scheme == "int8":
        want = {"data": (jnp.int8, (k, n)), "scale": (jnp.float32, (1, n))}
    elif qa.scheme == "int4":
        g = qa.group_size
        groups = -(-k // g)
        if g < 2 or g % 2:
            raise ValueError(f"quant_matmul: int4 group_size must be even, got {g}")
        want = {"data": (jnp.uint8, (groups * g // 2, n)), "scale": (jnp.float32, (groups, n)),
                "zero": (jnp.uint8, (groups, n))}
    else:
        raise ValueError(f"quant_matmul: unknown QuantArray scheme {qa.scheme!r} (int4 / int8)")
    for field, (dtype, shape) in want.items():
        a = getattr(qa, field)
        if a is None or jnp.dtype(a.dtype) != jnp.dtype(dtype) or tuple(a.shape) != shape:
            got = None if a is None else f"{a.dtype} {tuple(a.shape)}"
            raise ValueError(f"quant_matmul: {qa.scheme} {field} must be {jnp.dtype(dtype)} {shape} for K={k}, "
                             f"N={n}; got {got}")
    m = math.prod(x.shape[:-1])
    if not _native_ok(x, m, n, k, "quant", isa):
        return quant_matmul_reference(x, qa)
    code, x2 = _isa_code(isa), _rows(x)
    out = jax.ShapeDtypeStruct((*x2.shape[:-1], n), x.dtype)
    if qa.scheme == "int8":
        y = jax.ffi.ffi_call("er_jax_native_int8", out, vmap_method="expand_dims")(
            x2, qa.data, qa.scale, isa=np.int32(code), threads=np.int32(threads or 0))
    else:
        y = jax.ffi.ffi_call("er_jax_native_int4", out, vmap_method="expand_dims")(
            x2, qa.data, qa.scale, qa.zero, isa=np.int32(code), threads=np.int32(threads or 0))
    return y.reshape(*x.shape[:-1], n)


def attention(q, k, v, q_pos, *, ex=None, layer=None, isa: str | None = None, threads: int | None = None):
    """`attention_reference(q, k[layer], v[layer], q_pos)` with the cache read in place: q [B, T, H, hd];
    k, v one layer's [B, S, KV, hd], or the stacked [L, B, S, KV, hd] with `layer` (an int or a traced
    int32 scalar). f32 / bf16; anything else (or no extension, a non-CPU backend) goes to the reference.
    Only the keys up to each query's position are read; queries with q_pos < 0 get zeros (the reference:
    NaN). `isa`, `threads` as in `matmul`."""
    del ex
    if k.ndim == 5:
        if layer is None:
            raise ValueError(f"attention: a stacked cache {tuple(k.shape)} needs layer=")
    elif k.ndim == 4 and layer is None:
        k, v, layer = k[None], v[None], 0
    else:
        raise ValueError(f"attention: k must be [B, S, KV, hd] (or [L, B, S, KV, hd] with layer=), got "
                         f"{tuple(k.shape)} with layer={layer!r}")
    native_ok = (all(jnp.dtype(a.dtype) in _NATIVE_DTYPES for a in (q, k, v)) and k.dtype == v.dtype
                 and q.ndim == 4 and available() and platform() == "cpu")
    if not native_ok:
        return attention_reference(q, k[layer], v[layer], q_pos)
    # The output as [B, T, H * hd] (what the model's next matmul takes, so XLA copies nothing in between).
    b, t, h, hd = q.shape
    o = jax.ffi.ffi_call("er_jax_native_attention", jax.ShapeDtypeStruct((b, t, h * hd), q.dtype),
                         vmap_method="sequential")(q, k, v, q_pos.astype(jnp.int32), jnp.asarray(layer, jnp.int32),
                                                   isa=np.int32(_isa_code(isa)), threads=np.int32(threads or 0))
    return o.reshape(q.shape)


def kv_write(k_all, v_all, k, v, positions, *, ex=None, layer):
    """`er_jax.cache.write_layer` in place (the outputs alias k_all / v_all; with the cache donated nothing
    is copied): XLA's CPU scatter converted a whole bf16 cache to f32 and back around each layer's write.
    Other dtypes, no extension, a non-CPU backend, or a device mesh (GSPMD partitions the reference's scatter;
    it would gather the whole cache around an opaque custom call): the reference."""
    shapes = tuple(tuple(getattr(a, "shape", ())) for a in (k_all, v_all, k, v, positions))
    if (len(shapes[0]) != 5 or shapes[1] != shapes[0] or len(shapes[2]) != 4 or shapes[3] != shapes[2]
            or shapes[2][0] != shapes[0][1] or shapes[2][2:] != shapes[0][3:] or shapes[4] != shapes[2][:2]):
        raise ValueError(f"kv_write: want k_all / v_all [L, B, S, KV, hd], k / v [B, T, KV, hd] and positions "
                         f"[B, T]; got {', '.join(map(str, shapes))}")
    k, v = k.astype(k_all.dtype), v.astype(v_all.dtype)
    if not (available() and platform() == "cpu" and jnp.dtype(k_all.dtype) in _NATIVE_DTYPES
            and v_all.dtype == k_all.dtype and getattr(ex, "mesh", None) is None):
        return write_layer(k_all, v_all, k, v, positions, layer)
    out = (jax.ShapeDtypeStruct(k_all.shape, k_all.dtype), jax.ShapeDtypeStruct(v_all.shape, v_all.dtype))
    return jax.ffi.ffi_call("er_jax_native_kv_write", out, vmap_method="sequential",
                            input_output_aliases={0: 0, 1: 1})(
        k_all, v_all, k, v, positions.astype(jnp.int32), jnp.asarray(layer, jnp.int32))


def sample_inverse_cdf(u, logw, *, isa: str | None = None, threads: int | None = None, with_logprob: bool = False):
    """`sample_inverse_cdf_reference(u, logw)` in one native pass per row (vector exp, f64 sums): u f32 [B],
    logw f32 [B, V] -> int32 [B]; with_logprob: (tokens, log-probs f32 [B]), the drawn token's log-prob under
    softmax(logw) (logw need not be normalized). Other dtypes or ranks, no extension or a non-CPU backend: the
    reference."""
    if logw.ndim != 2 or u.shape != logw.shape[:1]:
        raise ValueError(f"sample: want u [B] and logw [B, V], got u {tuple(u.shape)}, logw {tuple(logw.shape)}")
    if not (available() and platform() == "cpu" and logw.dtype == jnp.float32 and logw.shape[1] > 0):
        tok = sample_inverse_cdf_reference(u, logw)
        return (tok, token_logprob(jax.nn.log_softmax(logw, axis=-1), tok)) if with_logprob else tok
    tok, lp = jax.ffi.ffi_call("er_jax_native_sample", (jax.ShapeDtypeStruct(u.shape, jnp.int32),
                                                        jax.ShapeDtypeStruct(u.shape, jnp.float32)),
                               vmap_method="sequential")(logw, u.astype(jnp.float32), isa=np.int32(_isa_code(isa)),
                                                         threads=np.int32(threads or 0))
    return (tok, lp) if with_logprob else tok


def sample(keys, logp, *, ex=None, greedy=False):
    """The registry's `sample` op: one token per row from softmax(logp) by inverse CDF on one uniform per
    row (`uniforms(keys)`), instead of V Gumbel variates; greedy: argmax. Without the extension (or off
    CPU) it is XLA's Gumbel-max `er_jax.sampling.sample` — the same law from the same keys."""
    del ex
    if greedy or not available() or platform() != "cpu":
        return gumbel_sample(keys, logp, greedy)
    return sample_inverse_cdf(uniforms(keys), logp.astype(jnp.float32))


def sample_logits(keys, logits, sc, *, ex=None):
    """The registry's `sample_logits` op (`sampling.sample_logits_reference`'s law): the token by inverse CDF
    straight from the filtered, tempered logits, and its log-prob from the same pass — no normalized
    [B, V] array (XLA's log_softmax of 64 x 49152 logits took 4.4-7 ms, more than the draw). Greedy, or no
    native kernel here: the reference's composition with this backend's `sample`."""
    if sc.greedy or not available() or platform() != "cpu":
        return sample_logits_reference(keys, logits, sc, sample_op=lambda k, lp, greedy: sample(k, lp, greedy=greedy))
    return sample_inverse_cdf(uniforms(keys), sampling_logits(logits, sc), with_logprob=True)


def rejection_sample(target_logits, draft_logits, draft_tokens, sc, keys, *, ex):
    """The reference's verification, its corrected token drawn by `sample` above."""
    return rejection_sample_reference(target_logits, draft_logits, draft_tokens, sc, keys,
                                      lambda k, logp, greedy: sample(k, logp, greedy=greedy))


def _pointwise_ok(ex, *arrays) -> bool:
    """Whether the native pointwise ops run these operands here (else their references): f32 / bf16, not
    empty, the extension on a CPU, and no device mesh (GSPMD would gather around an opaque custom call)."""
    return (all(jnp.dtype(a.dtype) in _NATIVE_DTYPES and a.size > 0 for a in arrays) and available()
            and platform() == "cpu" and getattr(ex, "mesh", None) is None)


def rms_norm(x, w, *, eps, ex=None, isa: str | None = None, threads: int | None = None):
    """`pointwise.rms_norm_reference(x, w, eps)` in one native call: x [..., D], w [D] -> x's dtype."""
    if getattr(w, "ndim", None) != 1 or getattr(x, "ndim", 0) < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"rms_norm: want x [..., D] and w [D], got x {tuple(getattr(x, 'shape', ()))}, "
                         f"w {tuple(getattr(w, 'shape', ()))}")
    if not _pointwise_ok(ex, x, w):
        return pointwise.rms_norm_reference(x, w, eps)
    return jax.ffi.ffi_call("er_jax_native_rms_norm", jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="sequential")(x, w, eps=np.float32(eps), isa=np.int32(_isa_code(isa)),
                                                      threads=np.int32(threads or 0))


def silu_mul(gate_up, *, ex=None, isa: str | None = None, threads: int | None = None):
    """`pointwise.silu_mul` in one native call: gate | up [..., 2 I] -> silu(gate) * up [..., I]."""
    if getattr(gate_up, "ndim", 0) < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: want gate | up [..., 2 I], got {tuple(getattr(gate_up, 'shape', ()))}")
    if not _pointwise_ok(ex, gate_up):
        return pointwise.silu_mul(gate_up)
    out = jax.ShapeDtypeStruct((*gate_up.shape[:-1], gate_up.shape[-1] // 2), gate_up.dtype)
    return jax.ffi.ffi_call("er_jax_native_silu_mul", out, vmap_method="sequential")(
        gate_up, isa=np.int32(_isa_code(isa)), threads=np.int32(threads or 0))


def rope_qkv(qkv, tables, *, heads, kv_heads, ex=None, isa: str | None = None, threads: int | None = None):
    """`pointwise.rope_qkv` in one native call: q | k | v [B, T, (H + 2 KV) hd] and the positions'
    `rope_tables` (cos, sin f32 [B, T, hd / 2]) -> q [B, T, H, hd], k and v [B, T, KV, hd], q and k rotated."""
    parts = heads + 2 * kv_heads
    if getattr(qkv, "ndim", None) != 3 or heads < 1 or kv_heads < 1 or qkv.shape[-1] % parts:
        raise ValueError(f"rope_qkv: want q | k | v [B, T, (heads + 2 kv_heads) hd] with heads={heads}, "
                         f"kv_heads={kv_heads}; got {tuple(getattr(qkv, 'shape', ()))}")
    b, t, n = qkv.shape
    hd = n // parts
    cos, sin = tables
    if hd % 2 or any(tuple(a.shape) != (b, t, hd // 2) for a in (cos, sin)):
        raise ValueError(f"rope_qkv: want an even head_dim and cos / sin [{b}, {t}, {hd // 2}]; got head_dim {hd}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if not _pointwise_ok(ex, qkv):
        return pointwise.rope_qkv(qkv, tables, heads=heads, kv_heads=kv_heads)
    outs = tuple(jax.ShapeDtypeStruct((b, t, nh, hd), qkv.dtype) for nh in (heads, kv_heads, kv_heads))
    return jax.ffi.ffi_call("er_jax_native_rope_qkv", outs, vmap_method="sequential")(
        qkv, cos.astype(jnp.float32), sin.astype(jnp.float32), heads=np.int64(heads), kv_heads=np.int64(kv_heads),
        isa=np.int32(_isa_code(isa)), threads=np.int32(threads or 0))


IMPLS = {"matmul": matmul, "quant_matmul": quant_matmul, "attention": attention, "kv_write": kv_write,
         "sample": sample, "sample_logits": sample_logits, "rejection_sample": rejection_sample,
         "rms_norm": rms_norm, "silu_mul": silu_mul, "rope_qkv": rope_qkv}
