"""Calibration files: fit the controller's constants to a sweep (`er-jax calibrate`), write and read them with
the records and the model's costs (so validate / predict / plot run from the JSON alone), and predict one
operating point (`er-jax predict`)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from er_jax import controller

PRIOR_WEIGHT = 0.03


def calibrate(rows: Sequence[dict], costs: controller.ModelCosts, init: controller.HardwareConstants | None = None,
              prior_weight: float = PRIOR_WEIGHT) -> controller.HardwareConstants:
    """controller.fit on sweep rows, starting from (and pulled towards) this platform's defaults.

    A sweep of one model cannot tell the weight-read time W/BW from the fixed per-step overhead o (both are
    constants of the model), nor F from the per-row costs when little is compute-bound: the least-squares
    valley is flat along those directions, and with controller.fit's default prior weight (1e-3) the optimizer
    stops anywhere in it (on our CPU sweep: BW = 157 GB/s, o_T = 80 ms, η_D = 186 — same in-sample error, but
    meaningless constants). A prior weight of 0.03 (log units) picks the point of the valley nearest the
    defaults (BW 5.3 GB/s, η_D 7.4), costing a few points of in-sample MAPE."""
    return controller.fit(rows, costs, init or controller.defaults_for(controller.current_platform()),
                          prior_weight=prior_weight)


def save(path: str, hw: controller.HardwareConstants, rows: Sequence[dict], costs: controller.ModelCosts,
         meta: dict | None = None) -> None:
    """controller.save_calibration plus a "model" entry: the costs, so later commands need no model."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    controller.save_calibration(path, hw, rows)
    with open(path) as f:
        payload = json.load(f)
    payload["model"] = dict(costs=dataclasses.asdict(costs), **(meta or {}))
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def load(path: str) -> tuple[controller.HardwareConstants, list[controller.Timing], controller.ModelCosts | None]:
    if not os.path.isfile(path):
        raise ValueError(f"no calibration at {path!r}; write one with `er-jax calibrate --out {path}`")
    hw, records = controller.load_calibration(path)
    with open(path) as f:
        model = json.load(f).get("model") or {}
    costs = controller.ModelCosts(**model["costs"]) if "costs" in model else None
    return hw, records, costs


def load_or_defaults(path: str | None):
    """(constants, records, costs) of a calibration file, or this platform's default constants (no records,
    no costs) when no file is given."""
    if path:
        return load(path)
    return controller.defaults_for(controller.current_platform()), [], None


def predict_point(hw, costs, batch: float, context: float, gamma: int, tau: float | None = None,
                  epsilon: float = 0.05) -> dict:
    """Predicted T_T, T_D, T_V(γ), SD step time, speedup and the toggle's decision at one operating point."""
    if gamma < 1:
        raise ValueError(f"--gamma must be >= 1, got {gamma}")
    tau = float(gamma) if tau is None else float(tau)
    if not 1 <= tau <= gamma + 1:
        raise ValueError(f"τ must be in [1, γ + 1] = [1, {gamma + 1}], got {tau}")
    t_t, t_d, t_v = (float(x) for x in controller.component_times(hw, costs, batch, context, gamma))
    s = controller.speedup(hw, costs, batch, context, gamma, tau)
    sd_step = gamma * t_d + t_v
    return dict(batch=batch, context=context, gamma=gamma, tau=tau, T_T=t_t, T_D=t_d, T_V=t_v, sd_step=sd_step,
                speedup=s, breakeven_tau=(1 + epsilon) * sd_step / t_t, epsilon=epsilon,
                decision="SD on" if s >= 1 + epsilon else "SD off (plain decoding)")
