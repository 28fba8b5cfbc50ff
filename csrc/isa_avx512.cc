// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma; run only where
// the dispatcher saw all of those). Same code as the AVX2 unit (kernel_impl.h) at 16 lanes.
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

const Kernels kTable = {"avx512", kAvx512, kNV1 * V::W, kKR, run_block, attend, sample_row};

}  // namespace
}  // namespace er_native

extern "C" const er_native::Kernels* er_native_kernels_avx512() { return &er_native::kTable; }
