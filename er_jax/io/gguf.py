"""Llama-architecture GGUF files (llama.cpp's format): config, dequantized weights, tokenizer."""
from __future__ import annotations

import os

import numpy as np

from er_jax.config import ModelConfig
from er_jax.io import assemble, check_shape
from er_jax.io import tokenizer as tok

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# pytree key -> GGUF tensor name (per layer: "blk.{i}." + name).
GGUF_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
              "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
              "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias", "wo": "attn_output.weight",
              "mlp_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight",
              "w_down": "ffn_down.weight"}


def open_gguf(path: str):
    """A `gguf.GGUFReader` over `path`, or ValueError saying what is wrong with the file."""
    import gguf

    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist; pass the path of a .gguf file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf file "
                         f"or a Hugging Face model directory")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on cut-off headers
        raise ValueError(f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: {e}); "
                         f"download it again") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} but "
                             f"the file has {size} bytes; download it again")
    return reader


def metadata(reader) -> dict:
    """Every metadata key -> its decoded value (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items()}


def config_from_metadata(meta: dict, tensor_names, source: str, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig a llama-architecture GGUF describes (special token ids left at their defaults)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: general.architecture is {arch!r}; only 'llama' GGUF files are supported "
                         f"(for Qwen2 load its Hugging Face directory)")

    def key(k, default=None):
        v = meta.get(f"llama.{k}", default)
        if v is None:
            raise ValueError(f"{source}: metadata key 'llama.{k}' is missing; the file is not a complete llama GGUF")
        return v

    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{source}: RoPE scaling ({scaling!r}, rope_freqs) is not supported yet")
    d, h = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", d // h))
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{source}: partial rotary embedding (rope.dimension_count "
                         f"{meta['llama.rope.dimension_count']} != head_dim {head_dim}) is not supported")
    vocab = meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", ())) or None)
    if vocab is None:
        raise ValueError(f"{source}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=d, intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")), num_heads=h, num_kv_heads=int(key("attention.head_count_kv", h)),
        head_dim=head_dim, rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names, qkv_bias="blk.0.attn_q.bias" in tensor_names,
        dtype=dtype, name=str(meta.get("general.name") or os.path.splitext(os.path.basename(source))[0]))


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-script permutation of attn_q / attn_k rows (weights [out, in] or biases [out]).

    The converter maps the Hugging Face (rotate-half) row order `(head, half, i)` to the interleaved order
    `(head, i, half)`; this maps it back.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weights_from_reader(reader, config: ModelConfig, source: str) -> dict:
    """The weights pytree (numpy) of a llama GGUF, dequantized to `config.dtype`, q/k in rotate-half layout."""
    from gguf import quants

    tensors = {t.name: t for t in reader.tensors}
    used = set()

    def fetch(key, layer, expected):
        name = GGUF_NAMES[key] if layer is None else f"blk.{layer}.{GGUF_NAMES[key]}"
        if name not in tensors:
            raise ValueError(f"{source}: tensor {name!r} is missing; the file is incomplete or not a llama model")
        t = tensors[name]
        used.add(name)
        check_shape(name, tuple(int(n) for n in reversed(t.shape)), expected, source)  # GGUF lists dims inner-first
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(f"{source}: tensor {name!r} has type {t.tensor_type.name}; supported: "
                             f"{', '.join(SUPPORTED_TYPES)} (requantize with llama-quantize, e.g. to Q8_0)")
        w = quants.dequantize(t.data, t.tensor_type).reshape(expected)
        if key in ("wq", "bq"):
            w = unpermute_rope(w, config.num_heads)
        elif key in ("wk", "bk"):
            w = unpermute_rope(w, config.num_kv_heads)
        return w

    weights = assemble(config, fetch)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ValueError(f"{source}: tensors {unknown[:5]} ({len(unknown)} in all) are not part of a plain llama "
                         f"model; this loader does not support them")
    return weights


def load_gguf(path: str, dtype: str = "float32"):
    """`(config, numpy weights, tokenizer)` of a llama GGUF file."""
    reader = open_gguf(path)
    meta = metadata(reader)
    config = config_from_metadata(meta, {t.name for t in reader.tensors}, path, dtype)
    tokenizer = tok.from_gguf(meta, path)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but llama.vocab_size is "
                         f"{config.vocab_size}; the file is inconsistent")
    config = config.replace(bos_id=tokenizer.bos_id, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    return config, weights_from_reader(reader, config, path), tokenizer
