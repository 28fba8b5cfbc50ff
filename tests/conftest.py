"""Fixtures shared across test files."""
import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF, dequantized to f32), loaded once per test session."""
    from er_jax.io.registry import load_model
    return load_model("smollm2")
