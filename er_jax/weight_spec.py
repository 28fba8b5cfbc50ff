"""The abstract weights of a config: shape, dtype, logical axes and initializer of every leaf, in one place.

Everything that needs to know the weights' shapes derives them from `weight_spec`: `model.init_weights` and
`model.validate_weights`, the loaders' shape checks (`io.source_shapes`: the file layout), the cost model's
byte and FLOP counts (`controller.ModelCosts.from_config`) and the tensor-parallel placement
(`sharding.weight_shardings`, through `MESH_AXIS`). The pytree is the one of docs/internals.md (layers stacked
on axis 0, projections `[in, out]`).

Logical axes: "layers" (L), "embed" (D), "heads" (H·hd), "kv_heads" (KV·hd), "mlp" (F), "vocab" (V).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from er_jax.config import DTYPES, ModelConfig

# Bytes per element of each weight dtype (config.DTYPES), defined once.
ITEMSIZE = {name: jnp.dtype(dt).itemsize for name, dt in DTYPES.items()}

# The tensor-parallel (Megatron) split as a map from logical to mesh axes: column-parallel projections split
# their output heads / MLP columns, row-parallel ones (wo, w_down) their input rows, the LM head and embedding
# their vocabulary; every other axis (layers, embed) is replicated.
MESH_AXIS = {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"}

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # the leaves the drafter quantizes


@dataclass(frozen=True)
class LeafSpec:
    shape: tuple[int, ...]
    dtype: str  # a config.DTYPES name
    axes: tuple[str, ...]  # logical axis of each dimension
    init: str = "normal"  # "normal" (scaled Gaussian) or "ones" (norm gains)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.size * ITEMSIZE[self.dtype]


def itemsize(dtype: str) -> int:
    """Bytes per element of a config.DTYPES name."""
    return ITEMSIZE[dtype]


def layer_spec(config: ModelConfig) -> dict[str, LeafSpec]:
    """The stacked per-layer leaves (weights["layers"]), in init order (random leaves first)."""
    d, f, n, dt = config.hidden_size, config.intermediate_size, config.num_layers, config.dtype
    qd, kvd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    L = lambda shape, axes, init="normal": LeafSpec((n, *shape), dt, ("layers", *axes), init)
    spec = {"wq": L((d, qd), ("embed", "heads")), "wk": L((d, kvd), ("embed", "kv_heads")),
            "wv": L((d, kvd), ("embed", "kv_heads")), "wo": L((qd, d), ("heads", "embed")),
            "w_gate": L((d, f), ("embed", "mlp")), "w_up": L((d, f), ("embed", "mlp")),
            "w_down": L((f, d), ("mlp", "embed"))}
    if config.qkv_bias:
        spec.update(bq=L((qd,), ("heads",)), bk=L((kvd,), ("kv_heads",)), bv=L((kvd,), ("kv_heads",)))
    spec.update(attn_norm=L((d,), ("embed",), "ones"), mlp_norm=L((d,), ("embed",), "ones"))
    return spec


def top_spec(config: ModelConfig) -> dict[str, LeafSpec]:
    """The leaves outside `layers`, in init order."""
    d, v, dt = config.hidden_size, config.vocab_size, config.dtype
    spec = {"embed": LeafSpec((v, d), dt, ("vocab", "embed")),
            "final_norm": LeafSpec((d,), dt, ("embed",), "ones")}
    if not config.tie_embeddings:
        spec["lm_head"] = LeafSpec((d, v), dt, ("embed", "vocab"))
    return spec


def weight_spec(config: ModelConfig) -> dict:
    """The weights pytree with a LeafSpec at every leaf."""
    return {**top_spec(config), "layers": layer_spec(config)}


def leaf_specs(config: ModelConfig) -> dict[str, LeafSpec]:
    """Every leaf by its (unique) name: the layer leaves and the top-level ones."""
    return {**top_spec(config), **layer_spec(config)}


def abstract_weights(config: ModelConfig):
    """The weights pytree as jax.ShapeDtypeStructs (what validate_weights compares against)."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, DTYPES[s.dtype]), weight_spec(config),
                                  is_leaf=lambda x: isinstance(x, LeafSpec))


def file_shape(name: str, spec: LeafSpec) -> tuple[int, ...]:
    """A leaf as GGUF / safetensors files store one layer of it: projections and the LM head `[out, in]`
    (transposed), the embedding `[V, D]` as is, vectors as is."""
    shape = spec.shape[1:] if spec.axes[0] == "layers" else spec.shape
    return tuple(reversed(shape)) if len(shape) == 2 and name != "embed" else tuple(shape)


def mesh_axes(spec: LeafSpec, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Mesh axis per dimension of an array laid out like `spec` (right-aligned, so a per-layer slice or a
    QuantArray field of the leaf works too); dimensions of size 1 (e.g. int8's per-column scale over the input
    rows) are never split."""
    axes = spec.axes[len(spec.axes) - len(shape):] if len(shape) <= len(spec.axes) else \
        (None,) * (len(shape) - len(spec.axes)) + spec.axes
    return tuple(None if size == 1 else MESH_AXIS.get(a) for a, size in zip(axes, shape))
