"""The per-op registry: (op, backend) -> implementation.

Ops and their uniform signatures (`ex` is the step's `er_jax.execution.Execution`, passed down unchanged):
- `matmul(x, w, *, ex, name)`: dense x [..., K] @ w [K, N] (an array, or an `er_jax.panels.PanelArray` where
  `model.execution_layout` packed one for the native backend), f32 accumulation, x.dtype out;
- `quant_matmul(x, qa, *, ex, name)`: the same with a QuantArray weight (`name`: which projection);
- `attention(q, k, v, q_pos, *, ex, layer=None)`: causal GQA over the cache (stacked with `layer`);
- `kv_write(k_all, v_all, k, v, positions, *, ex, layer)`: the stacked cache with one layer's new K/V
  written (`er_jax.cache.write_layer`);
- `rejection_sample(target_logits, draft_logits, draft_tokens, sc, keys, *, ex)`: exact verification.
- `sample(keys, logp, *, ex, greedy=False)`: one token per row from softmax(logp) (argmax when greedy); each
  backend draws with its own method from the same keys (XLA: Gumbel-max, native: inverse CDF), same law;
- `sample_logits(keys, logits, sc, *, ex)`: (tokens, reported log-probs) from raw logits under a
  SamplingConfig (`sampling.sample_logits_reference`: `sample` of `log_probs`), the decode steps' draw;
- `rms_norm`, `silu_mul`, `rope_qkv`: the layer's pointwise ops (`er_jax.kernels.pointwise`).

A backend is a module with an `IMPLS` dict (any subset of the ops) and optionally `why_unavailable()`.
An op a backend does not implement runs the XLA backend's (the plain-jnp reference). Adding a backend is
one new module and one line in `_BACKENDS`.
"""
from __future__ import annotations

from er_jax.config import BACKENDS, check_choice
from er_jax.kernels import native, pallas, xla

_BACKENDS = {"xla": xla, "pallas": pallas, "native": native}
OPS = tuple(xla.IMPLS)


def why_unavailable(backend: str) -> str | None:
    """None when `backend` can run in this process, else one sentence saying why not."""
    check_choice("backend (kernels)", backend, BACKENDS)
    if backend not in _BACKENDS:
        return f"the {backend!r} backend is not part of this build"
    reason = getattr(_BACKENDS[backend], "why_unavailable", None)
    return reason() if reason else None


def lookup(op: str, backend: str):
    """The implementation of `op` on `backend` (the XLA reference where the backend has none)."""
    check_choice("op", op, OPS)
    return _BACKENDS[backend].IMPLS.get(op, xla.IMPLS[op])


def default_backend(platform: str) -> str:
    """The fastest backend that compiles on `platform`: Pallas (Triton) on GPU, XLA on TPU (no Pallas
    kernel of ours is TPU-legal yet). On CPU the native kernels when they are built and run here (faster end
    to end: docs/cpu_profile.md), else XLA; `why_unavailable("native")` says why."""
    if platform == "cpu":
        return "native" if why_unavailable("native") is None else "xla"
    return "pallas" if platform == "gpu" else "xla"
