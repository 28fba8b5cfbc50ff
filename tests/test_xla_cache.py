"""er_jax.xla_cache: the persistent compilation cache's switch and trimming (no compiles)."""
import os

import jax

from er_jax import xla_cache


def test_trim_drops_the_oldest_entries_down_to_half(tmp_path):
    for i in range(10):  # 10 entries of 100 bytes, entry i older than entry i + 1
        p = tmp_path / f"e{i}"
        p.write_bytes(b"x" * 100)
        os.utime(p, (1000 + i, 1000 + i))
    xla_cache.trim(str(tmp_path), 1000)  # not past the limit: kept
    assert len(os.listdir(tmp_path)) == 10
    xla_cache.trim(str(tmp_path), 900)  # past it: oldest dropped until <= 450 bytes remain
    assert sorted(os.listdir(tmp_path)) == [f"e{i}" for i in range(6, 10)]


def test_off_and_unwritable_leave_jax_alone(tmp_path, monkeypatch, capsys):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(xla_cache.ENV, "off")
    assert xla_cache.enable() is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert xla_cache.enable(str(blocker / "cache")) is None  # a directory under a file cannot be made
    assert "no XLA compilation cache" in capsys.readouterr().out
    assert jax.config.jax_compilation_cache_dir == before
