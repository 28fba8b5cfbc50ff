// AVX2 + FMA kernels (compiled with -mavx2 -mfma -mf16c; run only where the dispatcher saw those).
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
  using F = __m256;
  using I = __m256i;
  static constexpr int W = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F bcast(float s) { return _mm256_set1_ps(s); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store_bf16(uint16_t* p, F v) {  // round to nearest even; NaN stays NaN (quiet)
    const __m256i u = _mm256_castps_si256(v);
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))), 16);
    const __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i h = _mm256_blendv_epi8(r, q, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);  // lanes' low halves
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static F load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static I load_u8_i32(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F cvt_u8(const uint8_t* p) { return _mm256_cvtepi32_ps(load_u8_i32(p)); }
  static I load_i32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  template <int S>
  static F u4(I v) {  // the nibble at bit S of each lane as f32
    return _mm256_cvtepi32_ps(_mm256_and_si256(S == 0 ? v : _mm256_srli_epi32(v, S), _mm256_set1_epi32(15)));
  }
  static void load_u4(const uint8_t* p, F& lo, F& hi) {
    const I v = load_u8_i32(p);
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F and_ge(F x, F y, F v) { return _mm256_and_ps(_mm256_cmp_ps(x, y, _CMP_GE_OQ), v); }  // x >= y ? v : 0
  static F floor(F a) { return _mm256_floor_ps(a); }
  static F pow2i(F n) {  // 2^n for integral n in [-126, 127]
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static void hsum4(const F* x, float* out) {  // the sums of x[0 .. 4) (one transpose-reduce)
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  static float hmax(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
};

// 16 ymm registers: M == 1: 1 x 8 vectors (64 columns, 8 independent FMA chains); M == 2: 2 x 4;
// M >= 3: 6 x 2 (12 accumulators, the classic f32 micro-tile).
constexpr int kMR1 = 1, kNV1 = 8, kMR2 = 2, kNV2 = 4, kMRB = 6, kNVB = 2;

// Rows of W swept together: kKR at M <= 8 (contiguous row streams per thread), kKRB beyond (run_fmt).
// Both divide the int4 group size (128) and are even.
constexpr int kKR = 8, kKRB = 16;  // 16: at M = 32, 16 rows ran 10-25% faster than 32 (this CPU)

// Panel-major weights (2 vectors per panel): M = 1: 4 panels (8 accumulators, 4 streams); M = 2: 2 x 2;
// M >= 3: 6 rows x 1 panel.
constexpr int kPNP1 = 4, kPNP2 = 2, kPMRB = 6, kPNPB = 1;

#include "kernel_impl.h"

const Kernels kTable = {"avx2", kAvx2, kNV1 * V::W, kPNPB * kPanelCols, kKR, run_block, attend, sample_row, rows};

}  // namespace
}  // namespace er_native

extern "C" const er_native::Kernels* er_native_kernels_avx2() { return &er_native::kTable; }
