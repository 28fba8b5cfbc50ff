"""Host-side controller: model constants and the roofline cost model (`costs`), step records, fitting and online
calibration (`records`), and the decode policies (ar / sd / toggle / adaptive / auto) that pick γ for every engine
step (`policies`). Pure Python + numpy; nothing here is traced by jax. Everything is re-exported here, so
`from er_jax.controller import X` works for any of them.

Engine protocol: `policy.start_rollout()`; per step `γ = policy.choose(batch_bucket, active, mean_context)`,
run it, `policy.observe(StepRecord(...))`; finally `policy.end_rollout()`.
"""
from er_jax.controller.costs import (DEFAULT_LADDER, FIT_FIELDS, ITEMSIZE, KINDS, HardwareConstants, ModelCosts,
                                     alpha_from_tau, component_times, current_platform, defaults_for, expected_tau,
                                     expected_tau_positions, predict_wall, quantized_bytes, speedup, step_intensity,
                                     step_time, time_per_token)
from er_jax.controller.policies import (AdaptivePolicy, ARPolicy, AutoPolicy, Policy, SDPolicy, TogglePolicy,
                                        make_policy)
from er_jax.controller.records import (OnlineCalibrator, StepRecord, Timing, as_step_record, as_timing, fit,
                                       load_calibration, save_calibration, validate)

__all__ = ["DEFAULT_LADDER", "FIT_FIELDS", "ITEMSIZE", "KINDS", "ARPolicy", "AdaptivePolicy", "AutoPolicy",
           "HardwareConstants", "ModelCosts", "OnlineCalibrator", "Policy", "SDPolicy", "StepRecord", "Timing",
           "TogglePolicy", "alpha_from_tau", "as_step_record", "as_timing", "component_times", "current_platform",
           "defaults_for", "expected_tau", "expected_tau_positions", "fit", "load_calibration", "make_policy",
           "predict_wall", "quantized_bytes", "save_calibration", "speedup", "step_intensity", "step_time",
           "time_per_token", "validate"]
