"""Panel-major weights: the native CPU backend's layout for the dense (f32 / bf16) and int8 matmuls.

`PanelArray.data` is [N / 16, K, 16]: column 16 j + i of row k sits at [j, k, i], so each 16-column panel
is one contiguous K x 16 block that a kernel streams front to back (a [K, N] matrix makes it read many
short row segments at once, which left the f32 kernels at 3-4 GB/s for M >= 3; docs/native.md). An int8
PanelArray is an int8 per-channel `QuantArray` re-laid out: data int8 codes, `scale` f32 [1, N], weight =
code * scale. The execution layout (`pack_weights`, run after every policy update by `SpecRollout` through
`model.execution_layout`) derives it from the stacked contract; the reference (`unpack`) transposes back.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from er_jax.quant import QuantArray, drafter_head_matrix
from er_jax.weight_spec import PROJECTIONS

PANEL = 16  # columns per panel (csrc/er_native.h: kPanelCols)
_DENSE = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@struct.dataclass
class PanelArray:
    """A [K, N] weight in panel-major layout (one layer: no leading axes)."""

    data: jax.Array  # f32 | bf16 | int8 codes [N / 16, K, 16]
    scale: jax.Array | None = None  # int8 only: f32 [1, N]

    @property
    def shape(self):
        p, k, c = self.data.shape
        return (k, p * c)

    @property
    def dtype(self):
        """The weight's value dtype: the data's for f32 / bf16, f32 for int8 codes times a scale."""
        return self.data.dtype if self.scale is None else jnp.dtype(jnp.float32)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in (self.data, self.scale) if a is not None)


def can_pack(w) -> bool:
    """A 2-D f32 / bf16 array or int8 QuantArray whose N is a positive whole number of panels."""
    if isinstance(w, QuantArray):
        return w.scheme == "int8" and w.data.ndim == 2 and w.data.shape[1] % PANEL == 0 and w.data.shape[1] > 0
    return (hasattr(w, "ndim") and w.ndim == 2 and jnp.dtype(w.dtype) in _DENSE and w.shape[1] % PANEL == 0
            and w.shape[1] > 0 and w.shape[0] > 0)


def _panels(a):
    k, n = a.shape
    return jnp.transpose(a.reshape(k, n // PANEL, PANEL), (1, 0, 2))


def pack(w) -> PanelArray:
    """[K, N] (or an int8 QuantArray) -> PanelArray; ValueError unless `can_pack(w)`."""
    if not can_pack(w):
        got = f"{getattr(w, 'dtype', type(w).__name__)} {getattr(w, 'shape', None)}"
        raise ValueError(f"pack: need a 2-D float32 / bfloat16 [K, N] array or int8 QuantArray with N a positive "
                         f"multiple of {PANEL}; got {got}")
    if isinstance(w, QuantArray):
        return PanelArray(_panels(w.data), w.scale)
    return PanelArray(_panels(w))


def unpack(pa: PanelArray):
    """The [K, N] weight a PanelArray holds (the reference layout): the dense array, or int8's codes x scale
    in f32."""
    p, k, c = pa.data.shape
    w = jnp.transpose(pa.data, (1, 0, 2)).reshape(k, p * c)
    return w if pa.scale is None else w.astype(jnp.float32) * pa.scale


def pack_weights(weights, head: PanelArray | None = None):
    """The native backend's execution layout of unstacked weights (`model.unstack_layers`): every projection
    that `can_pack` (dense, or an int8 QuantArray) becomes a PanelArray, and so does the LM head, as
    `lm_head_p`: a drafter's own int8 head (`lm_head_q`, which it replaces), else `head` when given (a drafter
    sharing the target's packed head), else the tied embedding or `lm_head`. Everything else (norms, biases,
    the embedding gather, int4 QuantArrays) is left as it is."""
    layers = weights["layers"]
    if not isinstance(layers, (list, tuple)):
        raise ValueError("pack_weights: expects the unstacked layout (model.unstack_layers) of the weights")
    packed = tuple({n: pack(w) if n in PROJECTIONS and can_pack(w) else w for n, w in lw.items()} for lw in layers)
    out = {**weights, "layers": packed}
    own = weights.get("lm_head_q")
    if own is not None:
        if can_pack(own):
            out["lm_head_p"] = pack(own)
            del out["lm_head_q"]
    elif head is not None:
        out["lm_head_p"] = head
    elif can_pack(drafter_head_matrix(weights)):
        out["lm_head_p"] = pack(drafter_head_matrix(weights))
    return out
