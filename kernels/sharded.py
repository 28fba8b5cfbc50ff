"""The Pallas kernels on a ("data", "model") device mesh: each runs per shard under `jax.shard_map`.

GSPMD cannot partition a Pallas call (an opaque custom call): left to itself it would gather every operand
onto each device. Here each kernel sees only its shard, laid out as `er_jax.sharding` places the weights and
the KV cache (batch over "data", attention heads / MLP columns over "model"):

- quant_matmul, column-parallel projection (q/k/v, gate/up): x is whole along K on every model shard and
  the weight's columns are split, so each shard computes its own output columns; nothing is exchanged.
- quant_matmul, row-parallel projection (o, down): x and the weight's rows (int4: packed rows, scales and
  zero points; groups never straddle shards, `check_mesh`) are split along K; each shard computes an f32
  partial product and one `psum` over "model" adds them, the all-reduce GSPMD inserts for a dense dot.
- attention: query heads and their KV heads are split alike over "model" (heads [s*H/tp, (s+1)*H/tp) use
  KV heads [s*KV/tp, (s+1)*KV/tp), so grouped-query pairs never cross a shard), rows over "data".
- rejection: rows over "data"; the vocabulary of the logits is gathered (sampling needs all of it).
- the drafter's int8 LM head (`lm_head_q`, replicated by er_jax.sharding): rows over "data", weight whole.
Stacked projections with `layer=` (the drafter inside the layer scan) keep the layer axis whole.
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec as P

from er_jax.kernels.attention import ragged_attention as attention_kernel
from er_jax.kernels.quant_matmul import quant_matmul as quant_kernel
from er_jax.kernels.rejection import rejection_sample as rejection_kernel
from er_jax.quant import QuantArray

COLUMN = ("wq", "wk", "wv", "w_gate", "w_up")
ROW = ("wo", "w_down")
REPLICATED = ("lm_head",)  # the drafter's int8 head (`lm_head_q`): whole on every device, rows over "data"


def _rows(ndim: int, last=None) -> P:
    """Batch (first axis) over "data", the last axis over `last`, the rest whole."""
    return P("data", *([None] * (ndim - 2)), last)


def quant_matmul(x, qa: QuantArray, name: str, mesh: Mesh, layer=None):
    """x [B, ..., K] @ projection `name` (a [K, N] QuantArray placed by er_jax.sharding) on `mesh`; with
    `layer`, qa is the stacked [L, K, N] projection and layer `layer` is read in place on each shard."""
    lead = () if layer is None else (None,)
    if name in COLUMN:
        split, x_spec, out_spec = P(*lead, None, "model"), _rows(x.ndim), _rows(x.ndim, "model")
        k_local = qa.in_features
    elif name in ROW:
        split, x_spec, out_spec = P(*lead, "model", None), _rows(x.ndim, "model"), _rows(x.ndim)
        k_local = qa.in_features // mesh.shape["model"]
    elif name in REPLICATED:
        split, x_spec, out_spec, k_local = P(), _rows(x.ndim), _rows(x.ndim), qa.in_features
    else:
        raise ValueError(f"no tensor-parallel layout for projection {name!r}; expected one of "
                         f"{COLUMN + ROW + REPLICATED}")
    fields = (qa.data, qa.scale) + (() if qa.zero is None else (qa.zero,))
    # int8's per-column scale [1, N] of a row-parallel weight is whole on every shard.
    specs = (split, P() if name in ROW and qa.scheme == "int8" else split) + (() if qa.zero is None else (split,))
    if layer is not None:
        fields, specs = (layer, *fields), (P(), *specs)

    def shard(xs, *args):
        li, (data, scale, *zero) = (None, args) if layer is None else (args[0], args[1:])
        w = QuantArray(data, scale, zero[0] if zero else None, qa.scheme, k_local, qa.group_size)
        if name not in ROW:
            return quant_kernel(xs, w, layer=li)
        return jax.lax.psum(quant_kernel(xs, w, layer=li, out_dtype="float32"), "model").astype(xs.dtype)

    return jax.shard_map(shard, mesh=mesh, in_specs=(x_spec, *specs), out_specs=out_spec,
                         check_vma=False)(x, *fields)


def ragged_attention(q, k, v, q_pos, layer, mesh: Mesh):
    """`er_jax.kernels.attention.ragged_attention` per shard: q [B, T, H, hd], k / v one layer [B, S, KV, hd]
    or the stacked cache [L, B, S, KV, hd] with `layer`."""
    heads = P("data", None, "model", None)
    cache = heads if layer is None else P(None, "data", None, "model", None)
    if layer is None:
        def shard(qs, ks, vs, ps):
            return attention_kernel(qs, ks, vs, ps)
        args, specs = (q, k, v, q_pos), (heads, cache, cache, P("data", None))
    else:
        def shard(qs, ks, vs, ps, layer):
            return attention_kernel(qs, ks, vs, ps, layer=layer)
        args, specs = (q, k, v, q_pos, layer), (heads, cache, cache, P("data", None), P())
    return jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=heads, check_vma=False)(*args)


def rejection_sample(target_logits, draft_logits, draft_tokens, sc, keys, mesh: Mesh):
    """`er_jax.kernels.rejection.rejection_sample` per "data" shard (whole vocabulary per row)."""
    def shard(t, d, x, k):
        return rejection_kernel(t, d, x, sc, k)

    rows3, rows2 = P("data", None, None), P("data", None)
    return jax.shard_map(shard, mesh=mesh, in_specs=(rows3, rows3, rows2, P("data")),
                         out_specs=(P("data"), rows2, rows2), check_vma=False)(target_logits, draft_logits,
                                                                               draft_tokens, keys)
