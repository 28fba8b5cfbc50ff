"""The controller: model constants, cost model, fitting, online calibration and the five policies, driven
by hand-set constants (round numbers) and synthetic acceptance streams. Host-side only, fast."""
import dataclasses
import itertools
import json
import time

import numpy as np
import pytest

from er_jax import controller as ctl
from er_jax.controller import (AdaptivePolicy, AutoPolicy, HardwareConstants, ModelCosts, OnlineCalibrator,
                               StepRecord, Timing, TogglePolicy)
from tests.helpers import tiny_config

# Round numbers. With context S = 0 and no overheads:
#   M_T = 1e9/1e12 = 1 ms,  M_D = 3e8/1e12 = 0.3 ms,  C = B·2e9/1e14 = 0.02·B ms
#   T_T = max(1, 0.02B) ms,  T_D = max(0.3, 0.02B) ms,  T_V(γ) = max(1, (γ+1)·0.02B) ms
COSTS = ModelCosts(target_bytes=1e9, drafter_bytes=3e8, kv_bytes_per_token=1e5, flops_dense=2e9, flops_attn=1e5)
HW = HardwareConstants(bw=1e12, flops=1e14)


def sd_record(gamma, active, rates=None, emitted=None, step=0, wall_s=1e-3, bucket=None, context=0.0):
    """A speculative step's report: per-position counts follow `rates` (default: all accepted)."""
    rates = [1.0] * gamma if rates is None else rates
    reached, accepted, n = [], [], active
    for a in rates:
        reached.append(n)
        n = int(round(n * a))
        accepted.append(n)
    emitted = active + sum(accepted) if emitted is None else emitted
    return StepRecord(step=step, wall_s=wall_s, batch_bucket=bucket or active, active=active, mean_context=context,
                      gamma=gamma, emitted=emitted, accepted_per_position=accepted, rows_reaching_position=reached)


def run_rollout(policy, tau, batch=1, steps=3, rows=100):
    """A rollout at `batch` rows whose speculative steps each emit τ tokens per row (over `rows` rows)."""
    policy.start_rollout()
    for i in range(steps):
        g = policy.choose(batch, batch, 0.0)
        if g:
            policy.observe(sd_record(g, rows, emitted=round(tau * rows), step=i, bucket=rows))
        else:
            policy.observe(StepRecord(i, 1e-3, rows, rows, 0.0, 0, rows))
    policy.end_rollout()


# -- model constants ---------------------------------------------------------------------------------------
def test_model_costs_from_config_by_hand():
    cfg = tiny_config(qkv_bias=True)  # V 64, d 64, f 96, L 2, H 4, KV 2, hd 16, f32
    c = ModelCosts.from_config(cfg, "int4")
    proj = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96)  # q, k, v, o, gate, up, down over 2 layers
    shared = 64 * 64 + 5 * 64 + 2 * (64 + 2 * 32)  # LM head, 5 norms, biases
    assert c.target_bytes == 4 * (proj + shared)
    assert c.kv_bytes_per_token == 2 * 2 * 32 * 4
    assert c.flops_dense == 2 * (proj + 64 * 64)
    assert c.flops_attn == 4 * 2 * 4 * 16
    # int4: K = 64 pads to one group of 128: 64 B/column codes + 5 B/column scale and zero; K = 96 likewise.
    per_layer = {"int4": 3 * 64 * (64 + 5) + 2 * 32 * (64 + 5) + 2 * 96 * (64 + 5),  # q, o, down; k, v; gate, up
                 "int8": (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96) + 4 * (64 + 2 * 32 + 64 + 2 * 96 + 64)}
    for scheme in ("int4", "int8"):
        assert ModelCosts.from_config(cfg, scheme).drafter_bytes == 2 * per_layer[scheme] + 4 * shared


def test_drafter_bytes_match_quant_storage():
    import jax
    from er_jax.model import init_weights
    from er_jax.quant import derive_drafter, projection_bytes
    cfg = tiny_config(hidden_size=192, intermediate_size=160, num_layers=1)  # K not a multiple of 128
    w = jax.eval_shape(lambda: init_weights(cfg, jax.random.key(0)))  # shapes only: nothing compiles
    for scheme in ("int4", "int8"):
        c = ModelCosts.from_config(cfg, scheme)
        drafter = jax.eval_shape(lambda w: derive_drafter(w, scheme), w)
        assert c.target_bytes - c.drafter_bytes == projection_bytes(w) - projection_bytes(drafter)


