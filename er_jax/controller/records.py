"""Step records and timings, calibration files, fitting the cost model's constants, and online calibration."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from er_jax.controller.costs import (FIT_FIELDS, KINDS, HardwareConstants, ModelCosts, _check_gamma, current_platform,
                                     defaults_for, predict_wall, speedup)


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

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved (0 when the engine had no costs to count them)."""
        return self.flops / self.bytes if self.bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), intensity=self.intensity)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepRecord":
        """The inverse of `to_dict` (a trace line read back); derived keys such as "intensity" are ignored."""
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
