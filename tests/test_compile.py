"""The accelerator path compiles, proven on a CPU host (docs/accelerators.md).

- CUDA: every jitted engine step (`er_jax.engine.prefill / ar_step / sd_step / compact` with a StepSpec,
  jitted as `Engine.step` jits them) is traced on abstract weights (`jax.eval_shape`: no real-size array is
  ever allocated) and lowered with `lowering_platforms=("cuda",)` for the GPU default backend; the lowered
  module must hold one Triton custom call per Pallas kernel the step runs (a Pallas step whose kernels
  lowered to anything else, or vanished, fails), each with `num_warps` / `num_stages` set.
- TPU: the TPU default backend's steps are compiled (not only lowered) for v5e and v6e topologies with
  libtpu's compile-only devices (`pip install -e ".[accel-compile]"`); without libtpu these tests skip,
  except under CI=true, where they fail.
- CUDA, compiled (slow lane): with jax's CUDA plugin installed (the same extra; no CUDA libraries or driver
  needed) a GPU topology built from an H100 target description gives a compile-only device, and the
  steps compile for it, Triton kernels included (XLA's deviceless compilation), in a subprocess started
  with JAX_PLATFORMS=cpu (the plugin then skips its CUDA library check).

Coverage: the fast lane lowers one step of every kind and kernel class (tiny shapes, plus Qwen2.5-1.5B's
largest SD step) and compiles the tiny TPU steps; `-m slow` lowers the grid below for tiny, SmolLM2-135M
and Qwen2.5-1.5B shapes and compiles SmolLM2 / Qwen steps for TPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from er_jax import engine as E
from er_jax.config import SHAPE_PRESETS, ModelConfig, SamplingConfig
from er_jax.execution import Execution
from er_jax.kernels import registry
from er_jax.model import init_weights
from er_jax.quant import derive_drafter

TINY = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=32, name="tiny")
MODELS = {"tiny": TINY, "smollm2": SHAPE_PRESETS["smollm2-135m"], "qwen": SHAPE_PRESETS["qwen2.5-1.5b"]}
SAMPLINGS = {"greedy": SamplingConfig(0.0), "t1": SamplingConfig(1.0),
             "topkp": SamplingConfig(1.0, top_k=50, top_p=0.9)}
GAMMAS = (1, 3, 7, 11)
SCHEMES = ("int4", "int8")
MAX_NEW = 64
MAX_BATCH = 64
_TRITON = re.compile(r'name = \\?"(\w+)\\?", num_stages = (\d+) : i32, num_warps = (\d+) : i32')


def _engine(model: str, backend: str, prompt_bucket: int):
    cfg = MODELS[model].replace(dtype="bfloat16")  # the accelerator dtype
    eng = E.Engine(cfg, max_batch=MAX_BATCH, max_prompt_len=prompt_bucket, max_new_tokens=MAX_NEW,
                   ex=Execution(backend, None, "stacked"))
    return cfg, eng


@functools.lru_cache(maxsize=None)
def _abstract(model: str, backend: str, batch: int, prompt_bucket: int, scheme: str | None):
    """Abstract (ShapeDtypeStruct) weights, drafter and decode state, as the engine would hold them."""
    cfg, eng = _engine(model, backend, prompt_bucket)
    weights = jax.eval_shape(lambda: init_weights(cfg, jax.random.key(0)))
    drafter = None if scheme is None else jax.eval_shape(lambda w: derive_drafter(w, scheme), weights)
    init = getattr(eng, "initial_state", None) or getattr(eng, "_initial_state")
    limit = np.full(batch, MAX_NEW, np.int32)
    state = jax.eval_shape(lambda: init(batch, batch, 0, limit, limit))
    return cfg, eng, weights, drafter, state


def trace_step(kind: str, model: str, backend: str, batch: int, prompt_bucket: int, sampling: str = "t1",
               gamma: int = 0, scheme: str = "int4", place=None):
    """The jitted engine step `kind` traced on abstract inputs (`place`: a function applied to every input
    leaf, e.g. to give it a TPU device's sharding)."""
    cfg, eng, weights, drafter, state = _abstract(model, backend, batch, prompt_bucket,
                                                  scheme if kind == "sd" else None)
    spec = E.StepSpec(cfg, SAMPLINGS[sampling], (2,), eng.ex)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    if kind == "prefill":
        fn, args = jax.jit(functools.partial(E.prefill, spec), donate_argnums=(1,)), (
            weights, state, i32(batch, prompt_bucket), i32(batch), i32(batch))
    elif kind == "ar":
        fn, args = jax.jit(functools.partial(E.ar_step, spec), donate_argnums=(1,)), (weights, state)
    elif kind == "sd":
        fn, args = jax.jit(functools.partial(E.sd_step, spec, gamma), donate_argnums=(2,)), (weights, drafter, state)
    elif kind == "compact":
        fn, args = jax.jit(functools.partial(E.compact, spec)), (state, i32(max(1, batch // 2)))
    else:
        raise ValueError(kind)
    if place is not None:
        args = jax.tree_util.tree_map(place, args)
    return fn.trace(*args)


def expected_kernels(kind: str, sampling: str, scheme: str) -> set[str]:
    """The Pallas kernels (pallas_call names) a GPU-default step runs."""
    if kind in ("prefill", "ar"):
        return {"ragged_attention"}
    if kind == "sd":
        return {"ragged_attention", f"quant_matmul_{scheme}", "rejection_stats"} | (
            set() if sampling == "greedy" else {"rejection_residual"})
    return set()


def check_cuda(kind, model, batch, prompt_bucket, sampling="t1", gamma=0, scheme="int4"):
    backend = registry.default_backend("gpu")
    assert backend == "pallas"
    traced = trace_step(kind, model, backend, batch, prompt_bucket, sampling, gamma, scheme)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    kernels = _TRITON.findall(text)
    names = {k[0] for k in kernels}
    want = expected_kernels(kind, sampling, scheme)
    assert names == want, f"{kind} {model} B={batch} P={prompt_bucket}: Triton kernels {names}, expected {want}"
    assert text.count("@__gpu$xla.gpu.triton") == len(kernels)
    assert "mosaic_gpu" not in text
    for name, stages, warps in kernels:
        assert 1 <= int(stages) <= 4 and int(warps) in (1, 2, 4, 8), (name, stages, warps)
    # The drafter's weights reach its matmuls as the whole [L, ...] stacks (read in place at `layer`), not as
    # per-layer slices XLA would copy out of the scan.
    layers = MODELS[model].num_layers
    for line in text.splitlines():
        if "@__gpu$xla.gpu.triton" in line and "quant_matmul" in line:
            operands = re.findall(r"tensor<([^>]*)>", line[line.rfind(": ("):])
            assert operands[3].startswith(f"{layers}x"), f"{kind} {model}: quant_matmul weight {operands[3]}"
    return kernels


# ---- CUDA lowering: fast lane (one step of every kind and kernel class) ---------------------------------
FAST_CUDA = [
    ("prefill", "tiny", 64, 512, "topkp", 0, "int4"),  # query-row tiles of attention
    ("ar", "tiny", 1, 16, "greedy", 0, "int4"),
    ("sd", "tiny", 1, 16, "greedy", 3, "int8"),  # greedy rejection (stats only)
    ("sd", "tiny", 64, 512, "topkp", 7, "int4"),  # filtered residual pass
    ("compact", "tiny", 64, 512, "t1", 0, "int4"),
    ("sd", "qwen", 64, 512, "topkp", 11, "int4"),  # the largest SD step
]


@pytest.mark.parametrize("kind,model,batch,pb,sampling,gamma,scheme", FAST_CUDA)
def test_lowers_for_cuda(kind, model, batch, pb, sampling, gamma, scheme):
    check_cuda(kind, model, batch, pb, sampling, gamma, scheme)


def _slow_grid():
    """Per model x batch {1, 64} x prompt bucket {16, 512}: prefill and AR under every sampling, SD for every
    γ x scheme (the sampling cycles so each scheme meets each sampling), one compaction; and the full
    sampling x γ x scheme product of SD at the largest shape (Qwen, 64, 512)."""
    grid = []
    for model in MODELS:
        for batch in (1, 64):
            for pb in (16, 512):
                for s in SAMPLINGS:
                    grid += [("prefill", model, batch, pb, s, 0, "int4"), ("ar", model, batch, pb, s, 0, "int4")]
                names = list(SAMPLINGS)
                for i, (g, sch) in enumerate((g, sch) for g in GAMMAS for sch in SCHEMES):
                    grid.append(("sd", model, batch, pb, names[i % 3], g, sch))
                if batch > 1:
                    grid.append(("compact", model, batch, pb, "t1", 0, "int4"))
    grid += [("sd", "qwen", 64, 512, s, g, sch) for s in SAMPLINGS for g in GAMMAS for sch in SCHEMES]
    return sorted(set(grid) - set(FAST_CUDA), key=lambda r: (list(MODELS).index(r[1]), r))


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_every_step_lowers_for_cuda(model):
    rows = [r for r in _slow_grid() if r[1] == model]
    failures = []
    for row in rows:
        try:
            check_cuda(*row)
        except Exception as e:  # collect all, report every failing step
            failures.append(f"{row}: {type(e).__name__}: {str(e)[:300]}")
    assert not failures, f"{len(failures)} of {len(rows)} steps failed:\n" + "\n".join(failures)


# ---- TPU compile (libtpu compile-only devices) --------------------------------------------------------
TOPOLOGIES = ("v5e:2x2", "v6e:2x2")


def _require(module: str, what: str):
    """Skip without `module` (fail under CI=true: CI installs the accel-compile extra)."""
    if importlib.util.find_spec(module) is None:
        msg = f'{what} is not installed (pip install -e ".[accel-compile]"): this compile test cannot run'
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " -- CI must install the accel-compile extra")
        pytest.skip(msg)


def _tpu_device(topology: str):
    _require("libtpu", "libtpu")
    from jax.experimental import topologies
    return topologies.get_topology_desc(topology, "tpu").devices[0]


def compile_tpu(topology, kind, model, batch, pb, sampling="t1", gamma=0, scheme="int4"):
    backend = registry.default_backend("tpu")
    sharding = jax.sharding.SingleDeviceSharding(_tpu_device(topology))
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
    compiled = trace_step(kind, model, backend, batch, pb, sampling, gamma, scheme, place).lower().compile()
    assert compiled.as_text()  # a TPU executable (HLO after TPU passes)
    return compiled


# A TPU compile costs ~5-20 s per tiny step on 2 cores (the Qwen2.5-1.5B SD step: minutes), so the fast
# lane compiles one SD step (the target's verify forward, the drafter's scan, rejection) per topology.
FAST_TPU = [("sd", "tiny", 64, 16, "topkp", 3, "int8")]
SLOW_TPU = [("prefill", "tiny", 64, 16, "topkp", 0, "int4"), ("ar", "tiny", 64, 16, "greedy", 0, "int4"),
            ("sd", "tiny", 1, 16, "t1", 7, "int4"), ("compact", "tiny", 64, 16, "t1", 0, "int4")] + [
    (kind, "smollm2", 64, 512, s, g, sch) for kind, s, g, sch in (
        ("prefill", "topkp", 0, "int4"), ("ar", "t1", 0, "int4"), ("sd", "t1", 7, "int4"),
        ("sd", "greedy", 11, "int8"), ("compact", "t1", 0, "int4"))] + [("sd", "qwen", 64, 512, "t1", 7, "int4")]


@pytest.mark.slow  # ~30 s per topology; the fast lane keeps the CUDA lowerings
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_tpu_default_steps_compile(topology):
    assert registry.default_backend("tpu") == "xla"
    for row in FAST_TPU:
        compile_tpu(topology, *row)


@pytest.mark.slow
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_tpu_default_steps_compile_at_real_shapes(topology):
    # CI time (measured, 2 cores): every step on v6e ~460 s (Qwen2.5-1.5B's SD step alone: minutes), so v5e,
    # whose tiling rules are v6e's, compiles the tiny steps and SmolLM2's SD step only.
    for row in SLOW_TPU:
        if topology.startswith("v6e") or row[1] == "tiny" or row[:2] == ("sd", "smollm2"):
            compile_tpu(topology, *row)


# ---- CUDA compile without a GPU (deviceless XLA compilation for an H100 target) ----------------------------
# XLA's GPU target description of an H100 SXM (xla/backends/gpu/target_config specs).
H100 = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
runtime_version: { major: 12 minor: 8 patch: 0 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
CUDA_COMPILE = [("ar", "tiny", 1, 16, "greedy", 0, "int4"), ("prefill", "tiny", 64, 512, "topkp", 0, "int4"),
                ("sd", "tiny", 64, 512, "topkp", 7, "int4"), ("sd", "tiny", 1, 16, "greedy", 3, "int8"),
                ("compact", "tiny", 64, 512, "t1", 0, "int4"), ("sd", "smollm2", 64, 512, "t1", 11, "int8"),
                ("prefill", "qwen", 64, 512, "t1", 0, "int4"), ("sd", "qwen", 64, 512, "topkp", 7, "int4")]


def compile_cuda(rows):
    """Compile `rows` for a compile-only H100 (needs the CUDA plugin, registered under JAX_PLATFORMS=cpu)."""
    from jax.experimental import topologies
    device = topologies.get_topology_desc("h100", "cuda", target_config=H100, topology="1x1x1").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
    for row in rows:
        kind, model, batch, pb, sampling, gamma, scheme = row
        compiled = trace_step(kind, model, "pallas", batch, pb, sampling, gamma, scheme, place).lower().compile()
        text = compiled.as_text()
        want = expected_kernels(kind, sampling, scheme)
        missing = [k for k in want if k not in text]
        assert not missing, f"{row}: compiled without kernels {missing}"
        print("compiled for H100:", row, flush=True)


@pytest.mark.slow
def test_steps_compile_for_h100_without_a_gpu():
    _require("jax_plugins.xla_cuda12", "jax's CUDA plugin (jax-cuda12-plugin)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "cuda-compile"], env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("compiled for H100:") == len(CUDA_COMPILE)


if __name__ == "__main__" and sys.argv[1:] == ["cuda-compile"]:
    compile_cuda(CUDA_COMPILE)
