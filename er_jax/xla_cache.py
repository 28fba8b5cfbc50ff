"""jax's persistent compilation cache, for the CLI, the experiment scripts and the test suite.

A rollout's warm-up compiles one step per (batch bucket, γ) of its policy, SmolLM2's 30 layers unrolled on
CPU: for `adaptive` at 64 rows that is over ten minutes. jax can keep the executables on disk, keyed by the
HLO, compile options, jax / XLA / plugin versions and backend, so a hit is exactly what the same compile
would give, and a second run (or process) compiles only what changed. The library itself never turns it on
(that is a process-wide setting); `er-jax` and the scripts under experiments/ call `enable()`.

ER_JAX_XLA_CACHE picks the directory (default ~/.cache/er_jax/xla); "off" disables it.
"""
from __future__ import annotations

import os

ENV = "ER_JAX_XLA_CACHE"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "er_jax", "xla")
MAX_BYTES = 4 << 30


def trim(directory: str, max_bytes: int) -> None:
    """Past `max_bytes`, drop the oldest entries down to half of it. (jax's own size limit,
    jax_compilation_cache_max_size, takes a file lock per entry: it made a cold test lane 1.7x slower.)"""
    entries = sorted((e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(directory) if e.is_file())
    total = sum(size for _, size, _ in entries)
    for _, size, path in entries if total > max_bytes else ():
        if total <= max_bytes // 2:
            break
        os.remove(path)
        total -= size


def enable(directory: str | None = None, *, min_compile_secs: float = 0.5, max_bytes: int | None = MAX_BYTES,
           quiet: bool = False) -> str | None:
    """Point jax's persistent compilation cache at `directory` (default: $ER_JAX_XLA_CACHE, else DEFAULT_DIR;
    "off" disables), trimmed to `max_bytes` first (None: leave it). Compiles shorter than `min_compile_secs`
    are not stored. Returns the directory, or None when off or not writable (then jax compiles as usual)."""
    directory = directory or os.environ.get(ENV) or DEFAULT_DIR
    if directory == "off":
        return None
    try:
        os.makedirs(directory, exist_ok=True)
        if max_bytes is not None:
            trim(directory, max_bytes)
    except OSError as e:  # e.g. an unwritable home: only slower
        if not quiet:
            print(f"er_jax: no XLA compilation cache at {directory} ({e})")
        return None
    import jax
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return directory
