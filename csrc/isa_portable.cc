// Portable C++ kernels (any CPU; compiled with the baseline flags of the target, e.g. SSE2 on x86-64).
// The same code as the SIMD units (kernel_impl.h) over an 8-float array that the compiler vectorizes.
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "er_native.h"

namespace er_native {
namespace {

struct V {
  static constexpr int W = 8;
  struct F { float v[W]; };
  struct I { int32_t v[W]; };
  static F zero() { F r; for (int i = 0; i < W; ++i) r.v[i] = 0.f; return r; }
  static F load(const float* p) { F r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static void store(float* p, F a) { std::memcpy(p, a.v, sizeof a.v); }
  static F bcast(float s) { F r; for (int i = 0; i < W; ++i) r.v[i] = s; return r; }
  static F fma(F a, F b, F c) { for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
  static F add(F a, F b) { for (int i = 0; i < W; ++i) a.v[i] += b.v[i]; return a; }
  static F load_bf16(const uint16_t* p) {
    F r;
    for (int i = 0; i < W; ++i) {
      const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
      std::memcpy(&r.v[i], &u, 4);
    }
    return r;
  }
  static void store_bf16(uint16_t* p, F a) {  // round to nearest even; NaN stays NaN (quiet)
    for (int i = 0; i < W; ++i) {
      uint32_t u;
      std::memcpy(&u, &a.v[i], 4);
      p[i] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  static F load_i8(const int8_t* p) { F r; for (int i = 0; i < W; ++i) r.v[i] = static_cast<float>(p[i]); return r; }
  static I load_u8_i32(const uint8_t* p) { I r; for (int i = 0; i < W; ++i) r.v[i] = p[i]; return r; }
  static F fnmadd(F a, F b, F c) { for (int i = 0; i < W; ++i) c.v[i] -= a.v[i] * b.v[i]; return c; }
  static F mul(F a, F b) { for (int i = 0; i < W; ++i) a.v[i] *= b.v[i]; return a; }
  static F div(F a, F b) { for (int i = 0; i < W; ++i) a.v[i] /= b.v[i]; return a; }
  static F cvt_u8(const uint8_t* p) { F r; for (int i = 0; i < W; ++i) r.v[i] = static_cast<float>(p[i]); return r; }
  static I load_i32(const uint8_t* p) { I r; std::memcpy(r.v, p, sizeof r.v); return r; }
  template <int S>
  static F u4(I v) {  // the nibble at bit S of each lane as f32
    F r;
    for (int i = 0; i < W; ++i) r.v[i] = static_cast<float>((static_cast<uint32_t>(v.v[i]) >> S) & 15u);
    return r;
  }
  static void load_u4(const uint8_t* p, F& lo, F& hi) {
    for (int i = 0; i < W; ++i) {
      lo.v[i] = static_cast<float>(p[i] & 15);
      hi.v[i] = static_cast<float>(p[i] >> 4);
    }
  }
  static F max(F a, F b) { for (int i = 0; i < W; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return a; }
  static F and_ge(F x, F y, F v) { for (int i = 0; i < W; ++i) v.v[i] = x.v[i] >= y.v[i] ? v.v[i] : 0.f; return v; }
  static F floor(F a) { for (int i = 0; i < W; ++i) a.v[i] = std::floor(a.v[i]); return a; }
  static F pow2i(F n) { for (int i = 0; i < W; ++i) n.v[i] = std::ldexp(1.f, static_cast<int>(n.v[i])); return n; }
  static float hsum(F a) { float s = 0.f; for (int i = 0; i < W; ++i) s += a.v[i]; return s; }
  static void hsum4(const F* x, float* out) {
    for (int i = 0; i < 4; ++i) out[i] = hsum(x[i]);
  }
  static float hmax(F a) { float m = a.v[0]; for (int i = 1; i < W; ++i) m = a.v[i] > m ? a.v[i] : m; return m; }
};

constexpr int kMR1 = 1, kNV1 = 4, kMR2 = 2, kNV2 = 2, kMRB = 4, kNVB = 2;

// Rows of W swept together: kKR at M <= 8 (contiguous row streams per thread), kKRB beyond (run_fmt).
// Both divide the int4 group size (128) and are even.
constexpr int kKR = 8, kKRB = 32;

constexpr int kPNP1 = 4, kPNP2 = 2, kPMRB = 4, kPNPB = 1;  // panel-major weights, as AVX2's

#include "kernel_impl.h"

const Kernels kTable = {"portable", kPortable, kNV1 * V::W, kPNPB * kPanelCols, kKR, run_block, attend, sample_row, rows};

}  // namespace
}  // namespace er_native

extern "C" const er_native::Kernels* er_native_kernels_portable() { return &er_native::kTable; }
