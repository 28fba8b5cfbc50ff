"""Hugging Face model directories (config.json + *.safetensors) of Llama / Qwen2 models.

Safetensors are read through the `safetensors` package (`safe_open(framework="numpy")`: memory-mapped, no
torch, never a pickle); bfloat16 comes as `ml_dtypes.bfloat16`.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable

import numpy as np
from safetensors import SafetensorError, safe_open

from er_jax.config import ModelConfig
from er_jax.io import assemble, check_shape
from er_jax.io import tokenizer as tok

SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
ST_DTYPES = ("F64", "F32", "F16", "BF16")  # float tensors; bfloat16 arrives as ml_dtypes.bfloat16
HF_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight",
            "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
            "wv": "self_attn.v_proj.weight", "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
            "bv": "self_attn.v_proj.bias", "wo": "self_attn.o_proj.weight",
            "mlp_norm": "post_attention_layernorm.weight",
            "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight"}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} has no config.json; pass a Hugging Face model directory (config.json + "
                         f"*.safetensors), a .gguf file or a known model name")
    with open(cfg_path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}); re-download or fix it") from None


def config_from_hf(cfg: dict, source: str, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of a config.json (special token ids left at their defaults)."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    model_type = SUPPORTED.get(arch)
    if model_type is None or cfg.get("model_type") != model_type:
        raise ValueError(f"{source}: architecture {arch!r} (model_type {cfg.get('model_type')!r}) is not supported; "
                         f"supported: {', '.join(f'{a} ({t})' for a, t in SUPPORTED.items())}")

    def unsupported(what):
        raise ValueError(f"{source}: {what} is not supported yet")

    rope = cfg.get("rope_parameters") or {}  # transformers >= 5 writes rope_theta / rope_type here
    if cfg.get("rope_scaling") is not None or rope.get("rope_type", "default") != "default":
        unsupported(f"rope_scaling {cfg.get('rope_scaling') or rope}")
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported(f"hidden_act {cfg['hidden_act']!r}")
    if cfg.get("mlp_bias") or cfg.get("attention_bias"):
        unsupported("Llama attention_bias / mlp_bias")
    if cfg.get("use_sliding_window"):
        unsupported("use_sliding_window")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported("partial_rotary_factor")
    try:
        d, h = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]), hidden_size=d, intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]), num_heads=h,
            num_kv_heads=int(cfg.get("num_key_value_heads") or h), head_dim=int(cfg.get("head_dim") or d // h),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2", dtype=dtype, name=os.path.basename(os.path.normpath(source)))
    except KeyError as e:
        raise ValueError(f"{source}: config.json lacks {e.args[0]!r}; it is not a complete {model_type} "
                         f"config") from None


def read_safetensors(path: str) -> dict[str, tuple[str, list[int], Callable[[], np.ndarray]]]:
    """name -> (dtype, shape, load) of one .safetensors file; `load()` reads that tensor as a numpy array."""
    def load(name):
        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(name)

    try:
        with safe_open(path, framework="numpy") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                dtype, shape = sl.get_dtype(), list(sl.get_shape())
                if dtype not in ST_DTYPES:
                    raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; supported: {sorted(ST_DTYPES)}")
                out[name] = (dtype, shape, lambda name=name: load(name))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt: {e}); "
                         f"re-download it") from None
    return out


def weights_from_dir(path: str, config: ModelConfig) -> dict:
    """The weights pytree (numpy, `config.dtype`) from every *.safetensors file of `path`."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path} has no *.safetensors files (pytorch .bin weights are not read, by design: they "
                         f"are pickles); convert them with transformers' save_pretrained(safe_serialization=True)")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded: read exactly the shards the index lists
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise ValueError(f"{path}: shards {missing} listed in model.safetensors.index.json are missing; "
                             f"download them")
        files = [os.path.join(path, s) for s in shards]
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(f))
    used = set()

    def fetch(key, layer, expected):
        name = HF_NAMES[key] if layer is None else f"model.layers.{layer}.{HF_NAMES[key]}"
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing from the safetensors files")
        used.add(name)
        _, shape, load = tensors[name]
        check_shape(name, shape, expected, path)
        return load()

    weights = assemble(config, fetch)
    if config.tie_embeddings:
        used.add(HF_NAMES["lm_head"])  # some tied checkpoints still store a copy
    unknown = sorted(n for n in set(tensors) - used if not n.endswith(IGNORED_SUFFIXES))
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:5]} ({len(unknown)} in all) are not part of a "
                         f"{config.name} model this loader understands")
    return weights


def load_hf(path: str, dtype: str = "float32"):
    """`(config, numpy weights, tokenizer or None)` of a Hugging Face Llama / Qwen2 directory."""
    cfg = read_config(path)
    config = config_from_hf(cfg, path, dtype)
    tokenizer = tok.from_hf_dir(path, cfg)
    if tokenizer is not None:
        config = config.replace(bos_id=tokenizer.bos_id, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    else:  # no tokenizer.json: the ids config.json states
        eos = [int(e) for e in tok.listify(cfg.get("eos_token_id"))]
        pad = cfg.get("pad_token_id")
        config = config.replace(bos_id=cfg.get("bos_token_id"), eos_ids=tuple(eos),
                                pad_id=int(pad) if pad is not None else (eos[0] if eos else 0))
    return config, weights_from_dir(path, config), tokenizer
