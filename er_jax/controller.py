"""Host-side controller: model constants, the roofline cost model, fitting and online calibration, and the
decode policies (ar / sd / toggle / adaptive / auto) that pick γ for every engine step.

Pure Python + numpy; nothing here is traced by jax.

Cost model (the paper's roofline form, plus a fixed per-step overhead o_* for launch / dispatch):
    M_T = (W_T + κ·B·S)/BW          M_D = (η_D·W_D + κ·B·S)/BW          C = B·(C_dense + S·C_attn)/F
    T_T = max(M_T, C) + c_T·B + o_T   T_D = max(M_D, C) + c_D·B + o_D   T_V(γ) = max(M_T, (γ+1)·C) + c_V·B + o_V
    step time: T_T (γ = 0) or γ·T_D + T_V(γ);   speedup = τ·T_T / (γ·T_D + T_V(γ))
A step over B rows emits B·τ tokens (τ = 1 for a plain step), so time per emitted token = step time / (B·τ).

Engine protocol: `policy.start_rollout()`; per step `γ = policy.choose(batch_bucket, active, mean_context)`,
run it, `policy.observe(StepRecord(...))`; finally `policy.end_rollout()`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from er_jax.config import MODES, SCHEMES, ModelConfig, check_choice, platform

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
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
        d, f, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
        qd, kvd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        projections = [(d, qd), (d, kvd), (d, kvd), (qd, d), (d, f), (d, f), (f, d)]  # [K, N] per layer
        proj_params = n * sum(k * m for k, m in projections)
        shared = v * d + (2 * n + 1) * d + (n * (qd + 2 * kvd) if config.qkv_bias else 0)  # head, norms, biases
        quant = n * sum(quantized_bytes(k, m, drafter_scheme, group_size) for k, m in projections)
        return cls(target_bytes=float((proj_params + shared) * it), drafter_bytes=float(quant + shared * it),
                   kv_bytes_per_token=float(2 * n * kvd * it), flops_dense=float(2 * (proj_params + v * d)),
                   flops_attn=float(4 * n * qd), drafter_scheme=drafter_scheme, name=config.name)


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
_DEFAULTS = {
    # 2 CPU cores, f32, XLA path. The int4 drafter is dequantized to f32 on the fly, so a draft step costs more
    # than a target step: η_D ≈ 7 (fitted from a sweep of SmolLM2: experiments/results/calibration_cpu.json).
    "cpu": HardwareConstants(bw=1.5e10, flops=5e10, eta_d=7.0, c_t=2e-6, c_d=2e-6, c_v=4e-6,
                             o_t=3e-4, o_d=1e-4, o_v=3e-4, platform="cpu"),
    # H100-ish: 3.0 TB/s HBM, 400 TFLOP/s bf16 dense (sustained, not peak).
    "gpu": HardwareConstants(bw=3.0e12, flops=4e14, eta_d=1.3, c_t=1e-5, c_d=5e-6, c_v=1e-5,
                             o_t=1.5e-4, o_d=5e-5, o_v=2e-4, platform="gpu"),
    # TPU v5e-ish: 0.8 TB/s HBM, 197 TFLOP/s bf16.
    "tpu": HardwareConstants(bw=8.1e11, flops=1.97e14, eta_d=1.3, c_t=1e-5, c_d=5e-6, c_v=1e-5,
                             o_t=1e-4, o_d=5e-5, o_v=1e-4, platform="tpu"),
}
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def defaults_for(platform_name: str) -> HardwareConstants:
    """Default constants for "cpu", "gpu" (also "cuda", "rocm") or "tpu"."""
    key = _PLATFORM_ALIASES.get(str(platform_name).lower(), str(platform_name).lower())
    if key not in _DEFAULTS:
        raise ValueError(f"no hardware defaults for platform {platform_name!r}; use one of {sorted(_DEFAULTS)}")
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


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StepRecord:
    """What the engine reports after each step. Counts are over the step's live rows.

    accepted_per_position[i]: rows that accepted draft position i (0-based);
    rows_reaching_position[i]: rows for which position i was tested (all earlier ones accepted).
    flops / bytes: from `step_intensity` (optional, for reports).
    compiled: the step compiled an executable first, so its wall time is no timing sample (nor is a step with
    wall_s = 0): policies use its counts only."""

    step: int
    wall_s: float
    batch_bucket: int
    active: int
    mean_context: float
    gamma: int
    emitted: int
    drafted: int | None = None  # default: γ · rows_reaching_position[0]
    accepted_per_position: list[int] = field(default_factory=list)
    rows_reaching_position: list[int] = field(default_factory=list)
    flops: float = 0.0
    bytes: float = 0.0
    compiled: bool = False

    def __post_init__(self):
        _check_gamma(self.gamma)
        if not 1 <= self.active <= self.batch_bucket:
            raise ValueError(f"StepRecord needs 1 <= active <= batch_bucket, got {self.active}, {self.batch_bucket}")
        if not (self.wall_s >= 0 and self.mean_context >= 0 and self.emitted >= 0):
            raise ValueError(f"StepRecord wall_s, mean_context and emitted must be >= 0, got "
                             f"{self.wall_s}, {self.mean_context}, {self.emitted}")
        acc, reach = list(self.accepted_per_position), list(self.rows_reaching_position)
        if len(acc) != self.gamma or len(reach) != self.gamma:
            raise ValueError(f"StepRecord with γ={self.gamma} needs {self.gamma} accepted / reaching counts, got "
                             f"{len(acc)} / {len(reach)}")
        if any(not 0 <= a <= r <= self.active for a, r in zip(acc, reach)):
            raise ValueError(f"StepRecord needs 0 <= accepted <= reaching <= active per position, got {acc}, {reach}")
        self.accepted_per_position, self.rows_reaching_position = acc, reach
        if self.drafted is None:
            self.drafted = self.gamma * reach[0] if self.gamma else 0

    @property
    def tau(self) -> float | None:
        """Tokens emitted per live row in this step (None for a plain step)."""
        return self.emitted / self.active if self.gamma else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepRecord":
        """Also accepts the engine's short keys "accepted" / "reached"; ignores unknown keys."""
        d = dict(d)
        d.setdefault("accepted_per_position", d.pop("accepted", []))
        d.setdefault("rows_reaching_position", d.pop("reached", []))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def as_step_record(record) -> StepRecord:
    return record if isinstance(record, StepRecord) else StepRecord.from_dict(record)


