"""Static configuration: frozen, hashable dataclasses (usable as `jax.jit` static arguments)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The named choices a user makes, each defined once (argparse `choices`, validation and docs use these).
MODES = ("ar", "sd", "toggle", "adaptive", "auto")  # see er_jax.controller.policies
SCHEMES = ("int4", "int8")  # drafter weight formats, see er_jax.quant
DRAFTER_HEADS = ("shared", "int8")  # the drafter's LM head: the target's own, or int8 per vocab row (er_jax.quant)
BACKENDS = ("xla", "pallas", "native")  # op implementations, see er_jax.kernels.registry
LAYOUTS = ("stacked", "unstacked")  # layer weights: stacked and scanned, or a per-layer tuple (CPU)


def platform() -> str:
    """The platform jax runs on ("cpu", "gpu" or "tpu"): the one place that asks."""
    return jax.default_backend()


def check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama / Qwen2-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    dtype: str = "float32"  # activations and weights: "float32" on CPU, "bfloat16" on GPU
    name: str = "custom"
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"ModelConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class SamplingConfig:
    """How logits become a distribution. temperature 0 means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and int(self.top_k) < 1:
            raise ValueError(f"top_k must be >= 1 or None (no top-k), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class RolloutConfig:
    """Per-call generation settings (tunix-style name)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int = 0
    max_new_tokens: int | None = None  # None: the SpecRollout's max_new_tokens
    eos_ids: tuple[int, ...] | None = None  # None: the model's eos ids
    apply_chat_template: bool = False  # for string prompts

    def __post_init__(self):
        if self.max_new_tokens is not None and int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.eos_ids is not None:
            object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
        self.sampling  # validates temperature / top_k / top_p

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


# Shapes of real models, for benchmarks with random weights (timing does not depend on values).
SHAPE_PRESETS = {
    "smollm2-135m": ModelConfig(49152, 576, 1536, 30, 9, 3, 64, 100000.0, 1e-5, True, False,
                                name="smollm2-135m"),
    "qwen2.5-1.5b": ModelConfig(151936, 1536, 8960, 28, 12, 2, 128, 1000000.0, 1e-6, True, True,
                                name="qwen2.5-1.5b"),
    "qwen2.5-7b": ModelConfig(152064, 3584, 18944, 28, 28, 4, 128, 1000000.0, 1e-6, False, True,
                              name="qwen2.5-7b"),
    "llama3.1-8b": ModelConfig(128256, 4096, 14336, 32, 32, 8, 128, 500000.0, 1e-5, False, False,
                               name="llama3.1-8b"),
}
