"""The decoder layer's pointwise ops and their plain-jnp references: RMSNorm, the SiLU gate and RoPE.

Registry ops (`er_jax.kernels.registry`; the native CPU backend runs each as one FFI call instead of the
several small XLA fusions it compiles to there, docs/native.md "Pointwise ops"):
- `rms_norm(x, w, *, eps, ex)`: x [..., D], w [D] -> [..., D] in x's dtype;
- `silu_mul(gate_up, *, ex)`: the fused gate | up projection's output [..., 2I] -> silu(gate) * up [..., I];
- `rope_qkv(qkv, tables, *, heads, kv_heads, ex)`: the fused q | k | v projection's output [B, T, (H + 2 KV) hd]
  -> q [B, T, H, hd] and k [B, T, KV, hd] rotated by RoPE, v [B, T, KV, hd].
Each computes in f32 and rounds once to the input's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm_reference(x, w, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def silu_mul_reference(gate, up):
    """silu(gate) * up in f32, rounded once to gate's dtype."""
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def rope_tables(positions, head_dim, theta):
    """cos and sin of RoPE's angles at `positions` (int [B, T]): f32 [B, T, hd/2] each. `model.forward`
    computes them once for all layers and the native `rope_qkv` reads them (XLA, left to itself, fuses them
    into every layer's rotation and recomputes them per element of q and k: ~6 ms of a 64-row SmolLM2 step
    on a 2-core CPU)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    return jnp.cos(ang), jnp.sin(ang)


def rope_reference(x, tables):
    """Rotate-half RoPE (Hugging Face layout) of x [B, T, heads, hd] by `rope_tables`, in f32."""
    cos, sin = (t[:, :, None, :] for t in tables)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def split_qkv(qkv, heads, kv_heads):
    """[B, T, (H + 2 KV) hd] -> q [B, T, H, hd], k, v [B, T, KV, hd]."""
    b, t, n = qkv.shape
    hd = n // (heads + 2 * kv_heads)
    q, k, v = jnp.split(qkv, [heads * hd, (heads + kv_heads) * hd], axis=-1)
    return q.reshape(b, t, heads, hd), k.reshape(b, t, kv_heads, hd), v.reshape(b, t, kv_heads, hd)


def rms_norm(x, w, *, eps, ex=None):
    return rms_norm_reference(x, w, eps)


def silu_mul(gate_up, *, ex=None):
    return silu_mul_reference(*jnp.split(gate_up, 2, axis=-1))


def rope_qkv(qkv, tables, *, heads, kv_heads, ex=None):
    q, k, v = split_qkv(qkv, heads, kv_heads)
    return rope_reference(q, tables), rope_reference(k, tables), v
