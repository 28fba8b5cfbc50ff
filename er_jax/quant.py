"""Weight quantization for the self-drafter.

- "int4": the paper's W4A16 format: group size 128 along the input dimension, asymmetric min-max
  round-to-nearest with a zero point, two 4-bit codes per byte (see docs/internals.md for the layout).
- "int8": symmetric per-output-channel int8.

Both take 16-bit activations, as the paper's drafter does: every matmul with quantized weights multiplies
`quantized_activations(x)`, f32 x rounded to bf16 (the reference of every backend's quantized matmul, and what
lets the native kernels run x as one bf16 part: docs/native.md, "The drafter's 16-bit activations").

`derive_drafter(weights, scheme)` replaces the seven projections by `QuantArray`s and shares every other
leaf (embeddings, LM head, norms, biases) with the target: the same array objects, not copies.
`head="int8"` also gives the drafter its own int8 LM head (`lm_head_q`: the target's head, or the tied
embedding transposed, [D, V] with one scale per vocabulary entry); the target keeps its own.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from er_jax.config import DRAFTER_HEADS, SCHEMES, check_choice

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@struct.dataclass
class QuantArray:
    """A quantized `[..., K, N]` weight. Array fields keep any leading (layer) axes of the original."""

    data: jax.Array  # int8 [..., K, N]  |  uint8 [..., Kp/2, N] (two int4 codes per byte)
    scale: jax.Array  # f32 [..., 1, N]  |  f32 [..., Kp/G, N]
    zero: jax.Array | None  # None      |  uint8 [..., Kp/G, N], codes 0..15
    scheme: str = struct.field(pytree_node=False)
    in_features: int = struct.field(pytree_node=False)  # K
    group_size: int = struct.field(pytree_node=False, default=128)

    @property
    def shape(self):
        return (*self.data.shape[:-2], self.in_features, self.data.shape[-1])

    @property
    def nbytes(self) -> int:
        leaves = [self.data, self.scale] + ([] if self.zero is None else [self.zero])
        return sum(_nbytes(a) for a in leaves)


def quantized_activations(x):
    """What a matmul with quantized weights multiplies: f32 x rounded to the nearest bf16 (ties to even), in x's
    dtype; 16-bit x as it is."""
    return x.astype(jnp.bfloat16).astype(x.dtype) if x.dtype == jnp.float32 else x


def _nbytes(a) -> int:
    """Bytes of an array or of a `jax.ShapeDtypeStruct` (which has no `nbytes` in every jax version)."""
    return int(a.size) * jnp.dtype(a.dtype).itemsize


def quantize_int8(w) -> QuantArray:
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-2, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QuantArray(q, scale, None, "int8", w.shape[-2])


def quantize_int4(w, group_size: int = 128) -> QuantArray:
    """Asymmetric min-max RTN per group of `group_size` input rows (the paper's formula):
    s = (max - min) / 15, zp = clamp(round(-min / s), 0, 15), q = clamp(round(w / s) + zp, 0, 15).
    A K that is not a multiple of the group size gets a short last group (padding rows code to zp)."""
    w = w.astype(jnp.float32)
    k, n = w.shape[-2:]
    kp = -(-k // group_size) * group_size
    pad = [(0, 0)] * (w.ndim - 2) + [(0, kp - k), (0, 0)]
    wg = jnp.pad(w, pad, constant_values=jnp.nan).reshape(*w.shape[:-2], kp // group_size, group_size, n)
    mn = jnp.nanmin(wg, axis=-2)
    mx = jnp.nanmax(wg, axis=-2)
    # A constant group c gets s = |c| / 15 so it round-trips exactly; an all-zero group gets s = 1.
    scale = jnp.where(mx > mn, (mx - mn) / 15.0, jnp.where(mn != 0, jnp.abs(mn) / 15.0, 1.0))
    zero = jnp.clip(jnp.round(-mn / scale), 0, 15)
    q = jnp.clip(jnp.round(wg / scale[..., None, :]) + zero[..., None, :], 0, 15)
    q = jnp.where(jnp.isnan(wg), zero[..., None, :], q).astype(jnp.uint8).reshape(*w.shape[:-2], kp, n)
    packed = q[..., 0::2, :] | (q[..., 1::2, :] << 4)
    return QuantArray(packed, scale, zero.astype(jnp.uint8), "int4", k, group_size)


def unpack_int4(data):
    """uint8 [..., Kp/2, N] -> uint8 codes [..., Kp, N] (low nibble = even row)."""
    codes = jnp.stack([data & 0xF, data >> 4], axis=-2)  # [..., Kp/2, 2, N]
    return codes.reshape(*data.shape[:-2], 2 * data.shape[-2], data.shape[-1])


def dequantize(qa: QuantArray, dtype=jnp.float32):
    if qa.scheme == "int8":
        return (qa.data.astype(jnp.float32) * qa.scale).astype(dtype)
    codes = unpack_int4(qa.data).astype(jnp.float32)
    kp, n = codes.shape[-2:]
    g = codes.reshape(*codes.shape[:-2], kp // qa.group_size, qa.group_size, n)
    w = (g - qa.zero.astype(jnp.float32)[..., None, :]) * qa.scale[..., None, :]
    return w.reshape(*codes.shape[:-2], kp, n)[..., : qa.in_features, :].astype(dtype)


def quantize_projections(layers, scheme: str, group_size: int = 128) -> dict:
    """The seven projections of `layers` (any leading axes) as `scheme` QuantArrays."""
    if scheme == "int8":
        return {n: quantize_int8(layers[n]) for n in PROJECTIONS}
    return {n: quantize_int4(layers[n], group_size) for n in PROJECTIONS}


_quantize_projections = jax.jit(quantize_projections, static_argnames=("scheme", "group_size"))


@jax.jit
def _quantize_head(head):
    return quantize_int8(head)


def drafter_head_matrix(weights):
    """The LM head as a [D, V] matrix: `lm_head`, or the tied embedding transposed."""
    return weights["lm_head"] if "lm_head" in weights else weights["embed"].T


def derive_drafter(weights, scheme: str = "int4", group_size: int = 128, head: str = "shared"):
    """The self-drafter: a pure function of the current weights (re-derive after every update).
    head: "shared" (the target's LM head, same arrays) or "int8" (a per-vocab-row int8 copy in
    `lm_head_q`, read by `model.logits_from_hidden` through the backend's quant_matmul op)."""
    check_choice("drafter scheme", scheme, SCHEMES)
    check_choice("drafter head", head, DRAFTER_HEADS)
    layers = weights["layers"]
    missing = [n for n in PROJECTIONS if n not in layers]
    if missing:
        raise ValueError(f"weights['layers'] lacks projections {missing}; expected {PROJECTIONS}")
    quantized = _quantize_projections({n: layers[n] for n in PROJECTIONS}, scheme, group_size)
    out = {**weights, "layers": {**layers, **quantized}}
    if head == "int8":
        out["lm_head_q"] = _quantize_head(drafter_head_matrix(weights))
    return out


def drafter_bytes(weights, scheme: str, group_size: int = 128, head: str = "shared") -> int:
    """What `derive_drafter(weights, scheme, group_size, head)` adds on top of the target: its quantized
    projections and its own int8 head, if any (from shapes alone: nothing is quantized)."""
    d = jax.eval_shape(lambda w: derive_drafter(w, scheme, group_size, head), weights)
    return projection_bytes(d) + head_bytes(d)


def head_bytes(weights) -> int:
    """Bytes of a drafter's own LM head (`lm_head_q`), 0 when it shares the target's."""
    qa = weights.get("lm_head_q")
    return qa.nbytes if qa is not None else 0


def projection_bytes(weights) -> int:
    """Bytes of the seven projections (dense arrays or QuantArrays; stacked or per-layer layout)."""
    leaves = jax.tree_util.tree_leaves_with_path(weights, is_leaf=lambda x: isinstance(x, QuantArray))
    return sum(w.nbytes if isinstance(w, QuantArray) else _nbytes(w)
               for path, w in leaves if any(getattr(p, "key", None) in PROJECTIONS for p in path))
