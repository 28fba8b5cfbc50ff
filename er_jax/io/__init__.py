"""Loading models into the weights pytree of docs/internals.md: GGUF files, Hugging Face directories, tokenizers.

The two file formats agree on orientation: projections are stored `[out, in]` (torch `Linear`, and GGUF in
numpy order), the embedding and LM head `[V, D]`. `assemble` turns tensors in that layout into the pytree.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from er_jax.config import ModelConfig


def source_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each (per-layer) tensor as both file formats store it: `[out, in]` projections, `[V, D]` tables
    (er_jax.weight_spec.file_shape of every leaf; "lm_head" is listed even for tied embeddings, whose files
    may still carry one)."""
    from er_jax.weight_spec import file_shape, leaf_specs

    specs = leaf_specs(config.replace(tie_embeddings=False))
    return {name: file_shape(name, s) for name, s in specs.items()}


LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def check_shape(name: str, actual, expected, source: str) -> None:
    if tuple(actual) != tuple(expected):
        raise ValueError(f"{source}: tensor {name!r} has shape {tuple(actual)}, expected {tuple(expected)} from the "
                         f"model config; the weights do not belong to this config (or the file is corrupt)")


def assemble(config: ModelConfig, fetch: Callable[[str, int | None, tuple], np.ndarray]) -> dict:
    """The weights pytree (numpy, `config.dtype`), from `fetch(key, layer, expected_shape)`.

    `fetch` returns the tensor for pytree `key` (of layer `layer`, None for global tensors) in the file layout
    above, after checking it has `expected_shape`. Projections and the LM head are transposed to `[in, out]`.
    """
    shapes = source_shapes(config)
    dtype = np.dtype(config.jnp_dtype)

    def get(key, layer=None):
        a = np.asarray(fetch(key, layer, shapes[key]))
        return (a.T if a.ndim == 2 and key != "embed" else a).astype(dtype)

    keys = [k for k in LAYER_KEYS if k in shapes]
    weights = {"embed": get("embed"),
               "layers": {k: np.stack([get(k, i) for i in range(config.num_layers)]) for k in keys},
               "final_norm": get("final_norm")}
    if not config.tie_embeddings:
        weights["lm_head"] = get("lm_head")
    return weights
