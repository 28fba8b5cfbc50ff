"""W4A16 / W8A16 matmul: `x [..., K] @ W` with W an `er_jax.quant.QuantArray` whose codes cross memory
once, as int8 / packed int4, and are dequantized in registers inside the kernel.

Lowering: `er_jax.kernels.call` (interpret mode on CPU, Triton with per-shape `num_warps` / `num_stages`
on GPU, see `_tuning`). The body uses ref slices, `lax.fori_loop` and `lax.dot` only (see
er_jax/kernels/__init__.py).

Layout (docs/internals.md): "int8": data int8 [K, N], scale f32 [1, N], w = data * scale.
"int4": data uint8 [Kp/2, N], byte j = rows 2j (low nibble) and 2j+1 (high nibble), scale f32 and
zero uint8 [Kp/G, N], w[k] = (q[k] - zero[k // G]) * scale[k // G], Kp = K rounded up to G = 128.

Kernel: grid (N blocks, M blocks, K splits). Each program loops over its K range:
- int8: acc += x_k @ q_k (codes are exact in bf16 / f32), one per-column scale at the end;
- int4: one group per step; instead of interleaving nibbles in registers the wrapper splits x into its
  even and odd columns (x is small), so acc += (x_even @ (lo - z) + x_odd @ (hi - z)) * s_group.
(q - z) is an exact integer in x.dtype; the dot accumulates in f32. With more than one K split (decode:
few output blocks, many SMs to fill) the programs write f32 partials that the wrapper sums.
Weights may also come stacked [L, ...] with a (traced) `layer` index, read in place by the kernel.
f32 x is first rounded to bf16 (`er_jax.quant.quantized_activations`: the 16-bit activations of every quantized
matmul, on every backend).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from er_jax.kernels import (MIN_DOT, Tuning, call, check_positive_pow2, fit_block, next_pow2, resolve_interpret,
                            round_up)
from er_jax.panels import PanelArray, unpack
from er_jax.quant import QuantArray, dequantize, quantized_activations

TARGET_PROGRAMS = 256  # split K until about this many programs run (memory-bound decode on ~132 SMs)
DEFAULT_BLOCK_M, DEFAULT_BLOCK_N, DEFAULT_BLOCK_K = 64, 128, 128


def quant_matmul_reference(x, qa: QuantArray):
    """quantized_activations(x) @ dequantize(qa) in f32 (f32 accumulation), cast to x.dtype."""
    w = dequantize(qa, jnp.float32)
    y = jnp.einsum("...k,kn->...n", quantized_activations(x).astype(jnp.float32), w,
                   precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def dequant_matmul(x, qa: QuantArray):
    """What XLA runs: dequantize to x.dtype and let XLA fuse the dot (f32 accumulation), cast to x.dtype."""
    w = dequantize(qa, x.dtype)
    return jnp.einsum("...k,kn->...n", quantized_activations(x), w, preferred_element_type=jnp.float32).astype(x.dtype)


def matmul_reference(x, w):
    """Dense x [..., K] @ w [K, N] (an array or an er_jax.panels.PanelArray; a quantized one multiplies
    quantized_activations(x)) with f32 accumulation, cast to x.dtype."""
    if isinstance(w, PanelArray):
        if w.scheme != "dense":
            x = quantized_activations(x)
        w = unpack(w)
    return jnp.einsum("...k,kn->...n", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _precision(dtype):
    # f32 operands: IEEE f32 products (Triton would otherwise use TF32); bf16 / f16: native.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _int8_kernel(layer_ref, x_ref, w_ref, s_ref, o_ref, *, block_k, steps, precision):
    # layer_ref int32 [1]; x_ref [bm, steps*bk]; w_ref int8 [L, steps*bk, bn]; s_ref f32 [L, 1, bn];
    # o_ref [bm, bn] (x.dtype, or an f32 partial with several K splits)
    layer = layer_ref[0]

    def body(i, acc):
        kk = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        xk = x_ref[:, kk]
        wk = w_ref[layer, kk, :].astype(xk.dtype)
        return acc + lax.dot(xk, wk, precision=precision, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = (acc * s_ref[layer]).astype(o_ref.dtype)


def _int4_kernel(layer_ref, xe_ref, xo_ref, w_ref, s_ref, z_ref, o_ref, *, half_group, steps, precision):
    # xe/xo [bm, steps*G/2] (even / odd columns of x); w_ref uint8 [L, steps*G/2, bn];
    # s_ref f32 / z_ref uint8 [L, steps, bn]; o_ref [bm, bn]
    layer = layer_ref[0]

    def body(g, acc):
        rows = pl.ds(pl.multiple_of(g * half_group, half_group), half_group)
        packed = w_ref[layer, rows, :].astype(jnp.int32)
        z = z_ref[layer, pl.ds(g, 1), :].astype(jnp.int32)
        xe, xo = xe_ref[:, rows], xo_ref[:, rows]
        lo = ((packed & 0xF) - z).astype(xe.dtype)
        hi = ((packed >> 4) - z).astype(xe.dtype)
        part = (lax.dot(xe, lo, precision=precision, preferred_element_type=jnp.float32)
                + lax.dot(xo, hi, precision=precision, preferred_element_type=jnp.float32))
        return acc + part * s_ref[layer, pl.ds(g, 1), :]

    acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _tuning(bm: int, bn: int, steps: int) -> Tuning:
    """Triton launch parameters. A program's f32 accumulator is [bm, bn]: 4 warps (128 threads) hold up to
    64 x 128 of it in registers (64 per thread), 8 warps beyond that. The K loop streams weight tiles
    (~16-32 KiB a stage at bk = 128 or one 128-row int4 group), so deeper software pipelining hides HBM
    latency in memory-bound decode: 4 stages when the loop has that many steps (~128 KiB of shared memory
    at most, under the 227 KiB of an H100), fewer for short loops."""
    return Tuning(num_warps=4 if bm * bn <= 64 * 128 else 8, num_stages=max(1, min(4, steps)))


def _auto_split(k_steps: int, programs: int) -> int:
    """Smallest divisor of k_steps that brings the grid to TARGET_PROGRAMS programs (or k_steps)."""
    for d in range(1, k_steps + 1):
        if k_steps % d == 0 and programs * d >= TARGET_PROGRAMS:
            return d
    return k_steps


def _pad_to(a, shape, value=0):
    pads = [(0, s - d) for s, d in zip(shape, a.shape)]
    return a if all(p == (0, 0) for p in pads) else jnp.pad(a, pads, constant_values=value)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "split_k", "out_dtype", "interpret"))
def _quant_matmul(x, qa, layer, *, block_m, block_n, block_k, split_k, out_dtype, interpret):
    stacked = qa.data.ndim == 3
    if not stacked:  # a plain [K, N] weight is a stack of one layer (a free reshape)
        qa = jax.tree_util.tree_map(lambda a: a[None], qa)
        layer = 0
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    nl, k, n = qa.data.shape[0], qa.in_features, qa.data.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    bm = min(block_m or DEFAULT_BLOCK_M, max(MIN_DOT, next_pow2(m)))
    mp = round_up(m, bm)
    bn, np_ = fit_block(n, block_n or DEFAULT_BLOCK_N)
    precision = _precision(x.dtype)

    if qa.scheme == "int8":
        bk, kp = fit_block(k, block_k or DEFAULT_BLOCK_K)
        data = _pad_to(qa.data, (nl, kp, np_))
        scale = _pad_to(qa.scale, (nl, 1, np_), 1.0)
        xs = (_pad_to(x2, (mp, kp)),)
        k_steps = kp // bk
    else:
        gs = qa.group_size
        kp = 2 * qa.data.shape[1]
        data = _pad_to(qa.data, (nl, kp // 2, np_))
        scale = _pad_to(qa.scale, (nl, kp // gs, np_), 1.0)
        zero = _pad_to(qa.zero, (nl, kp // gs, np_))
        xp = _pad_to(x2, (mp, kp))
        xs = (xp[:, 0::2], xp[:, 1::2])  # the codes of packed row j multiply x[:, 2j] and x[:, 2j+1]
        k_steps = kp // gs

    grid_n, grid_m = np_ // bn, mp // bm
    split = split_k or _auto_split(k_steps, grid_n * grid_m)
    if k_steps % split:
        raise ValueError(f"split_k={split} must divide the {k_steps} K steps of this weight")
    steps = k_steps // split
    x_cols = xs[0].shape[1] // split

    # Weight blocks span the whole layer axis: with Triton a block is a pointer view, so only the tiles
    # of `layer` are ever loaded (no copy of a layer slice outside the kernel).
    layer_spec = pl.BlockSpec((1,), lambda j, i, s: (0,))
    x_spec = pl.BlockSpec((bm, x_cols), lambda j, i, s: (i, s))
    w_spec = pl.BlockSpec((nl, data.shape[1] // split, bn), lambda j, i, s: (0, s, j))
    if qa.scheme == "int8":
        kernel = functools.partial(_int8_kernel, block_k=bk, steps=steps, precision=precision)
        in_specs = [layer_spec, x_spec, w_spec, pl.BlockSpec((nl, 1, bn), lambda j, i, s: (0, 0, j))]
        operands = (layer, *xs, data, scale)
    else:
        kernel = functools.partial(_int4_kernel, half_group=gs // 2, steps=steps, precision=precision)
        group_spec = pl.BlockSpec((nl, steps, bn), lambda j, i, s: (0, s, j))
        in_specs = [layer_spec, x_spec, x_spec, w_spec, group_spec, group_spec]
        operands = (layer, *xs, data, scale, zero)

    if split == 1:
        out_shape = jax.ShapeDtypeStruct((mp, np_), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda j, i, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split, mp, np_), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda j, i, s: (s, i, j))
    y = call(kernel, out_shape=out_shape, grid=(grid_n, grid_m, split), in_specs=in_specs, out_specs=out_spec,
             interpret=interpret, tuning=_tuning(bm, bn, steps), name=f"quant_matmul_{qa.scheme}")(*operands)
    if split > 1:
        y = jnp.sum(y, axis=0)
    return y[:m, :n].astype(out_dtype).reshape(*lead, n)


def quant_matmul(x, qa: QuantArray, *, layer=None, block_m=None, block_n=None, block_k=None, split_k=None,
                 out_dtype=None, interpret=None):
    """x [..., K] (bf16 / f16 / f32) @ W -> [..., N] in `out_dtype` (default x.dtype), f32 accumulation.

    W is a [K, N] QuantArray, or with `layer` (an int, traced or not) layer `layer` of a stacked
    [L, K, N] QuantArray, read in place: inside a scan over layers this avoids the copy XLA makes
    when it slices a layer out of the stack to feed a custom call.

    block_m / block_n / block_k: power-of-two tile sizes (default 64 / 128 / 128, shrunk to fit; int4
    always steps one quantization group of K). split_k: number of K ranges run in parallel (default:
    enough for ~256 programs). out_dtype: e.g. f32 for partial sums that are reduced across shards.
    interpret: default None (interpret mode when lowered for CPU, compiled elsewhere).
    """
    if not isinstance(qa, QuantArray):
        raise ValueError(f"quant_matmul needs an er_jax.quant.QuantArray, got {type(qa).__name__}")
    if qa.data.ndim != (2 if layer is None else 3):
        raise ValueError(f"quant_matmul takes a [K, N] weight, or a stacked [L, K, N] one with `layer`; got data "
                         f"of shape {qa.data.shape} and layer={layer!r}")
    if layer is not None and (jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer)):
        raise ValueError(f"layer must be an integer scalar, got {layer!r}")
    if isinstance(layer, int) and not 0 <= layer < qa.data.shape[0]:
        raise ValueError(f"layer {layer} is out of range for {qa.data.shape[0]} stacked layers")
    if qa.scheme not in ("int4", "int8"):
        raise ValueError(f"unknown QuantArray scheme {qa.scheme!r}")
    if x.ndim < 1 or x.shape[-1] != qa.in_features:
        raise ValueError(f"x has shape {x.shape}; its last axis must be the weight's K = {qa.in_features}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array (bf16 / f16 / f32), got {x.dtype}")
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_positive_pow2(name, value)
    if qa.scheme == "int4":
        if qa.group_size % 2 or qa.data.shape[-2] * 2 % qa.group_size:
            raise ValueError(f"int4 data with {qa.data.shape[-2]} packed rows does not hold whole groups of "
                             f"{qa.group_size}")
        if block_k is not None and block_k != qa.group_size:
            raise ValueError(f"int4 steps one quantization group at a time: block_k must be None or "
                             f"{qa.group_size}, got {block_k}")
    if split_k is not None and int(split_k) < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    return _quant_matmul(quantized_activations(x), qa, layer, block_m=block_m, block_n=block_n, block_k=block_k,
                         split_k=split_k, out_dtype=jnp.dtype(out_dtype or x.dtype),
                         interpret=resolve_interpret(interpret))
