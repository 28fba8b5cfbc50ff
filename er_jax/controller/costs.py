"""Model constants (bytes and FLOPs per step), hardware constants, and the roofline cost model.

Cost model (the paper's roofline form, plus a fixed per-step overhead o_* for launch / dispatch):
    M_T = (W_T + κ·B·S)/BW          M_D = (η_D·W_D + κ·B·S)/BW          C = B·(C_dense + S·C_attn)/F
    T_T = max(M_T, C) + c_T·B + o_T   T_D = max(M_D, C) + c_D·B + o_D   T_V(γ) = max(M_T, (γ+1)·C) + c_V·B + o_V
    step time: T_T (γ = 0) or γ·T_D + T_V(γ);   speedup = τ·T_T / (γ·T_D + T_V(γ))
A step over B rows emits B·τ tokens (τ = 1 for a plain step), so time per emitted token = step time / (B·τ).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from er_jax.config import SCHEMES, ModelConfig, check_choice, platform
from er_jax.weight_spec import ITEMSIZE, PROJECTIONS, leaf_specs

KINDS = ("ar", "draft", "verify", "sd")
DEFAULT_LADDER = (5, 7, 9, 11)

# ---------------------------------------------------------------------------------------------------------
# Model constants
# ---------------------------------------------------------------------------------------------------------
def quantized_bytes(k: int, n: int, scheme: str, group_size: int = 128) -> int:
    """Bytes of one [k, n] projection as er_jax.quant stores it.
    int4: packed codes (0.5 B/param, k padded up to whole groups) + f32 scale + uint8 zero per group and
    column; int8: 1 B/param + an f32 scale per output column."""
    if scheme == "int8":
        return k * n + 4 * n
    if scheme == "int4":
        groups = -(-k // group_size)
        return groups * group_size // 2 * n + groups * n * (4 + 1)
    raise ValueError(f"drafter scheme must be one of {SCHEMES}, got {scheme!r}")


@dataclass(frozen=True)
class ModelCosts:
    """Bytes and FLOPs of one decode step of a model and its drafter.

    target_bytes        W_T: weights a target forward reads per step (projections, biases, norms, LM head;
                        the embedding lookup is a gather and counts nothing)
    drafter_bytes       W_D: the same for the drafter (quantized projections; biases, norms and LM head
                        are shared at the target dtype)
    kv_bytes_per_token  κ = 2·L·KV·hd·itemsize
    flops_dense         C_dense: matmul FLOPs per token, 2 · (projection + LM-head parameters)
    flops_attn          C_attn: attention FLOPs per token per context position, 4·L·H·hd (QKᵀ and PV)
    """

    target_bytes: float
    drafter_bytes: float
    kv_bytes_per_token: float
    flops_dense: float
    flops_attn: float
    drafter_scheme: str = "int4"
    name: str = "custom"

    def __post_init__(self):
        for f in ("target_bytes", "drafter_bytes", "flops_dense"):
            if not getattr(self, f) > 0:
                raise ValueError(f"ModelCosts.{f} must be > 0, got {getattr(self, f)}")
        for f in ("kv_bytes_per_token", "flops_attn"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"ModelCosts.{f} must be >= 0, got {getattr(self, f)}")
        check_choice("drafter scheme", self.drafter_scheme, SCHEMES)

    @classmethod
    def from_config(cls, config: ModelConfig, drafter_scheme: str = "int4", group_size: int = 128) -> "ModelCosts":
        check_choice("drafter scheme", drafter_scheme, SCHEMES)
        it = ITEMSIZE[config.dtype]
        specs = leaf_specs(config)
        proj = [specs[p] for p in PROJECTIONS]  # [L, K, N] each
        proj_params = sum(s.size for s in proj)
        head = config.vocab_size * config.hidden_size  # the LM head (the embedding's transpose when tied)
        # biases, norms and the LM head; the embedding lookup is a gather and counts nothing
        shared = sum(s.size for name, s in specs.items() if name not in PROJECTIONS + ("embed", "lm_head")) + head
        quant = sum(s.shape[0] * quantized_bytes(s.shape[1], s.shape[2], drafter_scheme, group_size) for s in proj)
        kvd = config.num_kv_heads * config.head_dim
        return cls(target_bytes=float((proj_params + shared) * it), drafter_bytes=float(quant + shared * it),
                   kv_bytes_per_token=float(2 * config.num_layers * kvd * it),
                   flops_dense=float(2 * (proj_params + head)),
                   flops_attn=float(4 * config.num_layers * config.num_heads * config.head_dim),
                   drafter_scheme=drafter_scheme, name=config.name)


# ---------------------------------------------------------------------------------------------------------
# Hardware constants
# ---------------------------------------------------------------------------------------------------------
FIT_FIELDS = ("bw", "flops", "eta_d", "c_t", "c_d", "c_v", "o_t", "o_d", "o_v")


@dataclass(frozen=True)
class HardwareConstants:
    """Fitted (or default) constants of the cost model. Seconds, bytes/s and FLOP/s."""

    bw: float  # memory bandwidth, bytes/s
    flops: float  # matmul throughput, FLOP/s
    eta_d: float = 1.0  # drafter weight-read inefficiency: effective / nominal drafter bytes
    c_t: float = 0.0  # seconds per row of a target decode step (sampling, bookkeeping)
    c_d: float = 0.0  # seconds per row of one draft step
    c_v: float = 0.0  # seconds per row of a verify step (incl. rejection sampling)
    o_t: float = 0.0  # fixed seconds per target decode step (launch / dispatch)
    o_d: float = 0.0  # fixed seconds per draft step
    o_v: float = 0.0  # fixed seconds per verify step
    platform: str = "custom"

    def __post_init__(self):
        for f in FIT_FIELDS:
            val, positive = getattr(self, f), f in ("bw", "flops", "eta_d")
            if not ((val > 0 if positive else val >= 0) and math.isfinite(val)):
                raise ValueError(f"HardwareConstants.{f} must be finite and {'> 0' if positive else '>= 0'}, got {val}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HardwareConstants":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown HardwareConstants fields {sorted(unknown)}")
        return cls(**{k: (str(v) if k == "platform" else float(v)) for k, v in d.items()})


# Rough starting points; online calibration or `fit` on a timing sweep replaces them.
# 2 CPU cores, f32, the XLA backend: the quantized drafter is dequantized to f32 on the fly, so a draft step
# costs more than a target step: η_D ≈ 7 (fitted from a sweep of SmolLM2: experiments/results/calibration_cpu.json).
_CPU_XLA = HardwareConstants(bw=1.5e10, flops=5e10, eta_d=7.0, c_t=2e-6, c_d=2e-6, c_v=4e-6,
                             o_t=3e-4, o_d=1e-4, o_v=3e-4, platform="cpu")
_DEFAULTS = {
    # 2 CPU cores (AVX-512), f32, the native backend (the CPU default) on panel-major, fused weights: fitted
    # from a sweep of SmolLM2 with the int8 drafter + int8 head (Zen 4, 2026-12-06;
    # experiments/results/calibration_cpu_native_zen4_1206.json). The fixed costs o_* (attention, sampling,
    # per-call overhead over 30 layers) carry much of a small-batch step; bw and flops are fitted slopes, not
    # the machine's peaks.
    "cpu": HardwareConstants(bw=3.09e10, flops=1.69e11, eta_d=0.13, c_t=3.6e-6, c_d=2.4e-6, c_v=4.6e-6,
                             o_t=5.5e-3, o_d=4.8e-3, o_v=5.1e-3, platform="cpu"),
    # H100-ish: 3.0 TB/s HBM, 400 TFLOP/s bf16 dense (sustained, not peak).
    "gpu": HardwareConstants(bw=3.0e12, flops=4e14, eta_d=1.3, c_t=1e-5, c_d=5e-6, c_v=1e-5,
                             o_t=1.5e-4, o_d=5e-5, o_v=2e-4, platform="gpu"),
    # TPU v5e-ish: 0.8 TB/s HBM, 197 TFLOP/s bf16.
    "tpu": HardwareConstants(bw=8.1e11, flops=1.97e14, eta_d=1.3, c_t=1e-5, c_d=5e-6, c_v=1e-5,
                             o_t=1e-4, o_d=5e-5, o_v=1e-4, platform="tpu"),
}
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def defaults_for(platform_name: str, backend: str | None = None) -> HardwareConstants:
    """Default constants for "cpu", "gpu" (also "cuda", "rocm") or "tpu", for the op backend that runs
    (config.BACKENDS; default: the platform's, `registry.default_backend`). On CPU the XLA backend's
    quantized drafter costs 20-40x the native one's, so it has its own constants."""
    key = _PLATFORM_ALIASES.get(str(platform_name).lower(), str(platform_name).lower())
    if key not in _DEFAULTS:
        raise ValueError(f"no hardware defaults for platform {platform_name!r}; use one of {sorted(_DEFAULTS)}")
    if key == "cpu":
        from er_jax.kernels import registry
        if (backend or registry.default_backend("cpu")) == "xla":
            return _CPU_XLA
    return _DEFAULTS[key]


def current_platform() -> str:
    return platform()


# ---------------------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------------------
def component_times(hw: HardwareConstants, costs: ModelCosts, batch, context, gamma):
    """(T_T, T_D, T_V(γ)) in seconds. Arguments may be scalars or numpy arrays (they broadcast)."""
    kv = costs.kv_bytes_per_token * batch * context
    mem_t = (costs.target_bytes + kv) / hw.bw
    mem_d = (hw.eta_d * costs.drafter_bytes + kv) / hw.bw
    comp = batch * (costs.flops_dense + context * costs.flops_attn) / hw.flops
    t_t = np.maximum(mem_t, comp) + hw.c_t * batch + hw.o_t
    t_d = np.maximum(mem_d, comp) + hw.c_d * batch + hw.o_d
    t_v = np.maximum(mem_t, (gamma + 1) * comp) + hw.c_v * batch + hw.o_v
    return t_t, t_d, t_v


def predict_wall(hw: HardwareConstants, costs: ModelCosts, kind, batch, context, gamma):
    """Predicted seconds of a timed unit: "ar" T_T, "draft" γ·T_D (the whole draft scan), "verify" T_V(γ),
    "sd" γ·T_D + T_V(γ). Vectorized over numpy arrays."""
    kind, gamma = np.asarray(kind), np.asarray(gamma, float)
    t_t, t_d, t_v = component_times(hw, costs, batch, context, gamma)
    return (np.where(kind == "ar", t_t, 0.0) + np.where(np.isin(kind, ("draft", "sd")), gamma * t_d, 0.0)
            + np.where(np.isin(kind, ("verify", "sd")), t_v, 0.0))


def _check_gamma(gamma) -> int:
    if int(gamma) != gamma or gamma < 0:
        raise ValueError(f"γ must be an integer >= 0 (0 = plain step), got {gamma}")
    return int(gamma)


def step_time(hw: HardwareConstants, costs: ModelCosts, batch: float, context: float, gamma: int) -> float:
    """Seconds of one engine step: T_T for γ = 0, γ·T_D + T_V(γ) otherwise."""
    gamma = _check_gamma(gamma)
    t_t, t_d, t_v = component_times(hw, costs, batch, context, gamma)  # scalar fast path of predict_wall
    return float(t_t if gamma == 0 else gamma * t_d + t_v)


def speedup(hw: HardwareConstants, costs: ModelCosts, batch: float, context: float, gamma: int,
            tau: float) -> float:
    """τ·T_T / (γ·T_D + T_V(γ)): predicted speculative over plain throughput."""
    if _check_gamma(gamma) < 1:
        raise ValueError(f"speedup needs γ >= 1, got {gamma}")
    return tau * step_time(hw, costs, batch, context, 0) / step_time(hw, costs, batch, context, gamma)


def time_per_token(hw: HardwareConstants, costs: ModelCosts, batch: float, context: float, gamma: int,
                   tau: float = 1.0, active: float | None = None) -> float:
    """Step time / (active·τ): seconds per emitted token. The step runs over `batch` (padded) rows, of which
    `active` (default: all) emit; τ is ignored for γ = 0 (a plain step emits one token per row)."""
    tau = 1.0 if _check_gamma(gamma) == 0 else tau
    return step_time(hw, costs, batch, context, gamma) / ((batch if active is None else active) * tau)


def step_intensity(costs: ModelCosts, batch: int, context: float, gamma: int,
                   drafter: bool = True) -> tuple[float, float]:
    """(FLOPs, bytes) of one step, for arithmetic intensity. γ = 0: one target decode. γ > 0: γ draft steps
    (left out with drafter=False) + one verify over γ+1 positions. Nominal bytes (no η_D)."""
    gamma = _check_gamma(gamma)
    tok_flops = batch * (costs.flops_dense + context * costs.flops_attn)
    kv = costs.kv_bytes_per_token * batch * context
    flops, nbytes = (gamma + 1 if gamma else 1) * tok_flops, costs.target_bytes + kv
    if gamma and drafter:
        flops += gamma * tok_flops
        nbytes += gamma * (costs.drafter_bytes + kv)
    return float(flops), float(nbytes)


def expected_tau(alpha: float, gamma: int) -> float:
    """Expected tokens per speculative step with i.i.d. per-token acceptance α: (1 − α^(γ+1)) / (1 − α)."""
    gamma = _check_gamma(gamma)
    if not 0 <= alpha <= 1:
        raise ValueError(f"acceptance α must be in [0, 1], got {alpha}")
    return float(gamma + 1) if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_tau_positions(rates: Sequence[float]) -> float:
    """τ = 1 + Σ_{i=1}^{γ} Π_{j=1}^{i} a_j, with a_j the acceptance rate of draft position j given that
    all earlier ones were accepted (γ = len(rates))."""
    tau, reach = 1.0, 1.0
    for a in rates:
        if not 0 <= a <= 1:
            raise ValueError(f"acceptance rates must be in [0, 1], got {a}")
        reach *= a
        tau += reach
    return tau


def alpha_from_tau(tau: float, gamma: int) -> float:
    """The i.i.d. acceptance α whose expected_tau(α, γ) equals τ (bisection; τ clipped to [1, γ+1])."""
    gamma = _check_gamma(gamma)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tau(mid, gamma) < tau else (lo, mid)
    return (lo + hi) / 2
