"""Calibration and rollout-benchmark commands (er_jax.sweep / calibfile / bench / plots behind er_jax.cli), run
in-process through the CLI on the "tiny-bench" preset: sweep -> calibrate -> validate / predict / plot, bench
rollout, and compile accounting."""
import csv
import json

import numpy as np
import pytest

import er_jax
from er_jax import bench, calibfile, controller, sweep
from er_jax.cli import main
from er_jax.config import MODES
from er_jax.io.registry import load_model
from er_jax.rollout import SpecRollout
from tests.helpers import tiny_model

TINY = ["--preset", "tiny-bench", "--layers", "1"]


@pytest.fixture(scope="module")
def sweep_csv(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sweep") / "sweep.csv")
    rc = main(["sweep", *TINY, "--batches", "1", "--contexts", "16", "--gammas", "0", "2", "--reps", "2",
               "--warmup", "1", "--out", path])
    assert rc == 0
    return path


@pytest.fixture(scope="module")
def calib_json(sweep_csv, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("calib") / "calib.json")
    assert main(["calibrate", "--csv", sweep_csv, *TINY, "--drafter", "int4", "--out", path]) == 0
    return path


@pytest.mark.slow
def test_sweep_csv_columns_and_rows(sweep_csv):
    with open(sweep_csv, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == sweep.CSV_FIELDS
        rows = list(reader)
    cells = {(r["kind"], int(r["batch"]), int(float(r["context"])), int(r["gamma"])) for r in rows}
    want = {(k, 1, 16, g) for k, g in (("ar", 0), ("draft", 2), ("verify", 2), ("sd", 2))}
    assert cells == want and len(rows) == len(want)
    for r in rows:
        assert float(r["wall_s"]) > 0
        assert (r["tau"] == "") == (r["kind"] != "sd")  # τ is measured on SD steps only
    parsed = sweep.read_csv(sweep_csv)
    assert [controller.as_timing(r).kind for r in parsed] == [r["kind"] for r in rows]


@pytest.mark.slow
def test_sweep_tau_counts_every_accepted_draft():
    """A drafter identical to the target (weights on the int8 grid, so int8 quantization is exact) decoding
    greedily accepts every draft: the sweep's τ must be exactly γ + 1 (an off-by-one or a miscount fails)."""
    import jax

    m = load_model(preset="tiny-bench", layers=1, dtype="float32")
    rng = np.random.default_rng(0)
    layers = dict(m.weights["layers"])
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        codes = rng.integers(-127, 128, layers[name].shape)
        codes[..., 0, :] = 127  # every output column's max |w| is 127 grid steps: scale = 2^-8 exactly
        layers[name] = jax.numpy.asarray(codes * 2.0 ** -8, jax.numpy.float32)
    w = {**m.weights, "layers": layers}
    for gamma in (2,):
        rows = sweep.sweep(m.config, w, batches=[2], contexts=[16], gammas=[gamma], drafter="int8", reps=1,
                           warmup=1, temperature=0.0, layout="stacked", progress=False)
        (sd,) = [r for r in rows if r["kind"] == "sd"]
        assert sd["tau"] == gamma + 1, sd


def test_calibrate_writes_a_loadable_calibration(calib_json):
    hw, records, costs = calibfile.load(calib_json)
    assert hw.platform == controller.current_platform() and len(records) == 4
    assert costs == controller.ModelCosts.from_config(
        load_model(preset="tiny-bench", layers=1, weights=False).config, "int4")
    assert controller.load_calibration(calib_json)[0] == hw  # the controller reads it as well
    with open(calib_json) as f:
        assert json.load(f)["model"]["source"] == "preset:tiny-bench,layers=1"


def test_validate_predict_plot(sweep_csv, calib_json, tmp_path, capsys):
    out = str(tmp_path / "v.json")
    assert main(["validate", "--csv", sweep_csv, "--calibration", calib_json, "--json", out]) == 0
    text = capsys.readouterr().out
    for kind in ("ar", "draft", "verify", "sd"):
        assert kind in text
    assert "MAPE" in text and "SD-on decision sign accuracy" in text
    with open(out) as f:
        v = json.load(f)
    assert set(v["mape"]) == {"ar", "draft", "verify", "sd"} and len(v["decisions"]) == 1

    pj = str(tmp_path / "p.json")
    for tau in ("1.0", "4.0"):  # the decision printed is the one the predicted speedup implies
        assert main(["predict", "--calibration", calib_json, "--batch", "4", "--context", "512", "--gamma", "3",
                     "--tau", tau, "--json", pj]) == 0
        text = capsys.readouterr().out
        with open(pj) as f:
            p = json.load(f)
        want = "SD on" if p["speedup"] >= 1 + p["epsilon"] else "SD off (plain decoding)"
        assert p["decision"] == want and f"decision: {want}\n" in text
        assert all(s in text for s in ("T_T", "T_D", "T_V", "speedup"))
        assert f"{p['speedup']:9.3f}" in text

    png = tmp_path / "boundary.png"
    assert main(["plot", "--calibration", calib_json, "--csv", sweep_csv, "--gamma", "2", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_point_matches_the_controller():
    costs = controller.ModelCosts.from_config(er_jax.SHAPE_PRESETS["qwen2.5-7b"].replace(dtype="bfloat16"))
    hw = controller.defaults_for("gpu")
    p = calibfile.predict_point(hw, costs, 2, 2048, 5, 5.0)
    assert p["speedup"] == pytest.approx(controller.speedup(hw, costs, 2, 2048, 5, 5.0))
    assert p["decision"] == ("SD on" if p["speedup"] >= 1.05 else "SD off (plain decoding)")
    assert p["breakeven_tau"] == pytest.approx(1.05 * p["sd_step"] / p["T_T"])
    with pytest.raises(ValueError, match="τ must be in"):
        calibfile.predict_point(hw, costs, 2, 2048, 5, 7.0)


def test_bad_input_is_refused(tmp_path, capsys):
    assert main(["sweep", "--preset", "nope", "--out", str(tmp_path / "x.csv")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["sweep", *TINY, "--gammas", "0", "99", "--out", str(tmp_path / "x.csv")]) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("kind,batch\nar,1\n")
    assert main(["calibrate", "--csv", str(bad), *TINY, "--out", str(tmp_path / "c.json")]) == 2
    assert "missing columns" in capsys.readouterr().err


def test_workload_is_deterministic_and_long_tailed():
    m = load_model(preset="tiny-bench", weights=False)
    p1, l1 = bench.workload(m, 8, 8, median_len=40, sigma=0.8, max_new=400, seed=3)
    p2, l2 = bench.workload(m, 8, 8, median_len=40, sigma=0.8, max_new=400, seed=3)
    assert p1 == p2 and (l1 == l2).all() and len(p1) == 64 and p1[0] == p1[7] != p1[8]
    assert 4 <= l1.min() and l1.max() <= 400 and l1.max() > 2.5 * np.median(l1)  # a long tail
    assert bench.workload(m, 2, 2, lengths="natural")[1] is None


@pytest.mark.slow
def test_bench_rollout_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "rollout", *TINY, "--prompts", "1", "--samples", "2", "--median-len", "5", "--min-len", "2",
               "--max-new-tokens", "8", "--repeats", "2", "--ladder", "2", "--draft-length", "2",
               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == set(MODES)
    lengths = res["workload"]["row_lengths"]
    for mode, r in res["modes"].items():
        assert len(r["walls"]) == 2 and r["wall_s"] > 0 and 0 <= r["sd_on_fraction"] <= 1
        assert r["tokens"] == sum(lengths)  # forced per-row lengths: every mode does the same work
        assert r["wall_min"] == min(r["walls"]) and r["wall_min"] <= r["wall_s"]
        assert r["ratio_vs_ar"] == pytest.approx(r["wall_min"] / res["modes"]["ar"]["wall_min"])
        assert all(run["steal_s"] is None or run["steal_s"] >= 0 for run in r["runs"])
    assert res["modes"]["ar"]["sd_on_fraction"] == 0 and res["modes"]["sd"]["sd_on_fraction"] == 1
    assert res["modes"]["sd"]["tau"] >= 1
    assert not res["recompiled"] and set(res["targets"]) == {"auto", "adaptive", "toggle"}
    # no mode compiled anything after warm-up, although rows finished and were compacted 2 -> 1
    assert len(set(lengths)) == 2 and {1, 2} <= set(res["modes"]["ar"]["timeline"]["active"])
    assert all(run["compile_count"] == res["compile_count_after_warmup"]
               for r in res["modes"].values() for run in r["runs"])
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_per_row_max_new_tokens_are_validated():
    cfg, w = tiny_model()
    r = SpecRollout(cfg, w, mode="ar", max_batch=2, max_prompt_len=4, max_new_tokens=8)
    for kw in (dict(min_new_tokens=[4, 0], max_new_tokens=[3, 6]), dict(max_new_tokens=[3]),
               dict(max_new_tokens=[0, 3]), dict(max_new_tokens=[9, 3])):
        with pytest.raises(ValueError, match="max_new_tokens must be"):
            r.generate([[1, 2], [4, 5]], **kw)


@pytest.mark.parametrize("mode", [m if m == "ar" else pytest.param(m, marks=pytest.mark.slow) for m in MODES])
def test_no_recompile_after_warmup(mode):
    """Each mode's own SpecRollout: after warmup(), generate calls with other prompts, seeds and per-row
    lengths compile nothing. (One batch bucket keeps this fast; test_bench_rollout_end_to_end covers
    compaction between buckets for every mode.)"""
    cfg, w = tiny_model(num_layers=1)
    # adaptive / auto: the same policy with a short ladder (fewer executables to compile), via policy=
    policy = (controller.make_policy(mode, controller.ModelCosts.from_config(cfg), draft_length=2, ladder=(2,))
              if mode in ("adaptive", "auto") else None)
    r = SpecRollout(cfg, w, mode=mode, draft_length=2, max_batch=1, max_prompt_len=8, max_new_tokens=6, policy=policy)
    assert r.mode == mode and r.policy.mode == mode
    with pytest.raises(AttributeError):
        r.policy = controller.make_policy("ar", r.costs)  # a policy is chosen by the constructor or generate(policy=)
    r.warmup(er_jax.RolloutConfig(seed=0), prompt_lens=[3, 8])
    compiled = r.compile_count
    for i, (prompts, limit) in enumerate([([[1, 2, 3]], [6]), ([[7, 8, 9, 10, 11]], [5]), ([[1] * 8], [1])]):
        out = r.generate(prompts, er_jax.RolloutConfig(seed=i), min_new_tokens=limit, max_new_tokens=limit)
        assert out.lengths.tolist() == limit  # per-row lengths (EOS suppressed until, stopped at)
        assert r.compile_count == compiled, f"{mode}: generate call {i} compiled something new"
