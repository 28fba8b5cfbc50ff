"""Fixtures shared across test files, and the suite's persistent XLA compilation cache."""
import os

import pytest

# The accel-compile extra installs libtpu, which takes a machine-wide lockfile (/tmp/libtpu_lockfile) in the
# first process that initializes it; a second xdist worker then fails to build compile-only TPU devices
# ("Internal error when accessing libtpu multi-process lockfile"). The suite only compiles for TPU (it never
# runs on one), so every worker may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# Most of the suite's time is XLA compiling small engine steps: jax's persistent compilation cache
# (er_jax.xla_cache) keeps the executables between runs, so a second run of a lane compiles only what changed.
# ER_JAX_TEST_XLA_CACHE picks the directory; "off" disables it.
XLA_CACHE = os.environ.get("ER_JAX_TEST_XLA_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "er_jax", "xla-tests"))


def pytest_configure(config):
    from er_jax import xla_cache
    os.environ.setdefault(xla_cache.ENV, XLA_CACHE)  # the CLI run by subprocess tests shares it
    # the suite's compiles are small; trimmed once, in the controller process (xdist workers skip it)
    xla_cache.enable(XLA_CACHE, min_compile_secs=0.0,
                     max_bytes=None if hasattr(config, "workerinput") else 2 << 30)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF, dequantized to f32), loaded once per test session."""
    from er_jax.io.registry import load_model
    return load_model("smollm2")
