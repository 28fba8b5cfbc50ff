"""Panel-major weights: the native CPU backend's layout for its dense (f32 / bf16), int8 and int4 matmuls.

`PanelArray.data` is [N / 16, K, 16]: column 16 j + i of row k sits at [j, k, i], so each 16-column panel
is one contiguous K x 16 block that a kernel streams front to back (a [K, N] matrix makes it read many
short row segments at once, which left the f32 kernels at 3-4 GB/s for M >= 3; docs/native.md). A
quantized PanelArray is a `QuantArray` re-laid out: int8 codes with `scale` f32 [1, N], or int4's bytes
[N / 16, Kp / 2, 16] with its `scale` / `zero` [Kp / G, N] unchanged. int4's 64-byte line b of a panel holds
rows 8b .. 8b + 7 of its 16 columns in the order the kernels unpack (`_int4_lines`): viewed as 32 uint16
words, word 2c + e holds in its nibble j (bits 4j .. 4j + 3) the code of row 8b + 2j + e, column c — so one
16-bit shift and mask give the (2j, 2j + 1) row pairs of all 16 columns (docs/native.md, "int4 panel lines").
The execution layout (`pack_weights`, run after every policy update by `SpecRollout` through
`model.execution_layout` and, with the drafter's quantization fused in, `model.drafter_layout`) derives it from
the stacked contract; the reference (`unpack`) transposes back.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from er_jax.config import DRAFTER_HEADS, SCHEMES, check_choice
from er_jax.quant import QuantArray, dequantize, drafter_head_matrix, quantize_int8, quantize_projections
from er_jax.weight_spec import PROJECTIONS

PANEL = 16  # columns per panel (csrc/er_native.h: kPanelCols)
_DENSE = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@struct.dataclass
class PanelArray:
    """A [K, N] weight in panel-major layout (one layer: no leading axes)."""

    data: jax.Array  # f32 | bf16 | int8 codes [N / 16, K, 16] | int4 bytes uint8 [N / 16, Kp / 2, 16]
    in_features: int = struct.field(pytree_node=False)  # K
    scale: jax.Array | None = None  # int8: f32 [1, N]; int4: f32 [Kp / G, N]
    zero: jax.Array | None = None  # int4: uint8 [Kp / G, N]
    group_size: int = struct.field(pytree_node=False, default=128)  # int4's G

    @property
    def scheme(self) -> str:
        return "int4" if self.zero is not None else "int8" if self.scale is not None else "dense"

    @property
    def shape(self):
        return (self.in_features, self.data.shape[0] * self.data.shape[2])

    @property
    def dtype(self):
        """The weight's value dtype: the data's when dense, f32 for quantized codes times scales."""
        return self.data.dtype if self.scale is None else jnp.dtype(jnp.float32)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in (self.data, self.scale, self.zero)
                   if a is not None)


def can_pack(w) -> bool:
    """A 2-D f32 / bf16 array or QuantArray whose N is a positive whole number of panels (int4: with a group
    size that is a multiple of 8, the rows of one panel line)."""
    if isinstance(w, QuantArray):
        return (w.data.ndim == 2 and w.data.shape[1] % PANEL == 0 and w.data.shape[1] > 0
                and (w.zero is None or w.group_size % 8 == 0))
    return (hasattr(w, "ndim") and w.ndim == 2 and jnp.dtype(w.dtype) in _DENSE and w.shape[1] % PANEL == 0
            and w.shape[1] > 0 and w.shape[0] > 0)


def _panels(a):
    k, n = a.shape
    return jnp.transpose(a.reshape(k, n // PANEL, PANEL), (1, 0, 2))


def _int4_lines(d, inverse=False):
    """int4 panel bytes [P, Kp / 2, 16], byte r of a column = rows 2r (low nibble) and 2r + 1, <-> the line
    order (module docstring). A row k = 8b + 4h + 2u + e sits, in line order, in byte 4c + 2e + h of line b,
    nibble u; in row-pair order, in byte row 4b + 2h + u, nibble e."""
    p, r, _ = d.shape
    nib = lambda a: jnp.stack([a & 0xF, a >> 4], axis=-1)  # [..., 2] (low nibble first)
    if not inverse:  # [P, B, h, u, e, c] -> [P, B, c, e, h, u]
        codes = jnp.transpose(nib(d).reshape(p, r // 4, 2, 2, PANEL, 2), (0, 1, 4, 5, 2, 3))
    else:  # [P, B, c, e, h, u] -> [P, B, h, u, c, e]
        codes = jnp.transpose(nib(d).reshape(p, r // 4, PANEL, 2, 2, 2), (0, 1, 4, 5, 2, 3))
    return (codes[..., 0] | (codes[..., 1] << 4)).reshape(p, r, PANEL)


def pack(w) -> PanelArray:
    """[K, N] (or a 2-D QuantArray) -> PanelArray; ValueError unless `can_pack(w)`."""
    if not can_pack(w):
        got = f"{getattr(w, 'dtype', type(w).__name__)} {getattr(w, 'shape', None)}"
        raise ValueError(f"pack: need a 2-D float32 / bfloat16 [K, N] array or QuantArray with N a positive "
                         f"multiple of {PANEL} (int4: and a group size that is a multiple of 8); got {got}")
    if isinstance(w, QuantArray):
        data = _panels(w.data)
        return PanelArray(data if w.zero is None else _int4_lines(data), w.in_features, w.scale, w.zero,
                          w.group_size)
    return PanelArray(_panels(w), w.shape[0])


def _rows(a):  # [N / 16, R, 16] -> [R, N]
    p, r, c = a.shape
    return jnp.transpose(a, (1, 0, 2)).reshape(r, p * c)


def as_quant(pa: PanelArray) -> QuantArray:
    """A quantized PanelArray in QuantArray's own layout (what er_jax.quant's references read)."""
    if pa.scale is None:
        raise ValueError("as_quant: a dense PanelArray holds no QuantArray (use unpack)")
    data = pa.data if pa.zero is None else _int4_lines(pa.data, inverse=True)
    return QuantArray(_rows(data), pa.scale, pa.zero, pa.scheme, pa.in_features, pa.group_size)


def unpack(pa: PanelArray):
    """The [K, N] weight a PanelArray holds (the reference layout): the dense array, or the quantized one
    dequantized to f32."""
    return _rows(pa.data) if pa.scale is None else dequantize(as_quant(pa), jnp.float32)


# Projections that read the same input, fused into one matmul (one FFI call and one pass over x instead of
# three / two): the fused leaf's columns are its parts' in this order (model._layer splits them back).
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def concat(parts) -> PanelArray:
    """PanelArrays of one scheme, K (and group size) side by side: [K, N1 + N2 + ...]. Panels are whole
    16-column blocks, so this is a concatenation of the panel axis (and of the scales' / zeros' columns)."""
    first = parts[0]
    if any(p.scheme != first.scheme or p.in_features != first.in_features or p.group_size != first.group_size
           or p.data.dtype != first.data.dtype or p.data.shape[1] != first.data.shape[1] for p in parts):
        raise ValueError("concat: the PanelArrays must share scheme, dtype, K and group size; got "
                         + ", ".join(f"{p.scheme} {p.data.dtype} K={p.in_features} G={p.group_size}" for p in parts))
    cat = lambda f: None if f(first) is None else jnp.concatenate([f(p) for p in parts], axis=-1)
    return PanelArray(jnp.concatenate([p.data for p in parts], axis=0), first.in_features,
                      cat(lambda p: p.scale), cat(lambda p: p.zero), first.group_size)


def _fuse(lw: dict) -> dict:
    """Replace each group of FUSED parts that packed alike by its fused PanelArray."""
    out = dict(lw)
    for fused, names in FUSED.items():
        parts = [lw.get(n) for n in names]
        if all(isinstance(p, PanelArray) for p in parts) and len({(p.scheme, p.data.dtype, p.data.shape[1],
                                                                   p.group_size) for p in parts}) == 1:
            out[fused] = concat(parts)
            for n in names:
                del out[n]
    return out


def pack_weights(weights, head: PanelArray | None = None, *, drafter: str | None = None,
                 drafter_head: str = "shared", group_size: int = 128):
    """The native backend's execution layout of stacked weights (the contract), one dict per layer
    (`model.unstack_layers`): every projection that `can_pack` (dense, int8 or int4) becomes a PanelArray, q / k /
    v and gate / up fused into one each (`FUSED`), and the LM head becomes one too, as `lm_head_p`: a drafter's own
    quantized head (`lm_head_q`, which it replaces), else `head` when given (a drafter sharing the target's packed
    head), else the tied embedding or `lm_head`. A bf16 embedding is kept as its uint16 bits (`model.embed_rows`
    reads them): XLA's CPU backend gathers a bf16 table through an f32 copy of it, and in the drafter's loop it
    hoisted that whole-table conversion out of the loop — 28 M elements per speculative step for SmolLM2, 41 ms of
    a 170 ms step. Everything else (norms, biases) is left as it is.

    drafter: derive the self-drafter on the way: the layout of `er_jax.quant.derive_drafter(weights, drafter,
    group_size, drafter_head)`, its quantization fused with the packing. All of it runs as one XLA program over
    what it changes (the layers, the head, a bf16 embedding); every other leaf is the caller's own array (a
    program's outputs are fresh buffers: a shared embedding or head would be copied). Op by op, SmolLM2's layout
    took 0.51-0.83 s per update and its int8 drafter's derivation and layout 0.31-0.41 s; as one program
    0.14-0.28 s and 0.19-0.27 s (docs/cpu_profile.md, "2026-12-07, day")."""
    if not isinstance(weights["layers"], dict):
        raise ValueError("pack_weights: expects the stacked layout (weights['layers'] a dict of [L, ...] arrays, "
                         f"the contract), got {type(weights['layers']).__name__}")
    if drafter is not None:
        check_choice("drafter scheme", drafter, SCHEMES)
        check_choice("drafter head", drafter_head, DRAFTER_HEADS)
    own = "int8" if drafter is not None and drafter_head == "int8" else "lm_head_q" if "lm_head_q" in weights else None
    top = {k: weights[k] for k in ("embed", "lm_head", "lm_head_q") if k in weights}
    layers, head_p, embed = _pack(weights["layers"], top, drafter, group_size, own, share=head is not None)
    out = {**weights, "layers": layers}
    if embed is not None:
        out["embed"] = embed
    if isinstance(head_p, PanelArray):
        out["lm_head_p"] = head_p
        out.pop("lm_head_q", None)
    elif head_p is not None:
        out["lm_head_q"] = head_p
    elif own is None and head is not None:
        out["lm_head_p"] = head
    return out


@functools.partial(jax.jit, static_argnames=("drafter", "group_size", "own", "share"))
def _pack(layers, top, drafter, group_size, own, share):
    """pack_weights' program: (packed layers, packed head or None, bf16 embedding's bits or None)."""
    if drafter is not None:
        layers = {**layers, **quantize_projections(layers, drafter, group_size)}
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    packed = tuple(_fuse({name: pack(w) if name in PROJECTIONS and can_pack(w) else w
                          for name, w in jax.tree_util.tree_map(lambda a, i=i: a[i], layers).items()})
                   for i in range(n))
    if own == "int8":
        src = quantize_int8(drafter_head_matrix(top))
    elif own == "lm_head_q":
        src = top["lm_head_q"]
    else:
        src = None if share else drafter_head_matrix(top)
    head = pack(src) if can_pack(src) else src if own == "int8" else None  # an unpackable own head stays a QuantArray
    embed = jax.lax.bitcast_convert_type(top["embed"], jnp.uint16) if top["embed"].dtype == jnp.bfloat16 else None
    return packed, head, embed
