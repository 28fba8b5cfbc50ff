"""er_jax: system-aware self-speculative decoding for RL rollouts, in JAX/Pallas."""
from er_jax.config import ModelConfig, RolloutConfig, SamplingConfig, SHAPE_PRESETS
from er_jax.execution import Execution
from er_jax.engine import RolloutOutput
from er_jax.model import forward, init_weights
from er_jax.quant import QuantArray, derive_drafter
from er_jax.rollout import SpecRollout


def load_model(name_or_path: str | None = None, dtype: str = "float32", **kw):
    """A named model ("smollm2"), a GGUF file, a Hugging Face directory or a shape preset (`preset=` or
    "preset:NAME", random weights) -> Model(config, weights, tokenizer, source); see er_jax.io.registry.load_model
    for `preset`, `layers`, `seed`, `weights`."""
    from er_jax.io.registry import load_model as _load
    return _load(name_or_path, dtype, **kw)


__all__ = ["Execution", "ModelConfig", "QuantArray", "RolloutConfig", "RolloutOutput", "SHAPE_PRESETS",
           "SamplingConfig", "SpecRollout", "derive_drafter", "forward", "init_weights", "load_model"]
