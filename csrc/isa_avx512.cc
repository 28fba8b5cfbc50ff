// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma; run only where
// the dispatcher saw all of those). Same code as the AVX2 unit (kernel_impl.h) at 16 lanes.
// isa_avx512bf16.cc compiles this file again with ER_NATIVE_AVX512_BF16 defined and -mavx512bf16: the same
// kernels, plus vdpbf16ps for bf16 activations times bf16 panel weights (run only where the CPU has it).
#include <immintrin.h>

#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "er_native.h"

namespace er_native {
namespace {

struct V {
  using F = __m512;
  using I = __m512i;
  static constexpr int W = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F bcast(float s) { return _mm512_set1_ps(s); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static I load_u8_i32(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F cvt_u8(const uint8_t* p) { return _mm512_cvtepi32_ps(load_u8_i32(p)); }
  static void load_u4(const uint8_t* p, F& lo, F& hi) {
    const I v = load_u8_i32(p);
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F and_ge(F x, F y, F v) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, y, _CMP_GE_OQ), v); }
  static F floor(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static F pow2i(F n) {  // 2^n for integral n in [-126, 127]
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  static void hsum4(const F* x, float* out) {
    for (int i = 0; i < 4; ++i) out[i] = hsum(x[i]);
  }
};

// 32 zmm registers: M == 1: 1 x 8 vectors (128 columns); M == 2: 2 x 8; M >= 3: 6 x 4 (24 accumulators).
constexpr int kMR1 = 1, kNV1 = 8, kMR2 = 2, kNV2 = 8, kMRB = 6, kNVB = 4;

// Rows of W swept together: kKR at M <= 8 (contiguous row streams per thread), kKRB beyond (run_fmt).
// Both divide the int4 group size (128) and are even.
constexpr int kKR = 8, kKRB = 32;

// Panel-major weights (1 vector per panel): M = 1: 8 panels; M = 2: 2 x 4; M >= 3: 6 rows x 4 panels.
constexpr int kPNP1 = 8, kPNP2 = 4, kPMRB = 6, kPNPB = 4;

#include "kernel_impl.h"

#ifndef ER_NATIVE_AVX512_BF16
const Kernels kTable = {"avx512", kAvx512, kNV1 * V::W, kKR, run_block, attend, sample_row};
#else
// ---------------------------------------------------------------------------------------------------
// bf16 x times bf16 panel weights with vdpbf16ps: one instruction does 16 lanes x 2 multiply-adds, lane i
// += a[2i] * b[2i] + a[2i + 1] * b[2i + 1], the products of two bf16 exact in f32, the sums rounded to f32
// (with denormal inputs and outputs flushed to zero, the instruction's fixed mode). A pair is two
// consecutive rows of K: one 64-byte load holds rows k, k + 1 of a 16-column panel, and one vpermw
// interleaves them into the (k, k + 1) pairs of each column; x's pair (x[k], x[k + 1]) is one 32-bit
// broadcast. The permute is paid once per M tile of 6 rows (6 x 4 vdpbf16ps per 4 permutes); the panel
// layout is left as the other ISAs read it (docs/native.md, "bf16 activations").
template <int MR, int NP, bool PF>
static inline void panel_tile_dp(const Problem& p, int64_t k0, int64_t k1, int64_t j0, int64_t m0, float* sc,
                                 int64_t ss) {
  alignas(64) static constexpr int16_t kPairs[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i perm = _mm512_load_si512(kPairs);
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  const uint16_t* x = p.xb + m0 * p.k;
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_setzero_ps();
  const int64_t stride = p.rows * kPanelCols, base = j0 * stride;  // elements between panels; panel j0's start
  int64_t k = k0;
  for (; k + 2 <= k1; k += 2) {
    __m512bh wv[NP];
    for (int q = 0; q < NP; ++q)
      wv[q] = (__m512bh)_mm512_permutexvar_epi16(perm, _mm512_loadu_si512(w + base + q * stride + k * kPanelCols));
    if constexpr (PF)  // rows k, k + 1 of the next NP panels: one 64-byte line each
      for (int q = 0; q < NP; ++q) __builtin_prefetch(w + base + (q + NP) * stride + k * kPanelCols);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * p.k + k, 4);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
      for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], wv[q], b);
    }
  }
  if (k < k1) {  // an odd last row (odd K): plain f32 FMAs on x's f32 copy
    for (int q = 0; q < NP; ++q) {
      const __m512 wq = V::load_bf16(w + base + q * stride + k * kPanelCols);
      for (int m = 0; m < MR; ++m) acc[m][q] = V::fma(V::bcast(p.x[(m0 + m) * p.xs + k]), wq, acc[m][q]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) {
      float* d = sc + m * ss + q * kPanelCols;
      V::store(d, V::add(V::load(d), acc[m][q]));
    }
}

template <int R, int NP>
static inline void panel_rem_dp(int64_t r, bool pf, const Problem& p, int64_t k0, int64_t k1, int64_t j0, int64_t m0,
                                float* sc, int64_t ss) {
  if constexpr (R >= 1) {
    if (r != R) return panel_rem_dp<R - 1, NP>(r, pf, p, k0, k1, j0, m0, sc, ss);
    if (pf) panel_tile_dp<R, NP, true>(p, k0, k1, j0, m0, sc, ss);
    else panel_tile_dp<R, NP, false>(p, k0, k1, j0, m0, sc, ss);
  }
}

// As panel_group / run_panels_mr (kernel_impl.h), k blocks of kPanelKC rows (even: pairs never straddle).
template <int MR, int NP>
static void panel_group_dp(const Problem& p, int64_t k0, int64_t k1, int64_t j0, float* sc, int64_t ss) {
  for (int64_t kb = k0; kb < k1; kb += kPanelKC) {
    const int64_t ke = imin(kb + kPanelKC, k1);
    int64_t m = 0;
    for (; m + MR <= p.m; m += MR) {
      if (m == 0) panel_tile_dp<MR, NP, true>(p, kb, ke, j0, m, sc, ss);
      else panel_tile_dp<MR, NP, false>(p, kb, ke, j0, m, sc + m * ss, ss);
    }
    if (m < p.m) panel_rem_dp<MR - 1, NP>(p.m - m, m == 0, p, kb, ke, j0, m, sc + m * ss, ss);
  }
}

template <int MR, int NP>
static void run_panels_dp_mr(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc) {
  for_panel_groups<NP>(c0, c1, acc, [&](auto np, int64_t j, float* sc, int64_t ss) {
    panel_group_dp<MR, decltype(np)::value>(p, k0, k1, j, sc, ss);
  });
}

static void run_block_bf16(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc,
                           bool accumulate) {
  if (p.fmt != kBF16Panel || p.xb == nullptr || (k0 & 1)) return run_block(p, k0, k1, c0, c1, acc, accumulate);
  if (!accumulate) std::memset(acc, 0, sizeof(float) * p.m * (c1 - c0));
  if (p.m == 1) run_panels_dp_mr<1, kPNP1>(p, k0, k1, c0, c1, acc);
  else if (p.m == 2) run_panels_dp_mr<2, kPNP2>(p, k0, k1, c0, c1, acc);
  else run_panels_dp_mr<kPMRB, kPNPB>(p, k0, k1, c0, c1, acc);
}

const Kernels kTable = {"avx512bf16", kAvx512Bf16, kNV1 * V::W, kKR, run_block_bf16, attend, sample_row};
#endif

}  // namespace
}  // namespace er_native

#ifndef ER_NATIVE_AVX512_BF16
extern "C" const er_native::Kernels* er_native_kernels_avx512() { return &er_native::kTable; }
#else
extern "C" const er_native::Kernels* er_native_kernels_avx512bf16() { return &er_native::kTable; }
#endif
