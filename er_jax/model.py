"""The functional decoder (Llama / Qwen2 family): one `forward` for prefill, cached decode of T >= 1
tokens per row at per-row positions (decode, draft, verify), and teacher-forced training.

Layers are stacked on a leading axis and scanned. Projection leaves may be `QuantArray`s (the drafter);
`linear` dispatches them to the quantized matmul.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from er_jax import sharding
from er_jax.cache import KVCache
from er_jax.config import DTYPES, ModelConfig
from er_jax.execution import Execution
from er_jax.kernels.pointwise import rope_reference, rope_tables, silu_mul_reference
from er_jax.panels import pack_weights
from er_jax.quant import QuantArray, derive_drafter

DEFAULT_EXECUTION = Execution()  # XLA, one device, stacked layers


def rope(x, positions, theta):
    """Rotate-half RoPE (Hugging Face layout). x [B, T, heads, hd], positions int [B, T]."""
    return rope_reference(x, rope_tables(positions, x.shape[-1], theta))


def linear(x, w, ex: Execution, name: str | None = None, layer=None):
    """x @ w through the execution's backend: a QuantArray (the drafter's projection `name`) goes to the
    quantized matmul op, a dense array to the dense one. With `layer`, w is the whole stacked [L, K, N]
    QuantArray and the op reads layer `layer` of it in place (only for ops with `reads_stacked`)."""
    if layer is not None:
        return ex.op("quant_matmul")(x, w, ex=ex, name=name, layer=layer)
    return ex.op("quant_matmul" if isinstance(w, QuantArray) else "matmul")(x, w, ex=ex, name=name)


def _read_in_place(layers, ex: Execution) -> dict:
    """The stacked QuantArray projections (the drafter's) that this backend's quantized matmul reads in
    place from the stack (`layer=`), instead of the scan slicing a per-layer copy to feed its custom call."""
    if not getattr(ex.op("quant_matmul"), "reads_stacked", False):
        return {}
    return {n: w for n, w in layers.items() if isinstance(w, QuantArray)}


def _layer(config: ModelConfig, lw, x, positions, kv_write, ex: Execution, stacked=None, layer=None,
           tables=None):
    """One decoder layer. `kv_write(k_new, v_new) -> (k, v, layer)` stores this layer's new K/V and
    returns the keys/values to attend over: one layer's [B, S, KV, hd], or the stacked cache with `layer`
    (a backend's attention may then read the layer in place instead of a sliced copy). `stacked`: the
    projections passed whole ([L, ...], see `_read_in_place`), read at layer `layer`. `tables`: the
    positions' `rope_tables` (computed here when not given)."""
    stacked = stacked or {}
    mm = lambda y, n: linear(y, stacked[n], ex, n, layer) if n in stacked else linear(y, lw[n], ex, n)
    b, t, _ = x.shape
    h, kvh, hd = config.num_heads, config.num_kv_heads, config.head_dim
    tables = rope_tables(positions, hd, config.rope_theta) if tables is None else tables
    norm = lambda y, w: ex.op("rms_norm")(y, w, eps=config.rms_norm_eps, ex=ex)  # noqa: E731
    y = norm(x, lw["attn_norm"])
    if "wqkv" in lw:  # fused (er_jax.panels.FUSED): one matmul, columns q | k | v
        qkv = linear(y, lw["wqkv"], ex, "wqkv")
        if config.qkv_bias:
            qkv = qkv + jnp.concatenate([lw[n] for n in ("bq", "bk", "bv")]).astype(qkv.dtype)
        q, k, v = ex.op("rope_qkv")(qkv, tables, heads=h, kv_heads=kvh, ex=ex)
    else:
        q, k, v = (mm(y, n) for n in ("wq", "wk", "wv"))
        if config.qkv_bias:
            q, k, v = q + lw["bq"].astype(q.dtype), k + lw["bk"].astype(k.dtype), v + lw["bv"].astype(v.dtype)
        q = rope_reference(q.reshape(b, t, h, hd), tables)
        k = rope_reference(k.reshape(b, t, kvh, hd), tables)
        v = v.reshape(b, t, kvh, hd)
    k_all, v_all, layer = kv_write(k, v)
    o = ex.op("attention")(q, k_all, v_all, positions, ex=ex, layer=layer)
    x = x + mm(o.reshape(b, t, h * hd), "wo")
    y = norm(x, lw["mlp_norm"])
    if "w_gate_up" in lw:
        act = ex.op("silu_mul")(linear(y, lw["w_gate_up"], ex, "w_gate_up"), ex=ex)
    else:
        act = silu_mul_reference(mm(y, "w_gate"), mm(y, "w_up"))
    return x + mm(act, "w_down")


def logits_from_hidden(config: ModelConfig, weights, x, ex: Execution = DEFAULT_EXECUTION):
    """Final norm and LM head; f32 logits. A drafter with its own quantized head (`lm_head_q`, see
    er_jax.quant.derive_drafter) runs it through the backend's quant_matmul op, and a packed head
    (`lm_head_p`, `execution_layout`) through its matmul op, f32 activations."""
    x = ex.op("rms_norm")(x, weights["final_norm"], eps=config.rms_norm_eps, ex=ex)
    if weights.get("lm_head_q") is not None:
        return ex.op("quant_matmul")(x.astype(jnp.float32), weights["lm_head_q"], ex=ex, name="lm_head")
    if weights.get("lm_head_p") is not None:
        return ex.op("matmul")(x.astype(jnp.float32), weights["lm_head_p"], ex=ex, name="lm_head")
    head = _float_table(weights["embed"]).T if config.tie_embeddings else weights["lm_head"]
    return jnp.einsum("...d,dv->...v", x, head, preferred_element_type=jnp.float32)


def _float_table(a):
    """A uint16 embedding holds bf16 bits (the native layout's, er_jax.panels.pack_weights)."""
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


def embed_rows(table, tokens, dtype):
    """table[tokens] as `dtype`, the rows gathered before any conversion (see _float_table)."""
    return _float_table(table[tokens]).astype(dtype)


def forward(config: ModelConfig, weights, tokens, cache: KVCache | None = None, *,
            logit_index=None, ex: Execution = DEFAULT_EXECUTION):
    """Run the decoder on `tokens` (int [B, T]).

    Without `cache`: teacher-forced causal forward over positions 0..T-1; returns logits [B, T, V] (f32).
    Right-padding is harmless (pads only follow real tokens).
    With `cache`: the new tokens sit at positions `cache.lengths[b] + t`; their K/V are written there and
    each attends to all cached positions before it. Returns `(logits, cache)` with `lengths` unchanged.
    `logit_index` (int [B, K]) selects which of the T positions get logits ([B, K, V]); default all.
    `ex`: how the ops run (backend, mesh; see er_jax.execution); the layer layout is read off `weights`.
    """
    b, t = tokens.shape
    x = embed_rows(weights["embed"], tokens, config.jnp_dtype)
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    tables = rope_tables(positions, config.head_dim, config.rope_theta)

    layers = weights["layers"]
    unstacked = isinstance(layers, (list, tuple))  # see unstack_layers
    if cache is None:
        def body(x, lw):
            return _layer(config, lw, x, positions, lambda k, v: (k, v, None), ex, tables=tables), None

        if unstacked:
            for lw in layers:
                x, _ = body(x, lw)
        else:
            x, _ = jax.lax.scan(body, x, layers)
    else:
        in_place = {} if unstacked else _read_in_place(layers, ex)

        def body(carry, xs):
            x, k_all, v_all = carry
            i, lw = xs

            def kv_write(k, v):
                nonlocal k_all, v_all
                k_all, v_all = ex.op("kv_write")(k_all, v_all, k, v, positions, ex=ex, layer=i)
                return k_all, v_all, i

            x = _layer(config, lw, x, positions, kv_write, ex, in_place, i, tables)
            return (x, k_all, v_all), None

        carry = (x, cache.k, cache.v)
        if unstacked:
            for i, lw in enumerate(layers):
                carry, _ = body(carry, (i, lw))
        else:
            scanned = {n: w for n, w in layers.items() if n not in in_place}
            carry, _ = jax.lax.scan(body, carry, (jnp.arange(config.num_layers), scanned))
        x, k_all, v_all = carry
        cache = KVCache(k_all, v_all, cache.lengths)

    if logit_index is not None:
        x = jnp.take_along_axis(x, logit_index[:, :, None], axis=1)
    logits = logits_from_hidden(config, weights, x, ex)
    return logits if cache is None else (logits, cache)


def unstack_layers(weights):
    """The execution layout for CPU: `layers` as a tuple of per-layer dicts, run by a Python loop.

    XLA on CPU copies each layer's weights out of a stacked array inside a scan (and for static slices),
    which doubles the bytes a memory-bound decode step moves; separate per-layer arrays avoid that. The
    stacked layout stays the contract (training, checkpoints, GPU/TPU); this is a derived, read-only view.
    """
    layers = weights["layers"]
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return {**weights, "layers": tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], layers) for i in range(n))}


