"""Data- and tensor-parallel runs on 8 fake CPU devices (a subprocess: the device count is fixed when jax
starts). Meshes (8,1), (4,2), (2,4), (1,8): greedy tokens equal the single-device run for AR and SD (int4
and int8 drafters), teacher-forced log-probs match to 1e-5, the KV cache is split over data and KV heads,
and a sharded checkpoint restores onto a different mesh shape."""
import os
import subprocess
import sys

import pytest

from er_jax.config import ModelConfig
from er_jax.engine import batch_bucket


def test_buckets_split_evenly_over_data_parallel_shards():
    assert [batch_bucket(n, 4) for n in (1, 4, 5, 9, 16, 17)] == [4, 4, 8, 16, 16, 32]


def test_mesh_that_cannot_split_the_model_is_refused():
    from er_jax.sharding import MeshConfig, check_mesh
    import jax
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    mesh = jax.sharding.Mesh([[jax.devices()[0]]], ("data", "model"))
    check_mesh(cfg, mesh)  # model=1 always fits
    with pytest.raises(ValueError, match="needs 8 devices"):
        MeshConfig(4, 2).make()
    fake = type("M", (), {"shape": {"data": 1, "model": 4}})()
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        check_mesh(cfg, fake)
    fake2 = type("M", (), {"shape": {"data": 1, "model": 2}})()
    with pytest.raises(ValueError, match="straddle"):
        check_mesh(cfg, fake2, "int4")
    check_mesh(cfg, fake2, "int8")


@pytest.mark.slow
def test_sharded_runs_on_eight_fake_devices(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "sharding_checks.py")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
