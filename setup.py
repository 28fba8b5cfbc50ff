"""Builds er_jax's optional native CPU kernels (csrc/) as er_jax/kernels/_er_jax_native*.so.

Everything else about the package lives in pyproject.toml; this file only adds the extension. The build
is optional: without a C++17 compiler (or with ER_JAX_NATIVE_BUILD=0) the install still succeeds and
`er_jax.kernels.native.why_unavailable()` says the kernels were not built. The kernels are plain XLA FFI
handlers loaded with ctypes (no Python C API), compiled against the FFI headers that jaxlib ships
(`jax.ffi.include_dir()`), which is why jaxlib is a build requirement in pyproject.toml.

Per-ISA code is in separate translation units compiled with their own -m flags (csrc/isa_*.cc); the
dispatcher (csrc/er_native.cc) is compiled for the baseline target and picks one at run time, so the
binary runs on any x86-64. Other architectures build the portable kernels only.
"""
import concurrent.futures
import glob
import importlib.util
import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
COMMON_FLAGS = ["-O3", "-g0", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fno-math-errno"]
X86 = platform.machine().lower() in ("x86_64", "amd64", "x64")
ISA_UNITS = [("isa_portable.cc", [])]
if X86:
    ISA_UNITS += [
        ("isa_avx2.cc", ["-mavx2", "-mfma", "-mf16c"]),
        ("isa_avx512.cc", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                           "-Wno-maybe-uninitialized"]),  # GCC's own _mm512_undefined_* in avx512fintrin.h
    ]
    ISA_UNITS.append(("isa_avx512bf16.cc", ISA_UNITS[-1][1] + ["-mavx512bf16"]))
    ISA_UNITS.append(("isa_amx.cc", ISA_UNITS[-1][1] + ["-mamx-tile", "-mamx-bf16"]))


def ffi_include_dir() -> str:
    """jaxlib's XLA FFI headers, found without importing jax."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("jaxlib (which ships the XLA FFI headers) is not installed in the build environment")
    inc = os.path.join(list(spec.submodule_search_locations)[0], "include")
    if not os.path.exists(os.path.join(inc, "xla", "ffi", "api", "ffi.h")):
        raise RuntimeError(f"no XLA FFI headers under {inc}")
    return inc


class OptionalBuildExt(build_ext):
    """build_ext that compiles the ISA units with their own flags and never fails the install."""

    def run(self):
        if os.environ.get("ER_JAX_NATIVE_BUILD", "1") == "0":
            self._skip("ER_JAX_NATIVE_BUILD=0")
            return
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - no compiler / headers / a compile error: install without it
            self._skip(e)

    def build_extension(self, ext):
        inc = ffi_include_dir()
        ext.include_dirs = [CSRC]
        ext.extra_compile_args = COMMON_FLAGS + ["-isystem", inc]
        tmp = os.path.join(self.build_temp, "er_jax_native")
        os.makedirs(tmp, exist_ok=True)

        def compile_unit(unit):
            src, flags = unit
            return self.compiler.compile([os.path.join(CSRC, src)], output_dir=tmp, include_dirs=[CSRC],
                                         extra_postargs=COMMON_FLAGS + flags)[0]

        workers = max(1, min(len(ISA_UNITS), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            ext.extra_objects = list(pool.map(compile_unit, ISA_UNITS))
        super().build_extension(ext)

    def _skip(self, why):
        msg = (f"er_jax: the native CPU kernels were not built ({why}); er_jax works without them "
               f"(XLA is used). Install a C++17 compiler and reinstall to build them.")
        print("WARNING: " + msg, file=sys.stderr)


setup(
    ext_modules=[Extension("er_jax.kernels._er_jax_native", sources=[os.path.join(CSRC, "er_native.cc")],
                           # every unit and header: an edit to any of them relinks (the ISA units are extra objects)
                           depends=sorted(glob.glob(os.path.join(CSRC, "*"))),
                           language="c++", extra_link_args=["-pthread"])],
    cmdclass={"build_ext": OptionalBuildExt},
)