def execution_layout(weights, ex: Execution, head=None):
    """The weights as `ex` runs them: the stacked contract itself, or (`ex.layout == "unstacked"`, CPU) its
    per-layer view, on the native backend with the projections (dense or quantized) and the LM head in
    panel-major layout (er_jax.panels.pack_weights; `head`: a packed head to share, e.g. the target's for its
    drafter). Derive it again after every weight update; the result is read-only."""
    if ex.layout != "unstacked":
        return weights
    return pack_weights(weights, head) if ex.backend == "native" else unstack_layers(weights)


def drafter_layout(weights, ex: Execution, scheme: str, head: str = "shared", target_head=None,
                   group_size: int = 128):
    """`execution_layout(derive_drafter(weights, scheme, group_size, head), ex, target_head)`, the drafter as `ex`
    runs it (placed on `ex.mesh` when there is one); on the native backend's per-layer layout the quantization
    is fused with the packing (`pack_weights(..., drafter=)`)."""
    if ex.layout == "unstacked" and ex.backend == "native" and ex.mesh is None:
        return pack_weights(weights, target_head, drafter=scheme, drafter_head=head, group_size=group_size)
    drafter = derive_drafter(weights, scheme, group_size, head)
    if ex.mesh is not None:
        drafter = sharding.shard_weights(drafter, ex.mesh)
    return execution_layout(drafter, ex, target_head)


