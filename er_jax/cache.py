"""KV cache pytree: contiguous `[layers, batch, max_len, kv_heads, head_dim]` with per-row lengths.

The drafter owns no cache: it writes provisional K/V into this one, and the target's verify pass
overwrites them (see docs/internals.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from er_jax.config import ModelConfig
from er_jax.weight_spec import ITEMSIZE


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, KV, hd]
    v: jax.Array  # [L, B, S, KV, hd]
    lengths: jax.Array  # int32 [B]: clean target entries per row

    @property
    def nbytes(self) -> int:
        return int(self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize)


def cache_bytes(config: ModelConfig, batch: int, max_len: int) -> int:
    """Bytes of K and V for `batch` rows of `max_len` positions (what `init_cache` would allocate)."""
    per_entry = config.num_layers * config.num_kv_heads * config.head_dim * ITEMSIZE[config.dtype]
    return 2 * batch * max_len * per_entry


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, config.jnp_dtype), jnp.zeros(shape, config.jnp_dtype),
                   jnp.zeros((batch,), jnp.int32))


def write_layer(k_all, v_all, k, v, positions, layer):
    """The stacked cache with layer `layer`'s K/V at `positions` set: k_all / v_all [L, B, S, KV, hd],
    k / v [B, T, KV, hd] (cast to the cache's dtype), positions int [B, T] (jnp's `.at[].set` index rules:
    negative from the end, still out of range dropped). The reference of the `kv_write` op."""
    rows = jnp.broadcast_to(jnp.arange(k.shape[0])[:, None], positions.shape)
    return (k_all.at[layer, rows, positions].set(k.astype(k_all.dtype)),
            v_all.at[layer, rows, positions].set(v.astype(v_all.dtype)))


def gather_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache of rows `rows` (int [B']), in that order: compaction into a smaller batch bucket."""
    return KVCache(jnp.take(cache.k, rows, axis=1), jnp.take(cache.v, rows, axis=1),
                   jnp.take(cache.lengths, rows, axis=0))
