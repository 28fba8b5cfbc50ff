"""The decode policies (ar / sd / toggle / adaptive / auto) that pick γ for every engine step.

Engine protocol: `policy.start_rollout()`; per step `γ = policy.choose(batch_bucket, active, mean_context)`,
run it, `policy.observe(StepRecord(...))`; finally `policy.end_rollout()`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from er_jax.config import MODES, check_choice
from er_jax.controller.costs import (DEFAULT_LADDER, HardwareConstants, ModelCosts, alpha_from_tau, current_platform,
                                     defaults_for, expected_tau, expected_tau_positions, speedup, step_time,
                                     time_per_token)
from er_jax.controller.records import OnlineCalibrator, StepRecord, as_step_record, load_calibration


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
                calibration=None, hw: HardwareConstants | None = None, seed: int = 0,
                backend: str | None = None) -> Policy:
    """A policy by mode name. Constants: `hw`, else `calibration` (JSON path / dict / HardwareConstants),
    else this platform's defaults for `backend` (the op backend that runs; default: the platform's).
    `adaptive` starts at `draft_length` when it is on the ladder, else at the
    bottom rung; `auto` seeds its online calibrator with the calibration's records too."""
    check_choice("mode", mode, MODES)
    draft_length = _check_draft_length(draft_length)
    ladder = _check_ladder(ladder)
    seed_hw, seed_records = load_calibration(calibration) if calibration is not None else (None, [])
    if not (hw or seed_hw) and mode in ("toggle", "adaptive", "auto"):
        hw = defaults_for(current_platform(), backend)
    hw = hw or seed_hw
    if mode == "ar":
        return ARPolicy(costs)
    if mode == "sd":
        return SDPolicy(costs, draft_length)
    if mode == "toggle":
        return TogglePolicy(costs, hw, draft_length)
    if mode == "adaptive":
        return AdaptivePolicy(costs, hw, ladder, start=draft_length if draft_length in ladder else None)
    return AutoPolicy(costs, hw, ladder, calibrator=OnlineCalibrator(costs, hw, seed_records, seed=seed))