def init_weights(config: ModelConfig, key, scale: float = 0.02):
    """Random weights of the right shapes (tests and timing benchmarks), from er_jax.weight_spec: Gaussian
    (std `scale`) projections, biases, embedding and LM head, unit norm gains."""
    from er_jax.weight_spec import layer_spec, top_spec

    layer, top = layer_spec(config), top_spec(config)
    n_layer_random = sum(s.init == "normal" for s in layer.values())
    keys = iter(jax.random.split(key, n_layer_random + 2))
    make = lambda s: (jnp.ones(s.shape, DTYPES[s.dtype]) if s.init == "ones" else
                      (scale * jax.random.normal(next(keys), s.shape)).astype(DTYPES[s.dtype]))
    layers = {name: make(s) for name, s in layer.items()}  # key order: the projections, then the biases
    return {**{name: make(s) for name, s in top.items()}, "layers": layers}


def validate_weights(config: ModelConfig, weights, what: str = "weights") -> None:
    """Raise ValueError unless `weights` has the structure and shapes `config` implies."""
    from er_jax.weight_spec import abstract_weights

    want = abstract_weights(config)
    got_struct, want_struct = jax.tree_util.tree_structure(weights), jax.tree_util.tree_structure(want)
    if got_struct != want_struct:
        raise ValueError(f"{what} have structure {got_struct}; {config.name} needs {want_struct}")
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(weights), jax.tree_util.tree_leaves(want)):
        if tuple(getattr(leaf, "shape", ())) != spec.shape:
            raise ValueError(f"{what}{jax.tree_util.keystr(path)} has shape {tuple(getattr(leaf, 'shape', ()))}, "
                             f"expected {spec.shape} for {config.name}")