# -- cost model --------------------------------------------------------------------------------------------
def test_expected_tau():
    assert ctl.expected_tau(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert ctl.expected_tau(1.0, 7) == 8
    assert ctl.expected_tau(0.0, 7) == 1
    assert ctl.expected_tau_positions([1.0, 1.0, 0.5]) == pytest.approx(3.5)
    assert ctl.expected_tau_positions([0.8] * 5) == pytest.approx(ctl.expected_tau(0.8, 5))
    assert ctl.alpha_from_tau(ctl.expected_tau(0.9, 5), 5) == pytest.approx(0.9, abs=1e-9)
    with pytest.raises(ValueError):
        ctl.expected_tau(0.5, -1)
    with pytest.raises(ValueError):
        ctl.expected_tau(1.5, 3)


def test_cost_model_by_hand():
    hw = HardwareConstants(bw=1e12, flops=1e14, eta_d=2.0, c_t=1e-6, c_d=2e-6, c_v=3e-6, o_t=1e-4, o_d=2e-4, o_v=3e-4)
    # B = 10, S = 1000: KV 1e5·1e4 = 1e9 B; M_T = 2 ms, M_D = (6e8 + 1e9)/1e12 = 1.6 ms;
    # C = 10·(2e9 + 1e8)/1e14 = 0.21 ms
    t_t, t_d, t_v = ctl.component_times(hw, COSTS, 10, 1000, 15)
    assert t_t == pytest.approx(2e-3 + 1e-5 + 1e-4)
    assert t_d == pytest.approx(1.6e-3 + 2e-5 + 2e-4)
    assert t_v == pytest.approx(16 * 0.21e-3 + 3e-5 + 3e-4)  # (γ+1)·C = 3.36 ms > M_T
    assert ctl.step_time(hw, COSTS, 10, 1000, 15) == pytest.approx(15 * t_d + t_v)
    assert ctl.speedup(hw, COSTS, 10, 1000, 15, 12.0) == pytest.approx(12 * t_t / (15 * t_d + t_v))
    assert ctl.time_per_token(hw, COSTS, 16, 1000, 15, 12.0, active=10) == pytest.approx(
        ctl.step_time(hw, COSTS, 16, 1000, 15) / 120)
    assert ctl.time_per_token(hw, COSTS, 10, 1000, 0, tau=5.0) == pytest.approx(t_t / 10)  # τ ignored for γ = 0
    flops, nbytes = ctl.step_intensity(COSTS, 10, 1000, 3)
    assert flops == pytest.approx((3 + 4) * 10 * (2e9 + 1e8))
    assert nbytes == pytest.approx(1e9 + 1e9 + 3 * (3e8 + 1e9))
    assert ctl.step_intensity(COSTS, 10, 1000, 3, drafter=False) == pytest.approx((4 * 10 * 2.1e9, 2e9))
    np.testing.assert_allclose(ctl.predict_wall(hw, COSTS, ["ar", "draft", "verify", "sd"], 10, 1000, [0, 15, 15, 15]),
                               [t_t, 15 * t_d, t_v, 15 * t_d + t_v])


# -- toggle --------------------------------------------------------------------------------------------------
def test_toggle_switches_on_where_speedup_reaches_1_05():
    # γ = 4, cold start τ₀ = 4. Speedup = 4·T_T / (4·T_D + T_V(4)), T_T = 1 ms for B <= 50:
    #   B <= 10:  4·0.3 + 1 = 2.2 ms                           -> 1.82
    #   B <= 15:  1.2 + 0.1·B ms  (T_V = 5·0.02B)               -> >= 1.47
    #   B >  15:  4·0.02B + 0.1B = 0.18·B ms -> 4/(0.18B) >= 1.05 iff B <= 21.16
    # so SD is on for B <= 21 (B = 21: 1.058) and off for B >= 22 (1.010).
    p = TogglePolicy(COSTS, HW, draft_length=4)
    assert p.gammas() == (0, 4)
    p.start_rollout()
    decisions = {b: p.choose(b, b, 0.0) for b in range(64, 0, -1)}  # shrinking active batch
    assert [b for b, g in decisions.items() if g] == list(range(21, 0, -1))
    # Monotone: once on it stays on, even if the batch grows back.
    assert p.choose(64, 64, 0.0) == 4
    p.end_rollout()
    p.start_rollout()
    assert p.choose(22, 22, 0.0) == 0 and p.choose(21, 21, 0.0) == 4


def test_toggle_uses_previous_rollouts_tau():
    p = TogglePolicy(COSTS, HW, draft_length=4)
    run_rollout(p, tau=2.0)  # B = 1: on at cold start, then measures τ = 2
    assert p.tau == 2.0
    # τ = 2: best speedup (B <= 10) is 2·1/2.2 < 1, so it never turns on ...
    p.start_rollout()
    assert all(p.choose(b, b, 0.0) == 0 for b in range(64, 0, -1))
    p.end_rollout()  # ... and a rollout without SD steps keeps the previous τ
    assert p.tau == 2.0 and len(p.tau_history) == 1


# -- adaptive (ladder) -------------------------------------------------------------------------------------------
def test_ladder_climbs_after_two_high_rollouts_and_steps_down_after_two_low():
    p = AdaptivePolicy(COSTS, HW)
    assert p.gammas() == (0, 5, 7, 9, 11) and p.gamma == 5
    run_rollout(p, tau=5.8)  # >= 1 + 0.94·5 = 5.7
    assert p.gamma == 5  # one high rollout is not enough
    run_rollout(p, tau=5.8)
    assert p.gamma == 7
    p.start_rollout()
    assert p.choose(1, 1, 0.0) == 7  # the toggle speculates with the new rung
    p.end_rollout()
    run_rollout(p, tau=7.6)  # >= 1 + 0.94·7 = 7.58: high
    run_rollout(p, tau=7.2)  # between 6.95 and 7.58: resets both streaks
    run_rollout(p, tau=7.6)
    assert p.gamma == 7
    run_rollout(p, tau=6.9)  # <= 1 + 0.85·7 = 6.95: low
    assert p.gamma == 7
    p.start_rollout()  # a rollout without SD steps neither counts nor resets
    assert p.choose(64, 64, 0.0) == 0
    p.end_rollout()
    run_rollout(p, tau=6.9)
    assert p.gamma == 5
    run_rollout(p, tau=4.0)  # low (<= 5.25), still speculating (speedup 4/2.5)
    run_rollout(p, tau=4.0)
    assert p.gamma == 5 and p.down_streak == 2  # bottom rung


def test_ladder_tops_out_and_converts_tau_across_rungs():
    p = AdaptivePolicy(COSTS, HW, start=9)
    for _ in range(4):
        run_rollout(p, tau=11.9)
    assert p.gamma == 11
    # τ measured at γ = 9 predicts τ at γ = 11 through the implied α.
    p2 = AdaptivePolicy(COSTS, HW, start=9)
    run_rollout(p2, tau=ctl.expected_tau(0.9, 9), rows=10**9)
    assert p2.tau_for(11) == pytest.approx(ctl.expected_tau(0.9, 11))


# -- auto ----------------------------------------------------------------------------------------------------
def quiet_auto(**kw):
    """An auto policy with a fixed cost model: no exploration, no refits."""
    return AutoPolicy(COSTS, HW, calibrator=OnlineCalibrator(COSTS, HW, refit_every=0, explore_eps=0.0), **kw)


def feed_acceptance(p, rates, rows=10**6):
    p.observe(sd_record(len(rates), rows, rates))  # so many rows that the prior no longer matters


def test_auto_picks_the_argmin_gamma():
    # B = 1, S = 0: memory-bound, SD step = 0.3·γ + 1 ms, AR 1 ms per token.
    p = quiet_auto()
    feed_acceptance(p, [0.9] * 5 + [0.3] * 6)
    np.testing.assert_allclose(p.acceptance_rates(), [0.9] * 5 + [0.3] * 6, atol=5e-3)  # few rows reach 11
    # τ(5) = 1 + .9 + .81 + .729 + .6561 + .59049 = 4.686 -> 2.5 ms / 4.686 = 0.534 ms per token
    # τ(7) = 4.686 + .59049·(.3 + .09) = 4.916    -> 3.1 ms / 4.916 = 0.631 ms per token
    t = p.predicted_time_per_token(1, 1, 0.0)
    assert t[5] == pytest.approx(2.5e-3 / 4.68559, rel=1e-4) and t[7] == pytest.approx(3.1e-3 / 4.91588, rel=1e-4)
    assert p.choose(1, 1, 0.0) == 5
    q = quiet_auto()
    feed_acceptance(q, [0.99] * 11)
    # τ(11) = (1 - .99^12)/.01 = 11.36 -> 4.3/11.36 = 0.379 ms; τ(9) = 9.56 -> 3.7/9.56 = 0.387 ms
    assert q.choose(1, 1, 0.0) == 11


def test_auto_goes_plain_when_compute_bound_and_switches_back_off():
    p = quiet_auto()
    feed_acceptance(p, [0.99] * 11)
    p.start_rollout()
    assert p.choose(1, 1, 0.0) == 11
    # B = 1000: C = 20 ms, T_T = 20 ms per 1000 tokens; SD(5) = 5·20 + 6·20 = 220 ms per 1000·5.9 tokens.
    assert p.choose(1000, 1000, 0.0) == 0  # not monotone: off again
    assert p.choose(1, 1, 0.0) == 11


def test_auto_prior_and_decay():
    p = quiet_auto(prior=(9.0, 1.0), prior_strength=10.0, decay=0.5)
    np.testing.assert_allclose(p.acceptance_rates(), 0.9)  # no data: the prior mean
    p.observe(sd_record(2, 10, [0.5, 0.0]))  # position 1: 5/10, position 2: 0/5
    pooled = (5 + 9) / (15 + 10)
    np.testing.assert_allclose(p.acceptance_rates()[:3], [(5 + 10 * pooled) / 20, (0 + 10 * pooled) / 15, pooled])
    p.end_rollout()
    np.testing.assert_allclose(p.accepted[:2], [2.5, 0.0])
    p.observe(sd_record(1, 4, [0.5], wall_s=0.0))  # wall_s = 0: not a timing (e.g. it compiled) ...
    assert p.accepted[0] == 4.5 and ("sd", 4, 1) not in p.calibrator.cells  # ... but its acceptance counts


def test_auto_exploration_is_deterministic_and_covers_cells():
    def picks(seed):
        cal = OnlineCalibrator(COSTS, HW, refit_every=0, explore_eps=0.5, explore_budget=1.0, seed=seed)
        p = AutoPolicy(COSTS, HW, calibrator=cal)
        out = []
        for i in range(200):
            g = p.choose(1000, 1000, 0.0)  # compute-bound: exploitation always says 0
            out.append(g)
            wall = ctl.step_time(HW, COSTS, 1000, 0.0, g)  # as the model predicts
            p.observe(sd_record(g, 1000, step=i, wall_s=wall) if g else StepRecord(i, wall, 1000, 1000, 0.0, 0, 1000))
        return out
    a = picks(0)
    assert a == picks(0) and a != picks(1)
    assert set(a) == {0, 5, 7, 9, 11}
    assert all(g == 0 for g in a[-50:])  # every cell measured (min_samples = 2): done
    assert a.index(11) > a.index(5)  # the cheapest cold cell goes first


def test_auto_exploration_stays_within_its_time_budget():
    """Where speculation never pays (an SD step 6x an AR step), exploring costs at most the budget."""
    cal = OnlineCalibrator(COSTS, HW, refit_every=0, explore_eps=0.5, explore_budget=0.02, min_samples=50)
    p = AutoPolicy(COSTS, HW, calibrator=cal)
    gammas = []
    for i in range(3000):
        g = p.choose(1000, 1000, 0.0)  # compute-bound: exploitation says 0
        gammas.append(g)
        p.observe(sd_record(g, 1000, step=i, wall_s=0.3) if g else StepRecord(i, 0.05, 1000, 1000, 0.0, 0, 1000))
    assert 0 < cal.explore_s <= 0.02 * cal.total_s + 0.3  # at most one step over (its cost was a prediction)
    assert sum(g > 0 for g in gammas) >= 8  # ... and spends it: 2% of ~150 s is ~10 steps of 0.3 s
    compiled = sd_record(5, 1000, step=0, wall_s=9.0)
    compiled.compiled = True
    n, total = len(cal.records), cal.total_s
    p.observe(compiled)  # a step that compiled is no timing sample
    assert len(cal.records) == n and cal.total_s == total


# -- fitting and calibration --------------------------------------------------------------------------------------
TRUE_HW = HardwareConstants(bw=1e12, flops=1e14, eta_d=1.5, c_t=2e-6, c_d=1e-6, c_v=3e-6, o_t=1e-4, o_d=5e-5, o_v=2e-4)


def sweep(hw, kinds=ctl.KINDS):
    out = []
    for kind, b, s, g in itertools.product(kinds, (1, 4, 16, 64, 256, 1024), (128, 1024, 4096), (1, 3, 7)):
        g = 0 if kind == "ar" else g
        out.append(Timing(kind, b, s, g, float(ctl.predict_wall(hw, COSTS, kind, b, s, g))))
    return list(dict.fromkeys(out))


def test_fit_recovers_known_constants():
    records = sweep(TRUE_HW)
    ctl.fit(records[:5], COSTS, ctl.defaults_for("gpu"))  # warm the scipy import
    t0 = time.perf_counter()
    hw = ctl.fit(records, COSTS, ctl.defaults_for("gpu"))
    elapsed = time.perf_counter() - t0
    for f in ctl.FIT_FIELDS:
        assert getattr(hw, f) == pytest.approx(getattr(TRUE_HW, f), rel=0.01), f
    assert elapsed < 0.5, elapsed  # typically ~10-40 ms for these 180 records
    report = ctl.validate(records, hw, COSTS)
    assert max(report["mape"].values()) < 1e-3 and report["decision_accuracy"] == 1.0


def test_validate_reports_mape_and_decisions():
    records = sweep(TRUE_HW, kinds=("ar", "sd"))
    slow = [dataclasses.replace(t, wall_s=1.2 * t.wall_s) for t in records]
    report = ctl.validate(slow, TRUE_HW, COSTS)
    assert report["mape"]["ar"] == pytest.approx(1 - 1 / 1.2)
    assert set(report["count"]) == {"ar", "sd"}
    # both kinds slowed alike: the measured speedups are unchanged, so every decision agrees
    assert report["decision_accuracy"] == 1.0 and len(report["decisions"]) == 6 * 3 * 3


def test_online_calibrator_learns_from_step_records():
    cal = OnlineCalibrator(COSTS, ctl.defaults_for("gpu"), refit_every=40, explore_eps=0.0)
    step = 0
    for b, s, g in itertools.product((1, 8, 64, 512), (256, 2048), (0, 3, 7)):
        for _ in range(3):
            wall = ctl.step_time(TRUE_HW, COSTS, b, s, g)
            rec = sd_record(g, b, step=step, wall_s=wall, context=s) if g else StepRecord(step, wall, b, b, s, 0, b)
            cal.add(rec)
            step += 1
    cal.refit()
    assert len(cal.records) == 4 * 3 * 6  # cells are (kind, bucket, γ); 6 records each
    report = ctl.validate(cal.records, cal.hw, COSTS)
    assert max(report["mape"].values()) < 0.02 and report["decision_accuracy"] == 1.0


def test_auto_refits_between_rollouts_only():
    """A least-squares fit can take a second on a CPU: the auto policy never runs one mid-rollout."""
    cal = OnlineCalibrator(COSTS, HW, refit_every=4, explore_eps=0.0)
    a = AutoPolicy(COSTS, HW, calibrator=cal)
    a.start_rollout()
    for i in range(10):  # plain steps twice as slow as HW predicts
        wall = 2 * ctl.step_time(HW, COSTS, 8, 100.0 + i, 0)
        a.observe(StepRecord(i, wall, 8, 8, 100.0 + i, 0, 8))
    assert a.hw == HW and cal.pending == 10
    a.end_rollout()
    assert a.hw != HW and cal.pending == 0


def test_auto_scales_unmeasured_cells_like_the_plain_step():
    """Plain steps measured 4x slower than the constants predict: cells not measured yet (every γ > 0 here)
    are predicted 4x slower too, so a slow machine does not make speculation look cheap."""
    a = AutoPolicy(COSTS, HW, calibrator=OnlineCalibrator(COSTS, HW, refit_every=0, explore_eps=0.0))
    a.start_rollout()
    for i in range(5):
        a.observe(StepRecord(i, 4 * ctl.step_time(HW, COSTS, 8, 100.0, 0), 8, 8, 100.0, 0, 8))
    unscaled = AutoPolicy(COSTS, HW, calibrator=OnlineCalibrator(COSTS, HW, refit_every=0, explore_eps=0.0))
    t, t0 = a.predicted_time_per_token(8, 8, 100.0), unscaled.predicted_time_per_token(8, 8, 100.0)
    assert set(t) == {0, *a.ladder}
    assert all(t[g] == pytest.approx(4 * t0[g]) for g in t)
    assert a.predicted_time_per_token(16, 16, 100.0) == unscaled.predicted_time_per_token(16, 16, 100.0)


def test_auto_scales_unmeasured_gammas_like_the_slowest_measured_one():
    """After one SD step at γ = 5 measured 3x slower than predicted (plain steps as predicted), the other γ of
    that bucket are predicted 3x slower too: one slow drafter step does not make the next γ look cheap."""
    a = AutoPolicy(COSTS, HW, calibrator=OnlineCalibrator(COSTS, HW, refit_every=0, explore_eps=0.0))
    a.start_rollout()
    a.observe(StepRecord(0, ctl.step_time(HW, COSTS, 8, 100.0, 0), 8, 8, 100.0, 0, 8))
    a.observe(sd_record(5, 8, [0.5] * 5, step=1, bucket=8, wall_s=3 * ctl.step_time(HW, COSTS, 8, 100.0, 5),
                        context=100.0))
    fresh = AutoPolicy(COSTS, HW, calibrator=OnlineCalibrator(COSTS, HW, refit_every=0, explore_eps=0.0))
    fresh.accepted, fresh.reached = a.accepted.copy(), a.reached.copy()  # same acceptance estimates
    t, t0 = a.predicted_time_per_token(8, 8, 100.0), fresh.predicted_time_per_token(8, 8, 100.0)
    assert t[0] == pytest.approx(t0[0])
    assert all(t[g] == pytest.approx(3 * t0[g]) for g in a.ladder)


def test_calibration_json_round_trip(tmp_path):
    records = sweep(TRUE_HW)[:20]
    path = tmp_path / "cal.json"
    ctl.save_calibration(path, TRUE_HW, records)
    hw, recs = ctl.load_calibration(str(path))
    assert hw == TRUE_HW and recs == records
    assert ctl.load_calibration(TRUE_HW.to_dict()) == (TRUE_HW, [])
    p = ctl.make_policy("auto", COSTS, calibration=path)  # seeds the calibrator (records + prior)
    assert len(p.calibrator.records) == 20 and p.calibrator.prior == TRUE_HW
    assert ctl.make_policy("toggle", COSTS, calibration=path).hw == TRUE_HW


# -- checkpointing, construction, errors -------------------------------------------------------------------------
def test_state_dict_round_trip():
    p = AdaptivePolicy(COSTS, HW)
    for tau in (5.8, 5.8, 7.6):
        run_rollout(p, tau)
    q = ctl.make_policy("adaptive", COSTS, hw=HardwareConstants(bw=1.0, flops=1.0))
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert (q.gamma, q.up_streak, q.tau, q.hw) == (7, 1, 7.6, HW)
    run_rollout(p, 7.6)
    run_rollout(q, 7.6)
    assert p.gamma == q.gamma == 9

    a = AutoPolicy(COSTS, HW, calibrator=OnlineCalibrator(COSTS, HW, refit_every=5, explore_eps=0.3, seed=3))
    for i in range(30):
        g = a.choose(4, 3, 100.0)
        a.observe(sd_record(g, 3, [0.9] * g, step=i, bucket=4, wall_s=1e-3 * (1 + g)) if g
                  else StepRecord(i, 1e-3, 4, 3, 100.0, 0, 3))
    a.end_rollout()
    b = ctl.make_policy("auto", COSTS, hw=HW)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.hw == a.hw and b.state_dict() == a.state_dict()
    assert [a.choose(4, 3, 100.0) for _ in range(20)] == [b.choose(4, 3, 100.0) for _ in range(20)]
    with pytest.raises(ValueError):
        b.load_state_dict(p.state_dict())


def test_make_policy_modes():
    assert ctl.make_policy("ar", COSTS).gammas() == (0,)
    sd = ctl.make_policy("sd", COSTS, draft_length=3)
    assert sd.gammas() == (3,) and sd.choose(512, 500, 10.0) == 3
    assert ctl.make_policy("toggle", COSTS, draft_length=6, hw=HW).gammas() == (0, 6)
    assert ctl.make_policy("adaptive", COSTS, draft_length=9, hw=HW).gamma == 9
    assert ctl.make_policy("adaptive", COSTS, draft_length=6, hw=HW).gamma == 5  # not on the ladder: bottom
    assert ctl.make_policy("auto", COSTS, ladder=(2, 4), hw=HW).gammas() == (0, 2, 4)
    assert ctl.make_policy("toggle", COSTS).hw == ctl.defaults_for(ctl.current_platform())
    # CPU: the XLA backend's drafter (dequantize + dot) is far slower than the native one's: own constants
    xla_cpu, native_cpu = ctl.defaults_for("cpu", "xla"), ctl.defaults_for("cpu", "native")
    assert xla_cpu.eta_d > 2 * native_cpu.eta_d
    assert ctl.make_policy("toggle", COSTS, backend="xla").hw == xla_cpu
    assert ctl.defaults_for("gpu", "pallas") == ctl.defaults_for("gpu")
    # one schema: the engine's StepRecord, or its to_dict (a trace line read back); the old short keys are gone
    rec = ctl.StepRecord(step=0, wall_s=1e-3, batch_bucket=4, active=3, mean_context=5.0, gamma=2, emitted=7,
                         accepted_per_position=[3, 1], rows_reaching_position=[3, 3])
    for report in (rec, rec.to_dict()):
        p = ctl.make_policy("toggle", COSTS, hw=HW)
        p.observe(report)
        p.end_rollout()
        assert p.tau == pytest.approx(7 / 3)
    assert ctl.StepRecord.from_dict(rec.to_dict()) == rec
    with pytest.raises(ValueError, match="accepted / reaching counts"):
        ctl.as_step_record(dict(step=0, wall_s=1e-3, batch_bucket=4, active=3, mean_context=5.0, gamma=2, emitted=7,
                                accepted=[3, 1], reached=[3, 3]))


def test_bad_input_raises():
    for call in (lambda: ctl.make_policy("greedy", COSTS),
                 lambda: ctl.make_policy("sd", COSTS, draft_length=0),
                 lambda: ctl.make_policy("adaptive", COSTS, ladder=(5, 5, 7), hw=HW),
                 lambda: ctl.defaults_for("abacus"),
                 lambda: ModelCosts.from_config(tiny_config(), "int3"),
                 lambda: HardwareConstants(bw=0.0, flops=1.0),
                 lambda: HardwareConstants.from_dict({"bw": 1.0, "flops": 1.0, "speed": 2}),
                 lambda: ctl.step_time(HW, COSTS, 1, 0.0, -1),
                 lambda: ctl.speedup(HW, COSTS, 1, 0.0, 0, 1.0),
                 lambda: StepRecord(0, 1e-3, 4, 3, 0.0, -1, 3),
                 lambda: StepRecord(0, 1e-3, 4, 3, 0.0, 2, 3, accepted_per_position=[1], rows_reaching_position=[3]),
                 lambda: StepRecord(0, 1e-3, 4, 3, 0.0, 1, 3, accepted_per_position=[3], rows_reaching_position=[2]),
                 lambda: StepRecord(0, 1e-3, 4, 5, 0.0, 0, 3),
                 lambda: Timing("ar", 1, 0.0, 3, 1e-3),
                 lambda: Timing("warp", 1, 0.0, 3, 1e-3),
                 lambda: ctl.fit([], COSTS, HW),
                 lambda: ctl.make_policy("ar", COSTS).choose(4, 5, 0.0),
                 lambda: ctl.make_policy("ar", COSTS).choose(4, 2, -1.0)):
        with pytest.raises(ValueError):
            call()


def test_auto_trusts_a_measured_cell_over_a_wrong_model():
    # The model (HW) predicts SD at γ = 5 pays at B = 1: 2.5 ms per 5.9 tokens vs 1 ms per token plain.
    p = quiet_auto(ladder=(5,))
    feed_acceptance(p, [0.99] * 5)
    assert p.choose(1, 1, 0.0) == 5
    # Measured: that SD step takes 20 ms (a drafter dequantized on the fly), the plain step 1 ms as predicted.
    for i in range(3):
        p.observe(sd_record(5, 1, [1.0] * 5, step=i, wall_s=0.02))
        p.observe(StepRecord(i, 1e-3, 1, 1, 0.0, 0, 1))
    assert p.calibrator.correction("sd", 1, 5) == pytest.approx(0.02 / 2.5e-3)
    assert p.calibrator.correction("ar", 1, 0) == pytest.approx(1.0)
    assert p.choose(1, 1, 0.0) == 0  # 20 ms / 6 tokens > 1 ms per token
    assert p.choose(2, 2, 0.0) == 5  # another bucket, nothing measured there: the model decides
