"""Data- and tensor-parallel runs on 8 fake CPU devices (a subprocess: the device count is fixed when jax
starts). Meshes (8,1), (4,2), (2,4), (1,8): greedy tokens equal the single-device run for AR and SD (int4
and int8 drafters; also with the Pallas kernels run per shard), teacher-forced log-probs match to 1e-5, the
KV cache is split over data and KV heads, a sharded checkpoint restores onto a different mesh shape, and a
GRPO step on a mesh matches the one-device step (its checkpoint restoring onto another mesh shape and onto
one device). Here: the cheap refusals."""
import os
import subprocess
import sys

import pytest

from er_jax.config import ModelConfig
from er_jax.engine import batch_bucket


def test_buckets_split_evenly_over_data_parallel_shards():
    assert [batch_bucket(n, 4) for n in (1, 4, 5, 9, 16, 17, 65, 97)] == [4, 4, 8, 16, 16, 32, 96, 128]


def test_mesh_that_cannot_split_the_model_is_refused():
    import jax

    from er_jax.sharding import MeshConfig, check_mesh
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    one = jax.devices()[:1]  # the refusal is tested against an explicit device list, whatever this process has
    mesh = jax.sharding.Mesh([one], ("data", "model"))
    check_mesh(cfg, mesh)  # model=1 always fits
    with pytest.raises(ValueError, match="needs 8 devices, only 1 are visible"):
        MeshConfig(4, 2).make(one)
    assert MeshConfig(1, 1).make(one).devices.size == 1
    fake = type("M", (), {"shape": {"data": 1, "model": 4}})()
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        check_mesh(cfg, fake)
    fake2 = type("M", (), {"shape": {"data": 1, "model": 2}})()
    with pytest.raises(ValueError, match="straddle"):
        check_mesh(cfg, fake2, "int4")
    check_mesh(cfg, fake2, "int8")


def test_mesh_flag_and_data_parallel_split_are_validated(monkeypatch, capsys, tmp_path):
    from er_jax.cli import main
    from er_jax.rl.grpo import GRPOConfig, Trainer, check_data_parallel
    from er_jax.rl.tasks import TinyCopyTask, tiny_model_config
    from er_jax.sharding import MeshConfig, parse_mesh

    assert parse_mesh("2,4") == MeshConfig(2, 4) and parse_mesh(" 1, 8") == MeshConfig(1, 8)
    assert parse_mesh(None) is None and parse_mesh("none") is None
    for bad in ("2x4", "8", "2,4,1", "0,4", "-1,2", "a,b", "2,"):
        with pytest.raises(ValueError, match="DATA,MODEL"):
            parse_mesh(bad)

    g = GRPOConfig(prompts_per_step=3, samples=2)
    check_data_parallel(g, 2)
    with pytest.raises(ValueError, match=r"prompts_per_step \* samples = 6 is not divisible .* data axis \(4\)"):
        check_data_parallel(g, 4)
    with pytest.raises(ValueError, match="micro_batch = 2 is not divisible"):
        check_data_parallel(GRPOConfig(prompts_per_step=4, samples=2, micro_batch=2), 4)
    cfg = tiny_model_config()
    task = TinyCopyTask(cfg.vocab_size)
    with pytest.raises(ValueError, match="not divisible"):  # refused before the devices are asked for
        Trainer(cfg, None, task, g, mesh=MeshConfig(4, 1))
    import jax
    more = jax.device_count() + 1  # one device more than this process has, however many that is
    with pytest.raises(ValueError, match=f"needs {more} devices"):
        Trainer(cfg, None, task, GRPOConfig(prompts_per_step=more, samples=2), mesh=MeshConfig(more, 1))

    for k in ("ER_JAX_COORDINATOR", "ER_JAX_NUM_PROCESSES", "ER_JAX_PROCESS_ID", "ER_JAX_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    train = ["train", "--preset", "tiny-rl", "--task", "tiny", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(train + ["--mesh", "2x4"]) == 2
    assert "--mesh must be DATA,MODEL" in capsys.readouterr().err
    assert main(train + ["--distributed"]) == 2
    assert "--distributed needs ER_JAX_COORDINATOR" in capsys.readouterr().err
    assert main(["bench", "rollout", "--preset", "tiny-bench", "--mesh", "4"]) == 2
    assert "--mesh must be DATA,MODEL" in capsys.readouterr().err


@pytest.mark.slow
def test_sharded_runs_on_eight_fake_devices(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "sharding_checks.py")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