@dataclass(frozen=True)
class Timing:
    """One measured unit for fitting: kind "ar" (γ = 0), "draft" (γ draft steps), "verify" (γ+1 positions)
    or "sd" (γ drafts + verify); batch = rows computed (the bucket); context = mean context length;
    tau = tokens per row per step where measured (sd only, for `validate`)."""

    kind: str
    batch: int
    context: float
    gamma: int
    wall_s: float
    tau: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"timing kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "ar") != (_check_gamma(self.gamma) == 0):
            raise ValueError(f"timing kind {self.kind!r} with γ={self.gamma}: 'ar' needs γ = 0, the others γ >= 1")
        if not (self.batch >= 1 and self.context >= 0 and self.wall_s > 0):
            raise ValueError(f"timing needs batch >= 1, context >= 0, wall_s > 0; got {self.batch}, "
                             f"{self.context}, {self.wall_s}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def as_timing(record) -> Timing:
    """A Timing from a Timing, a StepRecord, or a dict of either."""
    if isinstance(record, Timing):
        return record
    if isinstance(record, Mapping) and "kind" in record:
        return Timing(**record)
    rec = as_step_record(record)
    return Timing("sd" if rec.gamma else "ar", rec.batch_bucket, rec.mean_context, rec.gamma, rec.wall_s, rec.tau)


def save_calibration(path: str | os.PathLike, hw: HardwareConstants, records: Sequence = ()) -> None:
    """Write {"hardware": ..., "records": [...]} as JSON (records: Timings / StepRecords / dicts)."""
    with open(path, "w") as f:
        json.dump({"hardware": hw.to_dict(), "records": [as_timing(r).to_dict() for r in records]}, f, indent=1)


def load_calibration(src) -> tuple[HardwareConstants, list[Timing]]:
    """A calibration from a JSON path, a dict ({"hardware", "records"} or bare constants) or a
    HardwareConstants -> (constants, timing records)."""
    if isinstance(src, HardwareConstants):
        return src, []
    if isinstance(src, (str, os.PathLike)):
        with open(src) as f:
            src = json.load(f)
    if not isinstance(src, Mapping):
        raise ValueError(f"calibration must be a JSON path, a dict or HardwareConstants, got {type(src).__name__}")
    if "hardware" not in src:
        return HardwareConstants.from_dict(src), []
    return HardwareConstants.from_dict(src["hardware"]), [as_timing(r) for r in src.get("records", [])]


# ---------------------------------------------------------------------------------------------------------
# Fitting and validation
# ---------------------------------------------------------------------------------------------------------
_MIN_OVERHEAD = 1e-9  # log-parameterized fit: an overhead starting at 0 starts here instead


def _arrays(timings: Sequence[Timing]):
    return (np.array([t.kind for t in timings]), np.array([t.batch for t in timings], float),
            np.array([t.context for t in timings], float), np.array([t.gamma for t in timings], float),
            np.array([t.wall_s for t in timings], float))


def fit(records: Sequence, costs: ModelCosts, init: HardwareConstants | None = None, *,
        prior_weight: float = 1e-3, robust_scale: float = 0.1, start: HardwareConstants | None = None,
        max_nfev: int | None = None) -> HardwareConstants:
    """Fit the nine constants to measured records by robust least squares on log-time.

    Parameters are fitted as log-ratios u to `init` (default: this platform's defaults), which keeps them
    positive and well scaled; a weak prior `prior_weight·u` keeps directions the records do not constrain
    (e.g. F when nothing was compute-bound) at `init`. soft-L1 loss with scale `robust_scale` (in log units)
    damps outliers (a compile, a GC pause). `start` (e.g. the previous fit) warm-starts the search and
    `max_nfev` bounds it (online refits); by default it starts from `init` and runs to tight tolerances."""
    from scipy.optimize import least_squares

    timings = [as_timing(r) for r in records]
    if not timings:
        raise ValueError("fit needs at least one timing record")
    init = init or defaults_for(current_platform())
    kind, b, s, g, wall = _arrays(timings)
    log_wall = np.log(wall)
    theta0 = np.array([max(getattr(init, f), _MIN_OVERHEAD) for f in FIT_FIELDS])

    def hw_of(u):
        return dataclasses.replace(init, **dict(zip(FIT_FIELDS, (theta0 * np.exp(u)).tolist())))

    def residuals(u):
        pred = predict_wall(hw_of(u), costs, kind, b, s, g)
        return np.concatenate([np.log(pred) - log_wall, prior_weight * u])

    # Start from `init` with every time constant scaled by one factor so that the median residual is 0:
    # this rescues a start that is off by a large factor (e.g. another GPU's defaults) from local minima.
    if start is None:
        shift = float(np.median(residuals(np.zeros(len(FIT_FIELDS)))[: len(timings)]))
        u0 = np.array([shift if f in ("bw", "flops") else 0.0 if f == "eta_d" else -shift for f in FIT_FIELDS])
    else:
        u0 = np.clip(np.log([max(getattr(start, f), _MIN_OVERHEAD) for f in FIT_FIELDS] / theta0), -30.0, 30.0)
    tol = 1e-10 if max_nfev is None else 1e-6
    sol = least_squares(residuals, u0, method="trf", loss="soft_l1", f_scale=robust_scale, bounds=(-30.0, 30.0),
                        xtol=tol, ftol=tol, gtol=tol, max_nfev=max_nfev)
    return hw_of(sol.x)


def validate(records: Sequence, hw: HardwareConstants, costs: ModelCosts, tau: float | None = None) -> dict:
    """How well `hw` predicts `records`.

    mape[kind]: mean absolute percentage error of the predicted wall time, per kind.
    decision_accuracy: over groups (batch, context within a quarter octave, γ) holding both "ar" and "sd"
    timings, the fraction where predicted and measured speedup (τ · mean ar time / mean sd time) agree on
    the sign of speedup − 1 (None without such groups). τ: the group's measured τ if its records carry one,
    else `tau`, else γ (the cold-start value)."""
    timings = [as_timing(r) for r in records]
    if not timings:
        raise ValueError("validate needs at least one timing record")
    kind, b, s, g, wall = _arrays(timings)
    ape = np.abs(predict_wall(hw, costs, kind, b, s, g) / wall - 1)
    mape = {k: float(ape[kind == k].mean()) for k in KINDS if (kind == k).any()}
    count = {k: int((kind == k).sum()) for k in mape}

    groups: dict[tuple, list[Timing]] = {}
    for t in timings:
        if t.kind in ("ar", "sd"):
            groups.setdefault((t.batch, round(4 * math.log2(max(t.context, 1.0))), t.gamma), []).append(t)
    decisions = []
    for (bb, octave, gg), sd in groups.items():
        ar = groups.get((bb, octave, 0))
        if gg == 0 or not ar:
            continue
        taus = [t.tau for t in sd if t.tau is not None]
        tau_g = float(np.mean(taus)) if taus else (tau if tau is not None else float(gg))
        context = float(np.mean([t.context for t in ar + sd]))
        measured = tau_g * np.mean([t.wall_s for t in ar]) / np.mean([t.wall_s for t in sd])
        predicted = speedup(hw, costs, bb, context, gg, tau_g)
        decisions.append(dict(batch=bb, context=context, gamma=gg, tau=tau_g, measured_speedup=float(measured),
                              predicted_speedup=predicted, agree=bool((measured >= 1) == (predicted >= 1))))
    accuracy = float(np.mean([d["agree"] for d in decisions])) if decisions else None
    return dict(mape=mape, count=count, decision_accuracy=accuracy, decisions=decisions)


# ---------------------------------------------------------------------------------------------------------
# Online calibration
# ---------------------------------------------------------------------------------------------------------
class OnlineCalibrator:
    """Hardware constants refitted from the engine's own step timings.

    Starts from `hw` (and optional seed `records`, e.g. from a calibration JSON); `hw` is also the fit's prior.
    Records are kept per cell (kind, batch bucket, γ), the newest `per_cell` of each, so memory and fit
    time stay bounded while every measured cell keeps a voice. A step that compiled (StepRecord.compiled) is
    no sample. `maybe_refit` refits once `refit_every` new records have arrived (0: never); policies call it
    between rollouts, so no least-squares fit ever stalls the decode loop; each refit after the first starts
    at the last fit and stops after `max_nfev` evaluations (a few hundredths of a second per rollout).

    Exploration: `explore` proposes, with probability `explore_eps` per step, the cheapest (predicted) γ whose
    cell at this bucket has < `min_samples` records — but only while the measured time of exploring steps,
    this one included at its predicted cost, stays within `explore_budget` of all measured step time. Where
    speculation cannot pay (a CPU) exploring costs at most that fraction; deterministic given `seed`."""

    def __init__(self, costs: ModelCosts, hw: HardwareConstants, records: Sequence = (), *, refit_every: int = 32,
                 per_cell: int = 16, explore_eps: float = 0.05, min_samples: int = 2, explore_budget: float = 0.02,
                 max_nfev: int = 100, seed: int = 0):
        if (refit_every < 0 or per_cell < 1 or not 0 <= explore_eps <= 1 or min_samples < 0
                or not 0 <= explore_budget <= 1 or max_nfev < 1):
            raise ValueError(f"OnlineCalibrator needs refit_every >= 0, per_cell >= 1, 0 <= explore_eps <= 1, "
                             f"min_samples >= 0, 0 <= explore_budget <= 1, max_nfev >= 1; got {refit_every}, "
                             f"{per_cell}, {explore_eps}, {min_samples}, {explore_budget}, {max_nfev}")
        self.costs, self.prior, self.hw = costs, hw, hw
        self.refit_every, self.per_cell, self.max_nfev = refit_every, per_cell, max_nfev
        self.explore_eps, self.min_samples, self.explore_budget = explore_eps, min_samples, explore_budget
        self.rng = np.random.default_rng(seed)
        self.cells: dict[tuple, list[Timing]] = {}
        self._corrections: dict[tuple, float] = {}  # see `correction`
        self.pending = 0  # records since the last refit
        self.total_s = self.explore_s = 0.0  # measured seconds of all steps / of exploring steps
        for r in records:
            self._store(as_timing(r))
        if self.cells:
            self.refit()

    @staticmethod
    def _cell(kind: str, batch: int, gamma: int) -> tuple:
        return (kind, int(batch), int(gamma))

    def _store(self, t: Timing) -> None:
        key = self._cell(t.kind, t.batch, t.gamma)
        cell = self.cells.setdefault(key, [])
        self._corrections.pop(key, None)
        cell.append(t)
        del cell[:-self.per_cell]
        self.pending += 1

    def add(self, record, explored: bool = False) -> None:
        """Take one StepRecord (or Timing) — `explored`: a step `explore` chose."""
        if getattr(record, "compiled", False) or (isinstance(record, Mapping) and record.get("compiled")):
            return
        t = as_timing(record)
        self.total_s += t.wall_s
        self.explore_s += t.wall_s if explored else 0.0
        self._store(t)

    def maybe_refit(self) -> bool:
        """Refit if `refit_every` records have arrived since the last fit; returns whether it did."""
        if self.refit_every and self.pending >= self.refit_every:
            self.refit()
            return True
        return False

    @property
    def records(self) -> list[Timing]:
        return [t for cell in self.cells.values() for t in cell]

    def refit(self) -> HardwareConstants:
        """Refit the constants (warm-started at the current fit, bounded: it runs between rollouts)."""
        if self.records:
            start = None if self.hw == self.prior else self.hw  # the first fit starts from the prior, rescaled
            self.hw = fit(self.records, self.costs, self.prior, start=start, max_nfev=self.max_nfev)
            self._corrections.clear()
        self.pending = 0
        return self.hw

    def explore(self, batch_bucket: int, gammas: Sequence[int], cost: Callable[[int], float]) -> int | None:
        """A γ among `gammas` (the policy's own choice left out) to measure at this bucket instead, or None.
        `cost(γ)`: its predicted seconds (the cheapest cold cell goes first)."""
        if self.explore_eps == 0:
            return None
        cold = [g for g in gammas
                if len(self.cells.get(self._cell("sd" if g else "ar", batch_bucket, g), ())) < self.min_samples]
        if not cold or self.rng.random() >= self.explore_eps:
            return None
        g = min(cold, key=cost)
        c = cost(g)
        return int(g) if self.explore_s + c <= self.explore_budget * (self.total_s + c) else None

    def correction(self, kind: str, batch_bucket: int, gamma: int, default: float = 1.0) -> float:
        """Measured over predicted time of a cell (median over its records; `default` without any): a cell the
        model mispredicts is taken at its measured level, the model still supplying how it varies with context."""
        key = self._cell(kind, batch_bucket, gamma)
        if key not in self.cells:
            return default
        if key not in self._corrections:  # cached until the cell gets a record or the constants change
            kinds, b, ctx, g, wall = _arrays(self.cells[key])
            self._corrections[key] = float(np.median(wall / predict_wall(self.hw, self.costs, kinds, b, ctx, g)))
        return self._corrections[key]

    def state_dict(self) -> dict[str, Any]:
        return dict(hw=self.hw.to_dict(), prior=self.prior.to_dict(), pending=self.pending,
                    records=[t.to_dict() for t in self.records], rng=self.rng.bit_generator.state,
                    total_s=self.total_s, explore_s=self.explore_s)

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.hw, self.prior = HardwareConstants.from_dict(d["hw"]), HardwareConstants.from_dict(d["prior"])
        self.cells, self._corrections = {}, {}
        for r in d["records"]:
            self._store(as_timing(r))
        self.pending = int(d["pending"])
        self.rng.bit_generator.state = d["rng"]
        self.total_s, self.explore_s = float(d["total_s"]), float(d["explore_s"])


# ---------------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------------
def _check_ladder(ladder: Sequence[int]) -> tuple[int, ...]:
    ladder = tuple(int(g) for g in ladder)
    if not ladder or ladder[0] < 1 or any(a >= b for a, b in zip(ladder, ladder[1:])):
        raise ValueError(f"the γ ladder must be a non-empty, strictly increasing sequence of γ >= 1, got {ladder}")
    return ladder


def _check_draft_length(draft_length: int) -> int:
    if int(draft_length) != draft_length or draft_length < 1:
        raise ValueError(f"draft_length must be an integer >= 1, got {draft_length}")
    return int(draft_length)


class Policy:
    """Base: the engine protocol, argument checks, and the per-rollout τ bookkeeping.

    τ of a rollout = tokens emitted in its SD steps / live rows summed over those steps (mean tokens a row
    gains per speculative step, bonus / corrected token included). A rollout without SD steps leaves the
    τ history unchanged."""

    mode = ""
    HISTORY = 1000  # rollouts of τ history kept

    def __init__(self, costs: ModelCosts | None = None):
        self.costs = costs
        self.tau_history: list[dict[str, float]] = []  # {"gamma": row-weighted mean γ, "tau": τ} per rollout
        self._reset_rollout()

    def _reset_rollout(self) -> None:
        self._sd_emitted = self._sd_rows = self._sd_gamma_rows = 0

    # -- the engine protocol ------------------------------------------------------------------------
    def gammas(self) -> tuple[int, ...]:
        """Every γ this policy may choose (0 = plain step), for warm-up."""
        raise NotImplementedError

    def start_rollout(self) -> None:
        self._reset_rollout()

    def choose(self, batch_bucket: int, active: int, mean_context: float) -> int:
        """γ for the next step (0 = plain AR step)."""
        if not (int(batch_bucket) == batch_bucket and 1 <= active <= batch_bucket):
            raise ValueError(f"choose needs an integer batch_bucket >= active >= 1, got {batch_bucket}, {active}")
        if not (mean_context >= 0 and math.isfinite(mean_context)):
            raise ValueError(f"choose needs a finite mean_context >= 0, got {mean_context}")
        return self._choose(int(batch_bucket), int(active), float(mean_context))

    def observe(self, record) -> None:
        """Take the engine's report of the step just run (StepRecord or its dict)."""
        rec = as_step_record(record)
        if rec.gamma:
            self._sd_emitted += rec.emitted
            self._sd_rows += rec.active
            self._sd_gamma_rows += rec.gamma * rec.active
        self._observe(rec)

    def end_rollout(self) -> None:
        if self._sd_rows:
            tau = self._sd_emitted / self._sd_rows
            entry = dict(gamma=self._sd_gamma_rows / self._sd_rows, tau=tau)
            self.tau_history = (self.tau_history + [entry])[-self.HISTORY:]
            self._rollout_done(tau)
        self._reset_rollout()

    @property
    def tau(self) -> float | None:
        """τ of the latest rollout that speculated."""
        return self.tau_history[-1]["tau"] if self.tau_history else None

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return dict(mode=self.mode, tau_history=[dict(h) for h in self.tau_history], **self._state())

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        if d.get("mode") != self.mode:
            raise ValueError(f"state of a {d.get('mode')!r} policy cannot load into a {self.mode!r} policy")
        self.tau_history = [dict(gamma=float(h["gamma"]), tau=float(h["tau"])) for h in d["tau_history"]]
        self._load(d)

    # -- hooks for subclasses ------------------------------------------------------------------------
    def _choose(self, batch_bucket: int, active: int, mean_context: float) -> int:
        raise NotImplementedError

    def _observe(self, rec: StepRecord) -> None:
        pass

    def _rollout_done(self, tau: float) -> None:
        pass

    def _state(self) -> dict[str, Any]:
        return {}

    def _load(self, d: Mapping[str, Any]) -> None:
        pass


class ARPolicy(Policy):
    """Plain decoding, always γ = 0."""

    mode = "ar"

    def gammas(self):
        return (0,)

    def _choose(self, batch_bucket, active, mean_context):
        return 0


class SDPolicy(Policy):
    """Always speculate with a fixed γ."""

    mode = "sd"

    def __init__(self, costs: ModelCosts | None = None, draft_length: int = 5):
        super().__init__(costs)
        self.gamma = _check_draft_length(draft_length)

    def gammas(self):
        return (self.gamma,)

    def _choose(self, batch_bucket, active, mean_context):
        return self.gamma


class TogglePolicy(Policy):
    """The paper's roofline toggle: speculate with γ once speedup(B, S, γ, τ) >= 1 + ε, checked every step;
    monotone within a rollout (once on, on until end_rollout). τ from the previous speculating rollout
    (converted through its implied α when it ran another γ); cold start τ₀ = γ."""

    mode = "toggle"

    def __init__(self, costs: ModelCosts, hw: HardwareConstants, draft_length: int = 5, epsilon: float = 0.05):
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        super().__init__(costs)
        self.hw, self.gamma, self.epsilon = hw, _check_draft_length(draft_length), float(epsilon)
        self._on = False

    def gammas(self):
        return (0, self.gamma)

    def tau_for(self, gamma: int) -> float:
        """Predicted τ at γ from the latest speculating rollout (cold start: γ)."""
        if not self.tau_history:
            return float(gamma)
        last = self.tau_history[-1]
        if last["gamma"] == gamma:
            return last["tau"]
        return expected_tau(alpha_from_tau(last["tau"], round(last["gamma"])), gamma)

    def start_rollout(self):
        super().start_rollout()
        self._on = False

    def _choose(self, batch_bucket, active, mean_context):
        if not self._on:
            s = speedup(self.hw, self.costs, batch_bucket, mean_context, self.gamma, self.tau_for(self.gamma))
            self._on = s >= 1 + self.epsilon
        return self.gamma if self._on else 0

    def _state(self):
        return dict(hw=self.hw.to_dict(), gamma=self.gamma)

    def _load(self, d):
        self.hw, self.gamma = HardwareConstants.from_dict(d["hw"]), int(d["gamma"])


class AdaptivePolicy(TogglePolicy):
    """The paper's full method: the toggle plus a γ ladder. After each speculating rollout: τ >= 1 + α_up·γ
    for `patience` consecutive rollouts moves one rung up, τ <= 1 + α_down·γ for `patience` consecutive
    rollouts one rung down; anything between resets both streaks."""

    mode = "adaptive"

    def __init__(self, costs: ModelCosts, hw: HardwareConstants, ladder: Sequence[int] = DEFAULT_LADDER,
                 start: int | None = None, epsilon: float = 0.05, alpha_up: float = 0.94, alpha_down: float = 0.85,
                 patience: int = 2):
        self.ladder = _check_ladder(ladder)
        if start is not None and start not in self.ladder:
            raise ValueError(f"start γ {start} is not on the ladder {self.ladder}")
        if not (0 < alpha_down <= alpha_up <= 1 and patience >= 1):
            raise ValueError(f"need 0 < alpha_down <= alpha_up <= 1 and patience >= 1, got {alpha_down}, "
                             f"{alpha_up}, {patience}")
        self.rung = 0 if start is None else self.ladder.index(start)
        self.alpha_up, self.alpha_down, self.patience = alpha_up, alpha_down, patience
        self.up_streak = self.down_streak = 0
        super().__init__(costs, hw, self.ladder[self.rung], epsilon)

    def gammas(self):
        return (0, *self.ladder)

    def _rollout_done(self, tau):
        g = self.ladder[self.rung]
        high, low = tau >= 1 + self.alpha_up * g, tau <= 1 + self.alpha_down * g
        self.up_streak, self.down_streak = (self.up_streak + 1) * high, (self.down_streak + 1) * low
        if self.up_streak >= self.patience and self.rung + 1 < len(self.ladder):
            self.rung += 1
        elif self.down_streak >= self.patience and self.rung > 0:
            self.rung -= 1
        else:
            return
        self.up_streak = self.down_streak = 0
        self.gamma = self.ladder[self.rung]

    def _state(self):
        return dict(super()._state(), ladder=list(self.ladder), rung=self.rung, up_streak=self.up_streak,
                    down_streak=self.down_streak)

    def _load(self, d):
        super()._load(d)
        self.ladder = _check_ladder(d["ladder"])
        self.rung, self.up_streak, self.down_streak = int(d["rung"]), int(d["up_streak"]), int(d["down_streak"])
        self.gamma = self.ladder[self.rung]


class AutoPolicy(Policy):
    """Ours: every step, γ ∈ {0} ∪ ladder minimizing predicted time per emitted token under online-calibrated
    constants, each (batch bucket, γ) cell's prediction scaled to what that cell measured (a fit from few
    records can be far off for kinds it has hardly seen); speculates only if that beats plain decoding by the
    factor 1 + ε (as the toggle does); may switch off again within a rollout.

    Acceptance per draft position j: (accepted_j + k·p̄) / (reached_j + k), shrunk towards the pooled rate
    p̄ = (Σ accepted + a₀) / (Σ reached + a₀ + b₀) (a Beta(a₀, b₀) prior). Counts decay by `decay` at each
    rollout's end so the estimate follows the policy as training changes it."""

    mode = "auto"

    def __init__(self, costs: ModelCosts, hw: HardwareConstants, ladder: Sequence[int] = DEFAULT_LADDER, *,
                 epsilon: float = 0.05, calibrator: OnlineCalibrator | None = None,
                 prior: tuple[float, float] = (9.0, 1.0), prior_strength: float = 10.0, decay: float = 0.5,
                 seed: int = 0):
        if not (epsilon >= 0 and min(prior) > 0 and prior_strength > 0 and 0 <= decay <= 1):
            raise ValueError(f"need epsilon >= 0, prior > 0, prior_strength > 0, 0 <= decay <= 1; got {epsilon}, "
                             f"{prior}, {prior_strength}, {decay}")
        super().__init__(costs)
        self.ladder = _check_ladder(ladder)
        self.epsilon, self.prior, self.prior_strength, self.decay = float(epsilon), tuple(prior), prior_strength, decay
        self.calibrator = calibrator or OnlineCalibrator(costs, hw, seed=seed)
        self.accepted = np.zeros(self.ladder[-1])
        self.reached = np.zeros(self.ladder[-1])
        self._exploring = False  # the step being run was the calibrator's choice

    @property
    def hw(self) -> HardwareConstants:
        return self.calibrator.hw

    def gammas(self):
        return (0, *self.ladder)

    def acceptance_rates(self) -> np.ndarray:
        a0, b0 = self.prior
        pooled = (self.accepted.sum() + a0) / (self.reached.sum() + a0 + b0)
        return (self.accepted + self.prior_strength * pooled) / (self.reached + self.prior_strength)

    def predicted_time_per_token(self, batch_bucket: int, active: int, mean_context: float) -> dict[int, float]:
        """Seconds per emitted token of each γ: the cost model, corrected by what its cell measured."""
        rates = self.acceptance_rates()
        return {g: time_per_token(self.hw, self.costs, batch_bucket, mean_context, g,
                                  expected_tau_positions(rates[:g]), active) * self._scale(batch_bucket, g)
                for g in self.gammas()}

    def _scale(self, batch_bucket: int, gamma: int) -> float:
        """A cell's correction. A speculative cell not measured yet takes the largest correction measured at its
        bucket, plain or speculative (a machine slower than the constants say is slower at both, and a drafter
        slower than modelled at one γ is slower at the next)."""
        cal = self.calibrator
        plain = cal.correction("ar", batch_bucket, 0)
        if gamma == 0:
            return plain
        measured = [cal.correction("sd", batch_bucket, g, default=0.0) for g in self.ladder]
        return cal.correction("sd", batch_bucket, gamma, default=max(plain, *measured))

    def _choose(self, batch_bucket, active, mean_context):
        t = self.predicted_time_per_token(batch_bucket, active, mean_context)
        best = min(self.ladder, key=t.get)
        choice = best if t[0] >= (1 + self.epsilon) * t[best] else 0
        # The budget is charged a pessimistic cost: an SD step no cheaper than γ + 1 plain steps (constants fitted
        # to plain steps alone can badly underrate a drafter, e.g. one dequantized on the fly on a CPU).
        t = lambda g: step_time(self.hw, self.costs, batch_bucket, mean_context, g) * self._scale(batch_bucket, g)
        cost = lambda g: max(t(g), (g + 1) * t(0))
        g = self.calibrator.explore(batch_bucket, [g for g in self.gammas() if g != choice], cost)
        self._exploring = g is not None
        return choice if g is None else g

    def _observe(self, rec):
        n = min(rec.gamma, len(self.accepted))
        self.accepted[:n] += rec.accepted_per_position[:n]
        self.reached[:n] += rec.rows_reaching_position[:n]
        if rec.wall_s > 0:  # a fit needs positive times
            self.calibrator.add(rec, explored=self._exploring)
        self._exploring = False

    def end_rollout(self):
        super().end_rollout()
        self.calibrator.maybe_refit()
        self.accepted *= self.decay
        self.reached *= self.decay

    def _state(self):
        return dict(ladder=list(self.ladder), accepted=self.accepted.tolist(), reached=self.reached.tolist(),
                    calibrator=self.calibrator.state_dict())

    def _load(self, d):
        self.ladder = _check_ladder(d["ladder"])
        self.accepted, self.reached = np.array(d["accepted"], float), np.array(d["reached"], float)
        self.calibrator.load_state_dict(d["calibrator"])


def make_policy(mode: str, costs: ModelCosts, draft_length: int = 5, ladder: Sequence[int] = DEFAULT_LADDER,
                calibration=None, hw: HardwareConstants | None = None, seed: int = 0) -> Policy:
    """A policy by mode name. Constants: `hw`, else `calibration` (JSON path / dict / HardwareConstants),
    else this platform's defaults. `adaptive` starts at `draft_length` when it is on the ladder, else at the
    bottom rung; `auto` seeds its online calibrator with the calibration's records too."""
    check_choice("mode", mode, MODES)
    draft_length = _check_draft_length(draft_length)
    ladder = _check_ladder(ladder)
    seed_hw, seed_records = load_calibration(calibration) if calibration is not None else (None, [])
    hw = hw or seed_hw or (defaults_for(current_platform()) if mode in ("toggle", "adaptive", "auto") else None)
    if mode == "ar":
        return ARPolicy(costs)
    if mode == "sd":
        return SDPolicy(costs, draft_length)
    if mode == "toggle":
        return TogglePolicy(costs, hw, draft_length)
    if mode == "adaptive":
        return AdaptivePolicy(costs, hw, ladder, start=draft_length if draft_length in ladder else None)
    return AutoPolicy(costs, hw, ladder, calibrator=OnlineCalibrator(costs, hw, seed_records, seed=seed))
