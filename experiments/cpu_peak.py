"""This machine's vector arithmetic peak: the compute roofline of the native kernels (docs/cpu_profile.md).

    python experiments/cpu_peak.py [--out cpu_peak_cpu.json]

Compiles a small C program (the extension's compiler, `CXX` or g++) that runs 12 independent chains of one
512-bit instruction per thread — vfmadd231ps (f32 FMA), vdpbf16ps (avx512_bf16) and vpdpbusd (avx512_vnni),
each where the CPU has it — on 1 thread and on every CPU of the process's affinity at once, and reports
instructions / s and multiply-adds / s (16, 32 and 64 per instruction). AVX-512 only: elsewhere it says so.
Writes experiments/results/<out>.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402

SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHAINS(T, INIT, OP)                                                                            \
  T a0 = INIT(1), a1 = INIT(2), a2 = INIT(3), a3 = INIT(4), a4 = INIT(5), a5 = INIT(6), a6 = INIT(7),     \
    a7 = INIT(8), a8 = INIT(9), a9 = INIT(10), a10 = INIT(11), a11 = INIT(12);                            \
  for (long i = 0; i < n; ++i) {                                                                        \
    OP(a0) OP(a1) OP(a2) OP(a3) OP(a4) OP(a5) OP(a6) OP(a7) OP(a8) OP(a9) OP(a10) OP(a11)                \
    __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), \
                     "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11)); /* every chain stays live and distinct */  \
  }

#define FINIT(v) _mm512_set1_ps(0.1f * (v))
#define FMA(x) x = _mm512_fmadd_ps(x, b, c);
__attribute__((target("avx512f"))) static void fma_f32(long n) {
  const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-4f);
  CHAINS(__m512, FINIT, FMA)
}
#define BF(x) x = _mm512_dpbf16_ps(x, h, h);
__attribute__((target("avx512f,avx512bf16"))) static void dp_bf16(long n) {
  const __m512bh h = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  CHAINS(__m512, FINIT, BF)
}
#define IINIT(v) _mm512_set1_epi32(v)
#define VNNI(x) x = _mm512_dpbusd_epi32(x, u, s8);
__attribute__((target("avx512f,avx512vnni"))) static void dp_int8(long n) {
  const __m512i u = _mm512_set1_epi32(0x01020304), s8 = _mm512_set1_epi32(0x05060708);
  CHAINS(__m512i, IINIT, VNNI)
}

typedef void (*Kernel)(long);
static Kernel kern;
static long iters;
static void* run(void* arg) { (void)arg; kern(iters); return NULL; }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

int main(int argc, char** argv) {  // argv: kernel name, threads, iterations
  kern = !strcmp(argv[1], "fma_f32") ? fma_f32 : !strcmp(argv[1], "dp_bf16") ? dp_bf16 : dp_int8;
  const int threads = atoi(argv[2]);
  iters = atol(argv[3]);
  pthread_t t[256];
  const double t0 = now();
  for (int i = 0; i < threads; ++i) pthread_create(&t[i], NULL, run, NULL);
  for (int i = 0; i < threads; ++i) pthread_join(t[i], NULL);
  printf("%.6f\n", now() - t0);
  return 0;
}
"""

KERNELS = {"fma_f32": ("avx512f", 16), "dp_bf16": ("avx512_bf16", 32), "dp_int8": ("avx512_vnni", 64)}


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=100_000_000, help="loop iterations (12 instructions each) per thread")
    p.add_argument("--out", default="cpu_peak_cpu.json")
    args = p.parse_args(argv)
    flags = cpu_flags()
    if "avx512f" not in flags:
        print("cpu_peak: this CPU has no AVX-512; nothing measured")
        return 0
    cpus = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "peak.c"), os.path.join(d, "peak")
        with open(src, "w") as f:
            f.write(SOURCE)
        cc = os.environ.get("CC", "gcc")
        subprocess.run([cc, "-O2", "-pthread", src, "-o", exe], check=True)
        for name, (flag, macs) in KERNELS.items():
            if flag not in flags:
                continue
            for threads in sorted({1, cpus}):
                wall = float(subprocess.run([exe, name, str(threads), str(args.iters)], check=True,
                                            capture_output=True, text=True).stdout)
                per_s = 12 * args.iters * threads / wall
                rows.append(dict(kernel=name, threads=threads, wall_s=wall, ginstr_per_s=per_s / 1e9,
                                 gmac_per_s=per_s * macs / 1e9))
                print(f"{name:8s} {threads} thread(s): {per_s / 1e9:6.2f} G instructions/s, "
                      f"{per_s * macs / 1e9:7.1f} G multiply-adds/s", flush=True)
    path = write_json(args.out, dict(benchmark="cpu_peak", machine=machine(), cpus=cpus, iters=args.iters, rows=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
