"""Panel-major dense weights: the native CPU backend's layout for the target's f32 / bf16 matmuls.

`PanelArray.data` is [N / 16, K, 16]: column 16 j + i of row k sits at [j, k, i], so each 16-column panel
is one contiguous K x 16 block that a kernel streams front to back (a [K, N] matrix makes it read many
short row segments at once, which left the f32 kernels at 3-4 GB/s for M >= 3; docs/native.md). The
execution layout (`pack_weights`, run once per policy update by `SpecRollout`) derives it from the
stacked contract; the reference (`unpack`) is the plain transpose back.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from er_jax.quant import drafter_head_matrix
from er_jax.weight_spec import PROJECTIONS

PANEL = 16  # columns per panel (csrc/er_native.h: kPanelCols)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@struct.dataclass
class PanelArray:
    """A dense [K, N] weight in panel-major layout (one layer: no leading axes)."""

    data: jax.Array  # f32 | bf16 [N / 16, K, 16]

    @property
    def shape(self):
        p, k, c = self.data.shape
        return (k, p * c)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        return int(self.data.size) * jnp.dtype(self.data.dtype).itemsize


def can_pack(w) -> bool:
    """A 2-D f32 / bf16 array whose N is a whole number of panels."""
    return (hasattr(w, "ndim") and w.ndim == 2 and jnp.dtype(w.dtype) in _DTYPES and w.shape[1] % PANEL == 0
            and w.shape[1] > 0 and w.shape[0] > 0)


def pack(w) -> PanelArray:
    """[K, N] -> PanelArray; ValueError unless `can_pack(w)`."""
    if not can_pack(w):
        raise ValueError(f"pack: need a 2-D float32 / bfloat16 [K, N] array with N a positive multiple of {PANEL}; "
                         f"got {getattr(w, 'dtype', type(w).__name__)} {getattr(w, 'shape', None)}")
    k, n = w.shape
    return PanelArray(jnp.transpose(w.reshape(k, n // PANEL, PANEL), (1, 0, 2)))


def unpack(pa: PanelArray):
    """PanelArray -> the dense [K, N] array it holds (the reference layout)."""
    p, k, c = pa.data.shape
    return jnp.transpose(pa.data, (1, 0, 2)).reshape(k, p * c)


def pack_weights(weights, head: PanelArray | None = None):
    """The native backend's execution layout of unstacked weights (`model.unstack_layers`): every dense
    projection that `can_pack` becomes a PanelArray, and a model without a quantized head (`lm_head_q`)
    gets its LM head [D, V] as `lm_head_p`: `head` when given (a drafter sharing the target's packed head),
    else packed from the tied embedding or `lm_head`. Everything else (norms, biases, the embedding gather,
    QuantArrays) is left as it is."""
    layers = weights["layers"]
    if not isinstance(layers, (list, tuple)):
        raise ValueError("pack_weights: expects the unstacked layout (model.unstack_layers) of the weights")
    packed = tuple({n: pack(w) if n in PROJECTIONS and can_pack(w) else w for n, w in lw.items()} for lw in layers)
    out = {**weights, "layers": packed}
    if weights.get("lm_head_q") is None:
        if head is None and can_pack(drafter_head_matrix(weights)):
            head = pack(drafter_head_matrix(weights))
        if head is not None:
            out["lm_head_p"] = head
    return out
