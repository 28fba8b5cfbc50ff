"""The execution spec: how a step runs (op backend, device mesh, layer layout), built once from the platform
and the user's choice, then carried unchanged in `engine.StepSpec` down to every op call."""
from __future__ import annotations

from dataclasses import dataclass

from jax.sharding import Mesh

from er_jax.config import BACKENDS, LAYOUTS, check_choice, platform
from er_jax.kernels import registry


@dataclass(frozen=True)
class Execution:
    """Static and hashable (part of every compile-cache key)."""

    backend: str = "xla"  # one of config.BACKENDS
    mesh: Mesh | None = None  # a ("data", "model") mesh the inputs are placed on, or None (one device)
    layout: str = "stacked"  # one of config.LAYOUTS: how the layer weights are laid out for execution

    def __post_init__(self):
        check_choice("backend (kernels)", self.backend, BACKENDS)
        check_choice("layout", self.layout, LAYOUTS)

    def op(self, name: str):
        """This backend's implementation of op `name` (see er_jax.kernels.registry)."""
        return registry.lookup(name, self.backend)


def resolve_execution(backend: str | None = None, mesh: Mesh | None = None, layout: str | None = None) -> Execution:
    """The user's choices, with the platform's defaults for what they leave out: the fastest backend that
    compiles here, and the unstacked layout on a single CPU device (XLA on CPU copies each layer's slice out
    of a stacked array, which doubles the bytes a memory-bound decode step moves)."""
    plat = platform()
    backend = backend or registry.default_backend(plat)
    check_choice("backend (kernels)", backend, BACKENDS)
    reason = registry.why_unavailable(backend)
    if reason:
        raise ValueError(f"backend {backend!r} cannot run here: {reason}; choose another (one of {BACKENDS})")
    layout = layout or ("unstacked" if plat == "cpu" and mesh is None else "stacked")
    return Execution(backend, mesh, layout)
