"""The Pallas backend: the quantized matmul, attention and rejection kernels (Triton on GPU, interpret mode
on CPU); on a mesh each runs per shard (`sharded`). Dense matmuls are XLA's (the registry's fallback)."""
from __future__ import annotations

from er_jax.kernels import sharded
from er_jax.kernels.attention import ragged_attention
from er_jax.kernels.quant_matmul import quant_matmul as _quant_matmul
from er_jax.kernels.rejection import rejection_sample as _rejection_sample


def quant_matmul(x, qa, *, ex, name=None, layer=None):
    if ex.mesh is not None:
        return sharded.quant_matmul(x, qa, name, ex.mesh, layer=layer)
    return _quant_matmul(x, qa, layer=layer)


quant_matmul.reads_stacked = True  # takes a stacked [L, K, N] QuantArray with `layer=` (er_jax.model)


def attention(q, k, v, q_pos, *, ex, layer=None):
    if ex.mesh is not None:
        return sharded.ragged_attention(q, k, v, q_pos, layer, ex.mesh)
    return ragged_attention(q, k, v, q_pos, layer=layer)


def rejection_sample(target_logits, draft_logits, draft_tokens, sc, keys, *, ex):
    if ex.mesh is not None:
        return sharded.rejection_sample(target_logits, draft_logits, draft_tokens, sc, keys, ex.mesh)
    return _rejection_sample(target_logits, draft_logits, draft_tokens, sc, keys)


IMPLS = {"quant_matmul": quant_matmul, "attention": attention, "rejection_sample": rejection_sample}
