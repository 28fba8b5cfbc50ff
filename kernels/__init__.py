"""The ops of er_jax and their backends, imported as `er_jax.kernels` (the folder `kernels/` is mapped onto
that package name in pyproject.toml). Nothing here imports the model: kernels see only config, sampling
and the QuantArray format.

Ops (one module each, holding the plain-jnp `*_reference` beside its Pallas kernel):
- `quant_matmul`: W4A16 / W8A16 matmul, weights dequantized in registers (and the dense `matmul_reference`).
- `attention.ragged_attention`: flash-decoding over a contiguous, ragged KV cache.
- `rejection.rejection_sample`: vocab-tiled fused speculative verification.

Backends (one module each, an `IMPLS` dict of uniform-signature ops; `registry` maps (op, backend) to an
implementation, falling back to the XLA backend, i.e. the references): `xla`, `pallas` (and `sharded`,
the Pallas kernels per shard of a mesh), `native` (the C++ / XLA FFI CPU kernels).

Pallas lowering: `pl.pallas_call` with its default GPU lowering (Triton in jax 0.10 / 0.11); on CPU the
kernels run in interpret mode. Kernel bodies use only
ref indexing (`ref[...]`, `pl.ds`), `pl.program_id`, `lax.fori_loop` and jnp ops, no Triton-only
primitives (no masked loads, atomics or inline asm), so every load must stay inside its array: block
sizes are powers of two that divide the array dimension, or the last tile is re-read at a clamped
start with its already-covered part masked off (see `clamped_tile`).

The helpers below are shared by the three kernel modules.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from er_jax.config import platform

# Triton's tl.dot needs every operand dimension >= 16; loads need power-of-two sizes.
MIN_DOT = 16


def default_interpret() -> bool:
    """Interpret mode on CPU (Pallas has no CPU lowering); compiled everywhere else."""
    return platform() == "cpu"


def resolve_interpret(interpret) -> bool:
    return default_interpret() if interpret is None else bool(interpret)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def fit_block(dim: int, target: int, minimum: int = MIN_DOT) -> tuple[int, int]:
    """(block, padded_dim): the largest power of two in [minimum, target] that divides `dim`; when none
    does, a power-of-two block and `dim` rounded up to it (the caller pads: a copy, so only for odd sizes;
    the dimensions of real models are multiples of 64)."""
    target = max(minimum, prev_pow2(target))
    b = target
    while b >= minimum:
        if dim % b == 0:
            return b, dim
        b //= 2
    b = min(target, max(minimum, next_pow2(dim)))
    return b, round_up(dim, b)


def check_positive_pow2(name: str, value) -> None:
    if value is not None and (int(value) < 1 or int(value) & (int(value) - 1)):
        raise ValueError(f"{name} must be a power of two (Triton tiles), got {value}")


def clamped_tile(t, size: int, dim: int):
    """Start and validity mask of tile `t` of `size` over an axis of length `dim >= size`.

    Tiles are [t*size, (t+1)*size); the last one, when it would run past `dim`, is read at the clamped
    start `dim - size` instead, and the positions it shares with the previous tile are masked off. All
    reads stay in bounds without padding the (large) array. Returns (start, absolute indices, valid)."""
    start = jnp.minimum(t * size, dim - size)
    idx = start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0)
    return start, idx, idx >= t * size
