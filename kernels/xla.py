"""The XLA backend: every op as plain jnp, which XLA compiles for any platform. It is also the fallback of
every other backend (`registry.lookup`). Uniform op signatures: see `registry`."""
from __future__ import annotations

from er_jax.cache import write_layer
from er_jax.kernels import pointwise
from er_jax.kernels.attention import attention_reference
from er_jax.kernels.quant_matmul import dequant_matmul, matmul_reference
from er_jax.kernels.rejection import rejection_sample_reference
from er_jax.sampling import sample as gumbel_sample
from er_jax.sampling import sample_logits_reference


def matmul(x, w, *, ex, name=None):
    return matmul_reference(x, w)


def quant_matmul(x, qa, *, ex, name=None):
    return dequant_matmul(x, qa)


def attention(q, k, v, q_pos, *, ex, layer=None):
    if layer is not None:  # the stacked cache: XLA slices the layer out
        k, v = k[layer], v[layer]
    return attention_reference(q, k, v, q_pos)


def kv_write(k_all, v_all, k, v, positions, *, ex, layer):
    return write_layer(k_all, v_all, k, v, positions, layer)


def rejection_sample(target_logits, draft_logits, draft_tokens, sc, keys, *, ex):
    return rejection_sample_reference(target_logits, draft_logits, draft_tokens, sc, keys)


def sample(keys, logp, *, ex, greedy=False):
    return gumbel_sample(keys, logp, greedy)


def sample_logits(keys, logits, sc, *, ex):
    return sample_logits_reference(keys, logits, sc)


IMPLS = {"matmul": matmul, "quant_matmul": quant_matmul, "attention": attention, "kv_write": kv_write,
         "rejection_sample": rejection_sample, "sample": sample, "sample_logits": sample_logits,
         "rms_norm": pointwise.rms_norm, "silu_mul": pointwise.silu_mul, "rope_qkv": pointwise.rope_qkv}
