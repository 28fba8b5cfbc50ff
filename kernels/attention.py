"""Ragged flash-decoding attention over the contiguous KV cache of one layer.

Semantics are exactly `attention_reference` below (the plain-jnp definition, also the XLA backend):
q [B, T, H, hd], k / v [B, S, KV, hd], q_pos int [B, T]; key j is visible to query (b, t) iff
j <= q_pos[b, t]; GQA with H = KV * G. Used for T = 1 (decode, draft) and T = γ + 1 (verify).

Lowering: `er_jax.kernels.call` (interpret mode on CPU, Triton with per-shape `num_warps` / `num_stages`
on GPU). The K / V
refs cover a row's whole cache (with Triton a ref is a pointer: nothing is read until a tile is loaded);
the body loads [block_s, hd] tiles with `pl.ds` inside a `lax.fori_loop` whose bounds depend on the row's
positions, so cache blocks beyond max(q_pos[b]) are never read. (A backend that copies whole blocks
ahead of the body, Mosaic TPU / Mosaic GPU, would want `memory_space=ANY` and manual copies instead.)

Grid (B, KV, row tiles, splits). The T*G query rows of one KV head (rows padded to a power of two >= 16)
are cut into tiles of at most MAX_ROWS = 128 rows, one per program ([rows, hd]: prefill of a 512-token
prompt at G = 6 is 24 tiles, not one 4096-row program), and the visible blocks of a tile (up to its own
largest position: causal, so early tiles read less) are divided evenly among the `splits` programs
(dynamically, from max(q_pos[b]), so short rows do not leave most splits idle). Each runs an online
softmax; with one split it normalizes and writes the output, otherwise it writes (o, m, l) partials
that the wrapper merges. A cache length S that is not a multiple of the tile re-reads its last tile at
the clamped start S - block_s with the overlap masked off (no copy of the cache). The cache may also be
passed stacked [L, B, S, KV, hd] with a (traced) `layer` index, read in place.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from er_jax.kernels import (MIN_DOT, Tuning, call, check_positive_pow2, clamped_tile, next_pow2, prev_pow2,
                            resolve_interpret, round_up)

DEFAULT_BLOCK_S = 128
TARGET_PROGRAMS = 256  # splits * B * KV programs to aim for
MAX_SPLITS = 32
MAX_ROWS = 128  # query rows per program (one tile of the grid's row axis)
_NEG = -1e30  # running-max start: finite, so rows with nothing visible yet never produce inf - inf


def attention_reference(q, k, v, q_pos):
    """Causal GQA attention of queries at absolute positions `q_pos` over keys at positions 0..S-1.

    q [B, T, H, hd]; k, v [B, S, KV, hd]; q_pos int [B, T]. Key j is visible to query (b, t) iff
    j <= q_pos[b, t]; keys past a row's length are masked by that rule. Returns [B, T, H, hd].
    """
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(hd)
    visible = jnp.arange(k.shape[1])[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, hd).astype(q.dtype)


def _attention_kernel(layer_ref, q_ref, pos_ref, k_ref, v_ref, *out_refs, block_s, seq_len, splits, sqrt_hd,
                      precision):
    # layer_ref int32 [1]; q_ref [R, hd] (one row tile); pos_ref int32 [R]; k_ref / v_ref [L, S, hd];
    # out: o [R, hd] or (o f32, m, l) partials
    layer = layer_ref[0]
    q = q_ref[...]
    pos = pos_ref[...]
    n_blocks = pl.cdiv(seq_len, block_s)
    need = jnp.minimum(jnp.max(pos) // block_s + 1, n_blocks)  # blocks that hold a visible key
    per = (need + splits - 1) // splits
    lo = pl.program_id(3) * per
    hi = jnp.minimum(lo + per, need)

    def body(i, carry):
        o, m, l = carry
        start, idx, fresh = clamped_tile(i, block_s, seq_len)
        kb = k_ref[layer, pl.ds(start, block_s), :]
        vb = v_ref[layer, pl.ds(start, block_s), :]
        s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) / sqrt_hd
        visible = fresh[None, :] & (idx[None, :] <= pos[:, None])
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, -jnp.inf), axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = l * alpha + jnp.sum(p, axis=1)
        o = o * alpha[:, None] + lax.dot(p.astype(vb.dtype), vb, precision=precision,
                                         preferred_element_type=jnp.float32)
        return o, m_new, l

    rows, hd = q_ref.shape
    init = (jnp.zeros((rows, hd), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o, m, l = lax.fori_loop(lo, hi, body, init)
    if len(out_refs) == 1:
        (o_ref,) = out_refs
        o_ref[...] = (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l


def _auto_splits(batch: int, kv_heads: int, n_blocks: int) -> int:
    return max(1, min(n_blocks, MAX_SPLITS, -(-TARGET_PROGRAMS // (batch * kv_heads))))


def _tuning(rows: int, hd: int) -> Tuning:
    """Triton launch parameters: the f32 accumulator [rows, hd] and the [rows, block_s] scores (~4096) live
    in registers, 4 warps up to 64 x 128 accumulator elements, 8 beyond (128 query rows at hd = 128). The
    K / V tiles ([block_s, hd] each) are double-buffered across the (dynamic-bound) key loop."""
    return Tuning(num_warps=4 if rows * hd <= 64 * 128 else 8, num_stages=2)


@functools.partial(jax.jit, static_argnames=("block_s", "num_splits", "interpret"))
def _ragged_attention(q, k, v, q_pos, layer, *, block_s, num_splits, interpret):
    if k.ndim == 4:  # one layer's cache is a stack of one (a free reshape)
        k, v, layer = k[None], v[None], 0
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    b, t, h, hd = q.shape
    seq, kvh = k.shape[2], k.shape[3]
    g = h // kvh
    r = t * g
    rp = max(MIN_DOT, next_pow2(r))
    br = min(rp, MAX_ROWS)  # rows per program; rp becomes a whole number of tiles
    rp = round_up(rp, br)
    tiles = rp // br
    # Rows of one KV head: r = t * G + g (the reference's [B, T, KV, G] head order).
    qr = q.reshape(b, t, kvh, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, kvh, r, hd)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
    # Keys past S do not exist, so clamping positions to S - 1 keeps the visible set (and lets a tiny
    # cache be padded to one tile below). Padding rows get position 0.
    pos = jnp.minimum(jnp.repeat(q_pos.astype(jnp.int32), g, axis=1), seq - 1)
    pos = jnp.pad(pos, ((0, 0), (0, rp - r)))
    if seq < MIN_DOT:  # tiny caches only (tests): one padded tile
        k = jnp.pad(k, ((0, 0), (0, 0), (0, MIN_DOT - seq), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, MIN_DOT - seq), (0, 0), (0, 0)))
    n_layers, s_len = k.shape[0], k.shape[2]
    # Default tile: [rows, block_s] f32 scores stay around 4096 elements (register budget per program).
    bs = min(block_s or max(MIN_DOT, min(DEFAULT_BLOCK_S, 4096 // br)), prev_pow2(s_len))
    n_blocks = -(-s_len // bs)
    splits = min(num_splits or _auto_splits(b * tiles, kvh, n_blocks), n_blocks)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_attention_kernel, block_s=bs, seq_len=s_len, splits=splits,
                               sqrt_hd=math.sqrt(hd), precision=precision)
    kv_spec = pl.BlockSpec((n_layers, None, s_len, None, hd), lambda i, j, r, s: (0, i, 0, j, 0))
    in_specs = [pl.BlockSpec((1,), lambda i, j, r, s: (0,)),
                pl.BlockSpec((None, None, br, hd), lambda i, j, r, s: (i, j, r, 0)),
                pl.BlockSpec((None, br), lambda i, j, r, s: (i, r)), kv_spec, kv_spec]
    launch = functools.partial(call, kernel, grid=(b, kvh, tiles, splits), in_specs=in_specs,
                               interpret=interpret, tuning=_tuning(br, hd), name="ragged_attention")
    if splits == 1:
        o = launch(out_shape=jax.ShapeDtypeStruct((b, kvh, rp, hd), q.dtype),
                   out_specs=pl.BlockSpec((None, None, br, hd), lambda i, j, r, s: (i, j, r, 0)))(layer, qr, pos, k, v)
    else:
        o, m, l = launch(
            out_shape=(jax.ShapeDtypeStruct((b, kvh, splits, rp, hd), jnp.float32),
                       jax.ShapeDtypeStruct((b, kvh, splits, rp), jnp.float32),
                       jax.ShapeDtypeStruct((b, kvh, splits, rp), jnp.float32)),
            out_specs=(pl.BlockSpec((None, None, None, br, hd), lambda i, j, r, s: (i, j, s, r, 0)),
                       pl.BlockSpec((None, None, None, br), lambda i, j, r, s: (i, j, s, r)),
                       pl.BlockSpec((None, None, None, br), lambda i, j, r, s: (i, j, s, r))))(layer, qr, pos, k, v)
        m_all = jnp.max(m, axis=2, keepdims=True)
        w = jnp.exp(m - m_all)  # splits that saw nothing have l = 0, o = 0
        l_all = jnp.sum(l * w, axis=2)
        o = jnp.sum(o * w[..., None], axis=2) / jnp.where(l_all > 0, l_all, 1.0)[..., None]
        o = o.astype(q.dtype)
    o = o[:, :, :r].reshape(b, kvh, t, g, hd).transpose(0, 2, 1, 3, 4)
    return o.reshape(b, t, h, hd)


def ragged_attention(q, k, v, q_pos, *, layer=None, block_s=None, num_splits=None, interpret=None):
    """Causal GQA attention of queries at absolute positions `q_pos` over one layer's contiguous cache.

    q [B, T, H, hd]; k, v [B, S, KV, hd]; q_pos int [B, T] (>= 0). Returns [B, T, H, hd] in q.dtype,
    equal to `attention_reference(q, k, v, q_pos)`. With `layer` (an int, traced or not),
    k and v are the whole stacked cache [L, B, S, KV, hd] and layer `layer` is read in place (inside a
    scan over layers this avoids the copy XLA makes of `k_all[i]` to feed a custom call).
    block_s: power-of-two key tile (default 128; less when more than 32 query rows T * H / KV share a
    program, and for short caches). num_splits: programs per (row, KV head, row tile) (default: enough for
    ~256 programs). interpret: default None (interpret mode when lowered for CPU, compiled elsewhere).
    """
    kv_rank = 4 if layer is None else 5
    if q.ndim != 4 or k.ndim != kv_rank or v.ndim != kv_rank:
        raise ValueError(f"expected q [B, T, H, hd] and k, v [B, S, KV, hd] (or [L, B, S, KV, hd] with `layer`); "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if layer is not None and (jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer)):
        raise ValueError(f"layer must be an integer scalar, got {layer!r}")
    if isinstance(layer, int) and not 0 <= layer < k.shape[0]:
        raise ValueError(f"layer {layer} is out of range for {k.shape[0]} stacked layers")
    b, t, h, hd = q.shape
    kb, s_len, kvh, khd = k.shape[-4:]
    if kb != b or khd != hd:
        raise ValueError(f"k / v {k.shape} do not match q {q.shape} in batch or head_dim")
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({kvh})")
    if q_pos.shape != (b, t) or not jnp.issubdtype(q_pos.dtype, jnp.integer):
        raise ValueError(f"q_pos must be an int array of shape {(b, t)}, got {q_pos.dtype} {q_pos.shape}")
    if s_len < 1:
        raise ValueError("the cache must hold at least one position")
    check_positive_pow2("block_s", block_s)
    if block_s is not None and block_s < MIN_DOT:
        raise ValueError(f"block_s must be >= {MIN_DOT} (tl.dot tile), got {block_s}")
    if num_splits is not None and int(num_splits) < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return _ragged_attention(q, k, v, q_pos, layer, block_s=block_s, num_splits=num_splits,
                             interpret=resolve_interpret(interpret))
