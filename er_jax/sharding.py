"""Data- and tensor-parallel placement over a jax device mesh with axes ("data", "model").

Tensor parallelism is the Megatron split: q/k/v and gate/up are column-parallel (output features, i.e.
attention heads and MLP columns, over "model"), o and down are row-parallel (input features over
"model"), the LM head is split over the vocabulary; norms are replicated. The KV cache and the batch are
split over "data" and KV heads over "model". Everything else is GSPMD: a jitted step over sharded inputs
is partitioned by XLA, which inserts the all-reduces after row-parallel matmuls. The drafter is derived
from sharded weights under jit with the same placement; int4 groups (128 input rows) never straddle a
shard because `check_mesh` requires each shard's input rows to be a whole number of groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from er_jax.config import ModelConfig
from er_jax.weight_spec import mesh_axes

AXES = ("data", "model")


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("data", "model") mesh axes. data * model devices are used."""

    data: int = 1
    model: int = 1

    def __post_init__(self):
        if self.data < 1 or self.model < 1:
            raise ValueError(f"mesh axes must be >= 1, got data={self.data}, model={self.model}")

    @property
    def size(self) -> int:
        return self.data * self.model

    def make(self, devices=None) -> Mesh:
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) < self.size:
            raise ValueError(f"mesh data={self.data} x model={self.model} needs {self.size} devices, only "
                             f"{len(devices)} are visible (on CPU, set XLA_FLAGS=--xla_force_host_platform_"
                             f"device_count={self.size} before jax starts)")
        return Mesh(np.asarray(devices[: self.size]).reshape(self.data, self.model), AXES)


def parse_mesh(text: str | None) -> MeshConfig | None:
    """The command line's --mesh: "DATA,MODEL" (e.g. "2,4") -> MeshConfig; None, "" or "none" -> None."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--mesh must be DATA,MODEL: two positive integers, the data- and tensor-parallel "
                         f"sizes (e.g. --mesh 2,4 on 8 devices), got {text!r}")
    return MeshConfig(int(parts[0]), int(parts[1]))


def as_mesh(mesh) -> Mesh | None:
    """A MeshConfig, a jax Mesh with axes ("data", "model"), or None -> a Mesh or None."""
    if mesh is None or isinstance(mesh, Mesh):
        if mesh is not None and tuple(mesh.axis_names) != AXES:
            raise ValueError(f"the mesh must have axes {AXES}, got {tuple(mesh.axis_names)}")
        return mesh
    if isinstance(mesh, MeshConfig):
        return mesh.make()
    raise ValueError(f"mesh must be a sharding.MeshConfig, a jax Mesh with axes {AXES} or None, got {mesh!r}")


def check_mesh(config: ModelConfig, mesh: Mesh, drafter: str | None = "int4", group_size: int = 128) -> None:
    """Refuse a tensor-parallel degree the model's shapes cannot be split by."""
    tp = mesh.shape["model"]
    need = {"num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}
    bad = [f"{k}={v}" for k, v in need.items() if v % tp]
    if bad:
        raise ValueError(f"tensor parallelism model={tp} must divide {', '.join(bad)}; pick a model axis that "
                         f"divides the head counts, MLP width and vocabulary")
    if drafter == "int4" and tp > 1:
        for name, k in (("o (heads * head_dim)", config.num_heads * config.head_dim),
                        ("down (intermediate_size)", config.intermediate_size)):
            if (k // tp) % group_size:
                raise ValueError(f"int4 groups of {group_size} input rows would straddle shards of the "
                                 f"row-parallel {name} projection: {k} / model={tp} = {k // tp} is not a multiple "
                                 f"of {group_size}; use a smaller model axis or the int8 drafter")


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def weight_shardings(weights, mesh: Mesh, config: ModelConfig | None = None):
    """NamedShardings for a weights (or drafter) pytree, from the logical axes of er_jax.weight_spec mapped by
    weight_spec.MESH_AXIS. A leaf is found by its name in the pytree; a QuantArray field (int4 packed rows,
    scales, zero points) follows its projection's axes, and a dimension of size 1 (int8's per-column scale) is
    not split. `config` is not needed (the axes do not depend on sizes)."""
    from er_jax.weight_spec import leaf_specs

    specs = leaf_specs(config or _AXES_CONFIG)

    def leaf_spec(path, leaf):
        names = [k for k in (_key(p) for p in path) if k in specs]
        if not names:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*mesh_axes(specs[names[-1]], tuple(leaf.shape))))

    return jax.tree_util.tree_map_with_path(leaf_spec, weights)


# Any config with biases and an LM head: the logical axes of every possible leaf.
_AXES_CONFIG = ModelConfig(vocab_size=2, hidden_size=2, intermediate_size=2, num_layers=1, num_heads=1,
                           num_kv_heads=1, head_dim=2, qkv_bias=True, tie_embeddings=False)


def shard_weights(weights, mesh: Mesh):
    """Place a weights / drafter pytree on the mesh."""
    return jax.device_put(weights, weight_shardings(weights, mesh))


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """[L, B, S, KV, hd]: batch over data, KV heads over model."""
    return NamedSharding(mesh, P(None, "data", None, "model", None))


def rows_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_rows(x, mesh: Mesh):
    """A host array (the same on every process) onto the mesh with its rows split over "data"."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, rows_sharding(mesh), lambda index: x[index])


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Multi-host entry: `jax.distributed.initialize` from arguments or the environment variables
    ER_JAX_COORDINATOR (host:port), ER_JAX_NUM_PROCESSES, ER_JAX_PROCESS_ID. On managed clusters (TPU pods,
    SLURM) jax discovers all three itself: set ER_JAX_DISTRIBUTED=1. Returns True when it initialized."""
    coordinator = coordinator or os.environ.get("ER_JAX_COORDINATOR")
    if num_processes is None and "ER_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["ER_JAX_NUM_PROCESSES"])
    if process_id is None and "ER_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["ER_JAX_PROCESS_ID"])
    if coordinator is None and os.environ.get("ER_JAX_DISTRIBUTED") != "1":
        return False
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ValueError("a coordinator address needs num_processes and process_id too "
                         "(or ER_JAX_NUM_PROCESSES / ER_JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def start_distributed() -> None:
    """The command line's --distributed: `initialize_distributed()` from the environment, or a clear error
    when the environment names no cluster."""
    if not initialize_distributed():
        raise ValueError("--distributed needs ER_JAX_COORDINATOR=host:port with ER_JAX_NUM_PROCESSES and "
                         "ER_JAX_PROCESS_ID, or ER_JAX_DISTRIBUTED=1 where jax finds the cluster itself "
                         "(TPU pods, SLURM, Open MPI)")


def global_decision(value: int) -> int:
    """The controller's choice, made identical on every host (process 0's wins): hosts measure their own
    timings, so their policies could otherwise disagree and run different programs."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def to_host(tree):
    """device_get that also works for arrays spread over several hosts (all-gathered first)."""
    if all(getattr(a, "is_fully_addressable", True) for a in jax.tree_util.tree_leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
