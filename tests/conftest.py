"""Fixtures shared across test files, and the suite's persistent XLA compilation cache."""
import os

import pytest

# Most of the suite's time is XLA compiling small engine steps. jax's persistent compilation cache keeps the
# executables between runs (keyed by the HLO, compile options, jax / XLA / plugin versions and backend), so a
# second run of a lane compiles only what changed. ER_JAX_TEST_XLA_CACHE picks the directory; "off" disables it.
# (jax's own size limit, jax_compilation_cache_max_size, takes a file lock per entry and made a cold run of the
# fast lane 1.7x slower; the oldest entries are dropped here instead, once per session.)
XLA_CACHE = os.environ.get("ER_JAX_TEST_XLA_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "er_jax", "xla-tests"))
XLA_CACHE_MAX_BYTES = 2 << 30


def _trim(directory: str, max_bytes: int) -> None:
    """Past `max_bytes`, drop the oldest entries down to half of it."""
    entries = sorted((e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(directory) if e.is_file())
    total = sum(size for _, size, _ in entries)
    for _, size, path in entries if total > max_bytes else ():
        if total <= max_bytes // 2:
            break
        os.remove(path)
        total -= size


def pytest_configure(config):
    if XLA_CACHE == "off":
        return
    import jax
    try:
        os.makedirs(XLA_CACHE, exist_ok=True)
        if not hasattr(config, "workerinput"):  # once, in the controller process (xdist workers skip it)
            _trim(XLA_CACHE, XLA_CACHE_MAX_BYTES)
    except OSError as e:  # an unwritable home: run without the cache (only slower)
        print(f"er_jax tests: no XLA compilation cache at {XLA_CACHE} ({e})")
        return
    jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the suite's compiles are small


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF, dequantized to f32), loaded once per test session."""
    from er_jax.io.registry import load_model
    return load_model("smollm2")
