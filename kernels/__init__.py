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

Pallas lowering (`call`, below): the lowering is chosen per platform when the step is lowered, not when it
is traced (`jax.lax.platform_dependent`): interpret mode on CPU; on CUDA / ROCm Triton, chosen explicitly
with `jax.experimental.pallas.triton.CompilerParams(num_warps, num_stages)` (jax 0.10's plain `pallas_call`
would pick Mosaic GPU, which none of these kernels fits; jax 0.11 defaults to Triton); on TPU Mosaic TPU
(only kernels whose compile test passes are registered for TPU, see registry). So one traced step lowers
for any platform (`.lower(lowering_platforms=("cuda",))` on a CPU host: tests/test_compile.py). Kernel
bodies use only
ref indexing (`ref[...]`, `pl.ds`), `pl.program_id`, `lax.fori_loop` and jnp ops, no Triton-only
primitives (no masked loads, atomics or inline asm), so every load must stay inside its array: block
sizes are powers of two that divide the array dimension, or the last tile is re-read at a clamped
start with its already-covered part masked off (see `clamped_tile`).

The helpers below are shared by the three kernel modules.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from er_jax.config import platform

# Triton's tl.dot needs every operand dimension >= 16; loads need power-of-two sizes.
MIN_DOT = 16


def default_interpret() -> bool:
    """Interpret mode on CPU (Pallas has no CPU lowering); compiled everywhere else."""
    return platform() == "cpu"


def resolve_interpret(interpret) -> bool | None:
    """None (the default): decided per platform at lowering (`call`); True / False: forced."""
    return None if interpret is None else bool(interpret)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Triton launch parameters of one kernel call, chosen by the kernel's wrapper per shape."""

    num_warps: int = 4
    num_stages: int = 2


def call(kernel, *, interpret, tuning: Tuning, **kw):
    """`pl.pallas_call(kernel, **kw)` lowered per platform: interpret mode on CPU (or everywhere when
    `interpret` is True), Triton with `tuning` on CUDA / ROCm, Mosaic TPU on TPU (and any other platform).
    `interpret=False` forces a compiled lowering on every platform (CPU then fails, as Pallas has none)."""
    interpreted = pl.pallas_call(kernel, interpret=True, **kw)
    if interpret:
        return interpreted
    triton = pl.pallas_call(kernel, interpret=False, compiler_params=pltriton.CompilerParams(
        num_warps=tuning.num_warps, num_stages=tuning.num_stages), **kw)
    compiled = pl.pallas_call(kernel, interpret=False, **kw)

    def run(*operands):
        return jax.lax.platform_dependent(*operands, cpu=compiled if interpret is False else interpreted,
                                          cuda=triton, rocm=triton, default=compiled)

    return run


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
