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
  static void store_bf16(uint16_t* p, F v) {  // round to nearest even; NaN stays NaN (quiet)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
    const __m512i q = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __m512i h = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, q);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(h));
  }
  static F load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static I load_u8_i32(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F cvt_u8(const uint8_t* p) { return _mm512_cvtepi32_ps(load_u8_i32(p)); }
  static I load_i32(const uint8_t* p) { return _mm512_loadu_si512(p); }
  template <int S>
  static F u4(I v) {  // the nibble at bit S of each lane as f32: vpermps reads an index's low 4 bits only
    const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_permutexvar_ps(S == 0 ? v : _mm512_srli_epi32(v, S), codes);
  }
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
const Kernels kTable = {"avx512", kAvx512, kNV1 * V::W, kPNPB * kPanelCols, kKR, run_block, attend, sample_row, rows};
#else
// ---------------------------------------------------------------------------------------------------
// bf16 x times bf16 panel weights with vdpbf16ps: one instruction does 16 lanes x 2 multiply-adds, lane i
// += a[2i] * b[2i] + a[2i + 1] * b[2i + 1], the products of two bf16 exact in f32, the sums rounded to f32
// (with denormal inputs and outputs flushed to zero, the instruction's fixed mode). A pair is two
// consecutive rows of K: one 64-byte load holds rows k, k + 1 of a 16-column panel, and one vpermw
// interleaves them into the (k, k + 1) pairs of each column; x's pair (x[k], x[k + 1]) is one 32-bit
// broadcast. The permute is paid once per M tile of 6 rows (6 x 4 vdpbf16ps per 4 permutes); the panel
// layout is left as the other ISAs read it (docs/native.md, "bf16 activations").
alignas(64) static constexpr int16_t kPairs[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// A k block of NP bf16 panels for vdpbf16ps: panel q's row k at w + q * stride + 16 k (paired: rows k, k + 1
// already interleaved into pairs, 32 values per pair of rows), `rows` rows; x: the block's first bf16 of the
// tile's first M row (row stride xs); xo: f32 x at the block's last row (row stride xos), read only for an odd
// row count (bf16 panels of odd K); gs: int4's group scale for the NP panels' columns, else nullptr.
struct DpBlock {
  const uint16_t* w;
  int64_t stride, rows;
  const uint16_t* x;
  int64_t xs;
  const float* xo;
  int64_t xos;
  const float* gs;
};

template <int MR, int NP, bool PAIRED, bool PF>
static inline void dp_tile(const DpBlock& b, int64_t m0, float* sc, int64_t ss) {
  constexpr int kLocality = MR > 2 ? 1 : 3;  // prefetcht2 for the tiles of many rows (the lines wait for a while)
  const __m512i perm = _mm512_load_si512(kPairs);
  const uint16_t* x = b.x + m0 * b.xs;
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 <= b.rows; k += 2) {
    __m512bh wv[NP];
    for (int q = 0; q < NP; ++q) {
      const __m512i v = _mm512_loadu_si512(b.w + q * b.stride + k * kPanelCols);
      wv[q] = (__m512bh)(PAIRED ? v : _mm512_permutexvar_epi16(perm, v));
    }
    if constexpr (PF)  // one 64-byte line (rows k, k + 1) a panel: see kStreamAhead
      for (int q = 0; q < NP; ++q) {
        const uint16_t* line = b.w + q * b.stride + k * kPanelCols;
        __builtin_prefetch(MR <= 2 ? reinterpret_cast<const char*>(line) + kStreamAhead
                                   : reinterpret_cast<const char*>(line + NP * b.stride), 0, kLocality);
      }
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * b.xs + k, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], wv[q], xv);
    }
  }
  if (k < b.rows) {  // an odd last row (bf16 panels of odd K): plain f32 FMAs on x's f32 copy
    for (int q = 0; q < NP; ++q) {
      const __m512 wq = V::load_bf16(b.w + q * b.stride + k * kPanelCols);
      for (int m = 0; m < MR; ++m) acc[m][q] = V::fma(V::bcast(b.xo[(m0 + m) * b.xos]), wq, acc[m][q]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) {
      float* d = sc + m * ss + q * kPanelCols;
      V::store(d, b.gs ? V::fma(acc[m][q], V::load(b.gs + q * kPanelCols), V::load(d)) : V::add(V::load(d), acc[m][q]));
    }
}

template <int R, int NP, bool PAIRED>
static inline void dp_rem(int64_t r, bool pf, const DpBlock& b, int64_t m0, float* sc, int64_t ss) {
  if constexpr (R >= 1) {
    if (r != R) return dp_rem<R - 1, NP, PAIRED>(r, pf, b, m0, sc, ss);
    if (pf) dp_tile<R, NP, PAIRED, true>(b, m0, sc, ss);
    else dp_tile<R, NP, PAIRED, false>(b, m0, sc, ss);
  }
}

// All M rows of one block in tiles of MR (sc = &scratch[0, 16 j0 - c0]); when the panels stream from memory
// (not from a converted L1 block) the last tile prefetches the next panels' rows: the other tiles re-read
// this block from the caches, and the first (DRAM-bound) tile then finds the next block in L2.
template <int MR, int NP, bool PAIRED>
static inline void dp_rows(const Problem& p, const DpBlock& b, float* sc, int64_t ss) {
  const int64_t last = p.m >= MR ? (p.m / MR - 1) * MR : 0;  // the last full tile's first row (or the only one)
  for (int64_t m = 0; m < p.m; m += MR) {
    const bool pf = m == last && !PAIRED;
    if (m + MR > p.m) dp_rem<MR - 1, NP, PAIRED>(p.m - m, pf, b, m, sc + m * ss, ss);
    else if (pf) dp_tile<MR, NP, PAIRED, true>(b, m, sc + m * ss, ss);
    else dp_tile<MR, NP, PAIRED, false>(b, m, sc + m * ss, ss);
  }
}

// bf16 panels, as panel_group (kernel_impl.h) but all rows [k0, k1) as one block: each tile's accumulators stay
// in registers over the whole of K (kernel_impl.h's panel_group has the measurements).
template <int MR, int NP>
static void panel_group_dp(const Problem& p, int64_t k0, int64_t k1, int64_t j0, float* sc, int64_t ss) {
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  const int64_t stride = p.rows * kPanelCols;
  const DpBlock b{w + j0 * stride + k0 * kPanelCols, stride, k1 - k0, p.xb + k0, p.k, p.x + k1 - 1, p.xs, nullptr};
  dp_rows<MR, NP, false>(p, b, sc, ss);
}

// int8 / int4 panels times bf16 x (a bf16 target's activations, or f32 ones rounded to bf16 on request,
// run_matmul): each k block of NP panels is converted once into paired bf16 in an L1 buffer (int8 codes, int4
// code - zero: integers of at most 8 bits, exact in bf16), and every M tile runs vdpbf16ps on it: the products
// are those of the f32 kernels on the same x (exact), only the order of the f32 sums differs. int4's block is
// one group, its scale applied to the group's sums; int8's per-column scale stays in finalize(). K is even.
constexpr int64_t kQuantKC = 128;  // rows per converted block (a multiple of AMX's 32): NP x 4 KiB of bf16

template <int FMT, int NP>
static inline void convert_block(const Problem& p, int64_t k0, int64_t k1, int64_t j0, uint16_t* buf) {
  const __m512i perm = _mm512_load_si512(kPairs);
  const int64_t stride = p.rows * kPanelCols;  // elements between panels (int4: bytes)
  const uint8_t* src = static_cast<const uint8_t*>(p.w) + j0 * stride * (FMT == kBF16Panel ? 2 : 1);
  for (int q = 0; q < NP; ++q) {
    const uint8_t* s = src + q * stride;
    uint16_t* d = buf + q * kQuantKC * kPanelCols;
    if constexpr (FMT == kBF16Panel) {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(src) + q * stride;
      for (int64_t k = k0; k < k1; k += 2, d += 2 * kPanelCols) {
        __builtin_prefetch(h + NP * stride + k * kPanelCols);
        _mm512_store_si512(d, _mm512_permutexvar_epi16(perm, _mm512_loadu_si512(h + k * kPanelCols)));
      }
    } else if constexpr (FMT == kInt8Panel) {
      for (int64_t k = k0; k < k1; k += 2, d += 2 * kPanelCols) {
        if ((k & 3) == 0) __builtin_prefetch(s + NP * stride + k * kPanelCols);  // the next panels' line
        const __m512 a = V::load_i8(reinterpret_cast<const int8_t*>(s) + k * kPanelCols);
        const __m512 c = V::load_i8(reinterpret_cast<const int8_t*>(s) + (k + 1) * kPanelCols);
        _mm512_store_si512(d, _mm512_permutexvar_epi16(perm, (__m512i)_mm512_cvtne2ps_pbh(c, a)));
      }
    } else {
      const __m512i z = V::load_u8_i32(p.zero + (k0 / p.group) * p.n + (j0 + q) * kPanelCols);
      const __m512i mask = _mm512_set1_epi32(15);
      for (int64_t r = k0 / 2; r < k1 / 2; r += 4) {  // one line: byte rows r .. r + 3 (rows 2r .. 2r + 7)
        __builtin_prefetch(s + NP * stride + r * kPanelCols);
        const __m512i v = V::load_i32(s + r * kPanelCols);
        const int64_t pairs = imin(4, k1 / 2 - r);
        unroll<4>([&](auto j) {  // pair j: rows 2r + 2j (bits 4j of each lane) and 2r + 2j + 1 (bits 16 + 4j)
          if (j >= pairs) return;
          constexpr int sh = 4 * decltype(j)::value;
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(v, sh), mask), z));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 16 + sh), mask), z));
          _mm512_store_si512(d, _mm512_permutexvar_epi16(perm, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)));
          d += 2 * kPanelCols;
        });
      }
    }
  }
}

template <int FMT, int MR, int NP>
static void panel_group_qdp(const Problem& p, int64_t k0, int64_t k1, int64_t j0, float* sc, int64_t ss) {
  alignas(64) uint16_t buf[NP * kQuantKC * kPanelCols];
  const int64_t B = FMT == kInt4Panel ? p.group : kQuantKC;
  for (int64_t kb = k0; kb < k1; kb += B) {
    const int64_t ke = imin(kb + B, k1);
    convert_block<FMT, NP>(p, kb, ke, j0, buf);
    const float* gs = FMT == kInt4Panel ? p.scale + (kb / B) * p.n + j0 * kPanelCols : nullptr;
    const DpBlock b{buf, kQuantKC * kPanelCols, ke - kb, p.xb + kb, p.k, nullptr, 0, gs};
    dp_rows<MR, NP, true>(p, b, sc, ss);
  }
}

// Quantized panels times bf16 x on vdpbf16ps, converted in registers by row tiles (below): int8 from 3 rows of M
// (at 1-2 the f32 kernel streams as fast), int4 up to kInt4DpMaxM; from there int4 takes the converted-block
// path, which converts each group once into L1 for 6-row tiles. One thread on Zen 4, [576, 3072], cached
// (docs/native.md, "Quantized panels in register tiles"): int8 M = 3 / 6 / 11 / 16 / 64 0.74 / 0.62 / 0.56 /
// 0.75 / 0.93x the time of the previous paths (f32 FMA tiles below 12 rows, the converted block above); int4
// M = 3 / 6 / 11 / 24 / 32 0.50 / 0.56 / 0.77 / 0.92 / 1.02x.
constexpr int64_t kInt4DpMaxM = 31, kInt8DpMinM = 3;

// Register tiles of the vdpbf16ps kernels below for quantized panels: at most kDpMR rows of M, as even as
// possible (M = 12: 6 + 6), so that each pair of K rows a tile converts in registers serves many products;
// with_tile_rows(r, f) calls f(integral_constant<r>) for a tile of r rows.
constexpr int kDpMR = 11;

constexpr int64_t dp_tiles(int64_t m) { return (m + kDpMR - 1) / kDpMR; }

template <int R = kDpMR, class F>
static inline void with_tile_rows(int64_t r, F&& f) {
  if constexpr (R > 1)
    if (r < R) return with_tile_rows<R - 1>(r, f);
  f(std::integral_constant<int, R>{});
}

// Tile t of M's rows: [m0, m0 + rows).
inline void dp_tile_rows(int64_t m, int64_t t, int64_t& m0, int64_t& rows) {
  const int64_t nt = dp_tiles(m), base = m / nt, extra = m % nt;
  m0 = t * base + imin(t, extra);
  rows = base + (t < extra ? 1 : 0);
}

// int8 panels times bf16 x at M >= 3 (the int8 drafter's steps and verifies): each tile converts a pair of K
// rows of its NP panels once, in registers, for MR vdpbf16ps of 32 products, where the f32 tiles took 2 MR
// FMAs per 32 codes: two widen-and-convert to f32, then one vpermt2w takes the high halves of rows k and k + 1
// into (k, k + 1) pairs (a code's f32 has 8 significant bits, so its high half is its exact bf16; one
// instruction where vcvtne2ps2bf16 + vpermw took two: 22.4 against 25.6 cycles per 3 panels x 6 rows in a bare
// loop on Zen 4). Products exact (int8 codes and bf16 x), f32 sums; the scale is finalize()'s. The last tile
// prefetches the next panels' line into L2, as panel_group's.
alignas(64) static constexpr int16_t kHighPairs[32] = {1,  33, 3,  35, 5,  37, 7,  39, 9,  41, 11, 43, 13, 45, 15, 47,
                                                       17, 49, 19, 51, 21, 53, 23, 55, 25, 57, 27, 59, 29, 61, 31, 63};
template <int MR, int NP, bool PF>
static void int8_dp_tile(const Problem& p, int64_t k0, int64_t k1, int64_t j0, int64_t m0, float* sc, int64_t ss) {
  const __m512i high = _mm512_load_si512(kHighPairs);
  const int64_t stride = p.rows * kPanelCols;  // bytes between panels
  const int8_t* w = static_cast<const int8_t*>(p.w) + j0 * stride;
  const uint16_t* x = p.xb + m0 * p.k;
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 2) {
    __m512bh wv[NP];
    for (int q = 0; q < NP; ++q) {
      const int8_t* s = w + q * stride + k * kPanelCols;
      const __m512i a = _mm512_castps_si512(V::load_i8(s)), c = _mm512_castps_si512(V::load_i8(s + kPanelCols));
      wv[q] = (__m512bh)_mm512_permutex2var_epi16(a, high, c);
      if (PF && (k & 3) == 0) __builtin_prefetch(s + NP * stride, 0, 1);
    }
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * p.k + k, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], wv[q], xv);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) {
      float* d = sc + (m0 + m) * ss + q * kPanelCols;
      V::store(d, V::add(V::load(d), acc[m][q]));
    }
}

static void run_int8_dp(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc) {
  int64_t m0, rows;
  dp_tile_rows(p.m, 0, m0, rows);  // the first tile is the widest
  with_tile_rows(rows, [&](auto mr) {
    constexpr int MR = decltype(mr)::value, NP = MR <= 6 ? 4 : 2;  // MR x NP accumulators in 32 zmm
    for_panel_groups<NP>(c0, c1, acc, [&](auto np, int64_t j, float* sc, int64_t ss) {
      constexpr int N = decltype(np)::value;
      for (int64_t t = 0, nt = dp_tiles(p.m); t < nt; ++t) {
        dp_tile_rows(p.m, t, m0, rows);
        const bool last = t == nt - 1;
        if (rows == MR) last ? int8_dp_tile<MR, N, true>(p, k0, k1, j, m0, sc, ss) : int8_dp_tile<MR, N, false>(p, k0, k1, j, m0, sc, ss);
        else if constexpr (MR > 1) last ? int8_dp_tile<MR - 1, N, true>(p, k0, k1, j, m0, sc, ss) : int8_dp_tile<MR - 1, N, false>(p, k0, k1, j, m0, sc, ss);
      }
    });
  });
}

// int4 panels at M <= kInt4DpMaxM (decode, draft and verify rows) on vdpbf16ps, 32 products an instruction
// where the f32 kernel (panel_tile_int4) takes a shift, a vpermps and an FMA per 16 codes and row of x; at M = 1
// this kernel is bound by its vdpbf16ps (two per 32 codes for f32 x: ~25 GB/s a Zen 4 thread). One 64-byte line of a panel (rows 8b .. 8b + 7, panels.py's line order) gives its four row pairs of 16
// columns with one 16-bit shift (none for the first pair) and one vpternlogd each: the code of row 8b + 2j + e
// sits in nibble j of word 2c + e, so (line >> 4j) & 0x000F000F | 0x43004300 puts it under a fixed exponent
// (bits 0x4300 | q = the bf16 128 + q, exact), in lane c's pair e, the pair vdpbf16ps multiplies by
// (x[8b + 2j], x[8b + 2j + 1]). x in bf16 parts: bf16 x (or f32 x holding bf16 values) is one part and the
// products are exact; other f32 x is two, hi = bf16(x), lo = bf16(x - hi), so x' = hi + lo (exact in f32) is
// within 2^-16 |x| of x. The offset comes off with the zero point: sum (q - z) x' = sum (128 + q) x' -
// (128 + z) sum x'. (docs/native.md, "int4 at M <= 2".)
constexpr int kInt4Offset = 128;

template <int J>
static inline __m512bh int4_pairs(__m512i line) {
  const __m512i f = J == 0 ? line : _mm512_srli_epi16(line, 4 * J);
  return (__m512bh)_mm512_ternarylogic_epi32(f, _mm512_set1_epi32(0x000F000F), _mm512_set1_epi32(0x43004300),
                                             0xEA);  // (f & mask) | exponent
}

// Byte rows [r0, r1) (r0 a multiple of 4: whole lines) of one group of NP panels (w: panel j0's first byte,
// panels `stride` bytes apart) times MR rows of x in P parts (xp[(m P + part) R + r - rb]: the pairs of byte
// row r), times the group's scale gs, added into sc (row stride ss).
template <int MR, int NP, int P, bool PF>
static inline void int4_dp_tile(const uint8_t* w, int64_t stride, int64_t r0, int64_t r1, const uint32_t* xp,
                                int64_t R, int64_t rb, const float* gs, float* sc, int64_t ss) {
  __m512 acc[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_setzero_ps();
  for (int64_t r = r0; r < r1; r += 4) {
    __m512i line[NP];
    for (int q = 0; q < NP; ++q) line[q] = _mm512_loadu_si512(w + q * stride + r * kPanelCols);
    if constexpr (PF)  // the first (or only) row tile: ahead in its own streams (kStreamAhead)
      for (int q = 0; q < NP; ++q) __builtin_prefetch(w + q * stride + r * kPanelCols + kStreamAhead);
    const int64_t pairs = imin(4, r1 - r);
    unroll<4>([&](auto j) {
      if (j >= pairs) return;
      __m512bh wv[NP];
      for (int q = 0; q < NP; ++q) wv[q] = int4_pairs<decltype(j)::value>(line[q]);
      for (int m = 0; m < MR; ++m)
        for (int part = 0; part < P; ++part) {
          const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[(m * P + part) * R + r + j - rb]));
          for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_dpbf16_ps(acc[m][q], wv[q], xv);
        }
    });
  }
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) {
      float* d = sc + m * ss + q * kPanelCols;
      V::store(d, V::fma(acc[m][q], V::load(gs + q * kPanelCols), V::load(d)));
    }
}

// x rows [k0, k1) of every M row as P bf16 parts, paired by byte row (a zero for the high nibble of an odd
// K's last byte: x's padding), into xp (see int4_dp_tile), and each group's sum of x' into xsum[m * ng + g].
static void int4_dp_split(const Problem& p, int64_t k0, int64_t k1, int P, int64_t R, uint32_t* xp, float* xsum,
                          int64_t ng) {
  const int64_t n = 2 * R;  // k1 - k0 rounded up to even
  for (int64_t m = 0; m < p.m; ++m) {
    const float* x = p.x + m * p.xs + k0;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t e = imin(n, (g + 1) * p.group);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = g * p.group; k < e; k += 16) {  // group starts are even; a chunk may end past e
        const __mmask16 mask = static_cast<__mmask16>(e - k >= 16 ? 0xffff : (1u << (e - k)) - 1);
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x + k);
        const __m256bh hi = _mm512_cvtneps_pbh(xv);
        const __m512 hf = _mm512_cvtpbh_ps(hi);
        const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(xv, hf));
        sum = _mm512_add_ps(sum, P == 1 ? hf : _mm512_add_ps(hf, _mm512_cvtpbh_ps(lo)));
        const __mmask8 pm = static_cast<__mmask8>(e - k >= 16 ? 0xff : (1u << ((e - k) / 2)) - 1);
        _mm256_mask_storeu_epi32(xp + (m * P) * R + k / 2, pm, (__m256i)hi);
        if (P == 2) _mm256_mask_storeu_epi32(xp + (m * P + 1) * R + k / 2, pm, (__m256i)lo);
      }
      xsum[m * ng + g] = _mm512_reduce_add_ps(sum);
    }
  }
}

// Panels [j0, j0 + NP), group by group, each in row tiles of MR or MR - 1 rows (dp_tile_rows): the first tile
// streams the group's lines from memory (and prefetches ahead in them), the others re-read them from L1.
template <int MR, int NP, int P>
static void int4_dp_group(const Problem& p, int64_t k0, int64_t k1, int64_t j0, float* sc, int64_t ss,
                          const uint32_t* xp, int64_t R) {
  const uint8_t* w = static_cast<const uint8_t*>(p.w) + j0 * p.rows * kPanelCols;
  const int64_t stride = p.rows * kPanelCols, rb = k0 / 2, nt = dp_tiles(p.m);
  int64_t m0[dp_tiles(kInt4DpMaxM)], rows[dp_tiles(kInt4DpMaxM)];
  for (int64_t t = 0; t < nt; ++t) dp_tile_rows(p.m, t, m0[t], rows[t]);
  for (int64_t g = k0 / p.group; g * p.group < k1; ++g) {
    const int64_t r0 = g * p.group / 2, r1 = (imin((g + 1) * p.group, k1) + 1) / 2;
    const float* gs = p.scale + g * p.n + j0 * kPanelCols;
    int4_dp_tile<MR, NP, P, true>(w, stride, r0, r1, xp, R, rb, gs, sc, ss);  // tile 0: the widest
    for (int64_t t = 1; t < nt; ++t) {
      const uint32_t* x = xp + m0[t] * P * R;
      float* d = sc + m0[t] * ss;
      if (rows[t] == MR) int4_dp_tile<MR, NP, P, false>(w, stride, r0, r1, x, R, rb, gs, d, ss);
      else if constexpr (MR > 1) int4_dp_tile<MR - 1, NP, P, false>(w, stride, r0, r1, x, R, rb, gs, d, ss);
    }
  }
}

template <int P>
static void run_int4_dp_p(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc,
                          const uint32_t* xp, int64_t R) {
  int64_t m0, rows;
  dp_tile_rows(p.m, 0, m0, rows);  // the first tile is the widest
  with_tile_rows(rows, [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    constexpr int NP = MR == 1 ? kPNP1 : MR <= 5 ? kPNP2 : 2;  // MR x NP accumulators, NP lines and pairs
    for_panel_groups<NP>(c0, c1, acc, [&](auto np, int64_t j, float* sc, int64_t ss) {
      int4_dp_group<MR, decltype(np)::value, P>(p, k0, k1, j, sc, ss, xp, R);
    });
  });
}

static void run_int4_dp(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc) {
  const int P = p.xb != nullptr ? 1 : 2;  // xb: x's values are bf16 (p.x holds them as f32)
  const int64_t R = (k1 - k0 + 1) / 2, ng = (k1 - k0 + p.group - 1) / p.group;
  thread_local std::vector<uint32_t> xpv;
  thread_local std::vector<float> xsv;
  if (xpv.size() < static_cast<size_t>(p.m * P * R)) xpv.resize(p.m * P * R);
  if (xsv.size() < static_cast<size_t>(p.m * ng)) xsv.resize(p.m * ng);
  uint32_t* xp = xpv.data();
  float* xsum = xsv.data();
  int4_dp_split(p, k0, k1, P, R, xp, xsum, ng);
  if (P == 1) run_int4_dp_p<1>(p, k0, k1, c0, c1, acc, xp, R);
  else run_int4_dp_p<2>(p, k0, k1, c0, c1, acc, xp, R);
  for (int64_t g = 0; g < ng; ++g)  // (zero + 128) times the group's sum of x'
    int4_zero_correction(p, k0 / p.group + g, c0, c1, acc, xsum + g, ng, static_cast<float>(kInt4Offset));
}

static void run_block_bf16(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc,
                           bool accumulate) {
  if (p.fmt == kInt4Panel && p.m <= kInt4DpMaxM) {
    if (!accumulate) std::memset(acc, 0, sizeof(float) * p.m * (c1 - c0));
    return run_int4_dp(p, k0, k1, c0, c1, acc);
  }
  if (p.fmt == kInt8Panel && p.m >= kInt8DpMinM && p.xb != nullptr && p.k % 2 == 0 && k0 % 2 == 0) {
    if (!accumulate) std::memset(acc, 0, sizeof(float) * p.m * (c1 - c0));
    return run_int8_dp(p, k0, k1, c0, c1, acc);
  }
  const bool quant = p.fmt == kInt4Panel && p.group <= kQuantKC && p.k % 2 == 0;  // M > kInt4DpMaxM
  if ((p.fmt != kBF16Panel && !quant) || p.xb == nullptr || (k0 & 1))
    return run_block(p, k0, k1, c0, c1, acc, accumulate);
  if (!accumulate) std::memset(acc, 0, sizeof(float) * p.m * (c1 - c0));
  auto each = [&](auto group) { for_panel_groups<kPNPB>(c0, c1, acc, group); };
  if (p.fmt == kInt4Panel)
    each([&](auto np, int64_t j, float* sc, int64_t ss) { panel_group_qdp<kInt4Panel, kPMRB, decltype(np)::value>(p, k0, k1, j, sc, ss); });
  else if (p.m == 1)
    for_panel_groups<kPNP1>(c0, c1, acc, [&](auto np, int64_t j, float* sc, int64_t ss) { panel_group_dp<1, decltype(np)::value>(p, k0, k1, j, sc, ss); });
  else if (p.m == 2)
    for_panel_groups<kPNP2>(c0, c1, acc, [&](auto np, int64_t j, float* sc, int64_t ss) { panel_group_dp<2, decltype(np)::value>(p, k0, k1, j, sc, ss); });
  else
    each([&](auto np, int64_t j, float* sc, int64_t ss) { panel_group_dp<kPMRB, decltype(np)::value>(p, k0, k1, j, sc, ss); });
}

#ifdef ER_NATIVE_AMX
// ---------------------------------------------------------------------------------------------------
// AMX (amx_bf16): TDPBF16PS multiplies a tile of up to 16 rows x 32 bf16 of x by a tile of 16 pair rows x 16
// columns (the paired layout convert_block writes: one 64-byte row per pair of k rows) into 16 x 16 f32,
// 8192 multiply-adds per instruction: at the rows of M a decode or verify step has, the matmul is bound by
// reading the weights, whatever their format. Products exact, f32 sums (as vdpbf16ps, denormals flushed).
// Tiles: tmm0-3 the NP <= 4 panels' sums, tmm4 x, tmm5-7 panels (reused in turn). The tile state is per
// thread: every run_block call loads its own configuration and releases the tiles at its end.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static void amx_config(int64_t mr) {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = t < 5 ? static_cast<uint8_t>(mr) : 16;  // sums and x: mr rows; panels: 16 pair rows
  }
  _tile_loadconfig(&c);
}

constexpr int64_t kAmxK = 32;  // k rows per TDPBF16PS

// The sums of `rows` (a multiple of 32) k rows of x [mr rows, stride xs] times NP converted panels, into
// tmp [mr, NP * 16] (the configured mr).
template <int NP>
static inline void amx_block(const uint16_t* buf, int64_t rows, const uint16_t* x, int64_t xs, float* tmp) {
  constexpr int64_t P = kQuantKC * kPanelCols;  // elements between converted panels
  _tile_zero(0);
  if constexpr (NP > 1) _tile_zero(1);
  if constexpr (NP > 2) _tile_zero(2);
  if constexpr (NP > 3) _tile_zero(3);
  for (int64_t k = 0; k < rows; k += kAmxK) {
    const uint16_t* b = buf + k * kPanelCols;  // pair row k / 2
    _tile_loadd(4, x + k, xs * 2);
    _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NP > 1) { _tile_loadd(6, b + P, 64); _tile_dpbf16ps(1, 4, 6); }
    if constexpr (NP > 2) { _tile_loadd(7, b + 2 * P, 64); _tile_dpbf16ps(2, 4, 7); }
    if constexpr (NP > 3) { _tile_loadd(5, b + 3 * P, 64); _tile_dpbf16ps(3, 4, 5); }
  }
  _tile_stored(0, tmp, NP * 64);
  if constexpr (NP > 1) _tile_stored(1, tmp + 16, NP * 64);
  if constexpr (NP > 2) _tile_stored(2, tmp + 32, NP * 64);
  if constexpr (NP > 3) _tile_stored(3, tmp + 48, NP * 64);
}

// Panels [j0, j0 + NP) (bf16, int8 or int4) for all M rows, rows [k0, k1): each k block converted once
// (convert_block), then 16 rows of M at a time on the tiles; sums added into the scratch (int4: times the
// group's scale). cfg: the rows the tile configuration holds now (0: none loaded).
template <int FMT, int NP>
static void panel_group_amx(const Problem& p, int64_t k0, int64_t k1, int64_t j0, float* sc, int64_t ss, int64_t& cfg) {
  alignas(64) uint16_t buf[NP * kQuantKC * kPanelCols];
  alignas(64) float tmp[16 * NP * kPanelCols];
  const int64_t B = FMT == kInt4Panel ? p.group : kQuantKC;
  for (int64_t kb = k0; kb < k1; kb += B) {
    const int64_t ke = imin(kb + B, k1);
    convert_block<FMT, NP>(p, kb, ke, j0, buf);
    const float* gs = FMT == kInt4Panel ? p.scale + (kb / B) * p.n + j0 * kPanelCols : nullptr;
    for (int64_t m0 = 0; m0 < p.m; m0 += 16) {
      const int64_t mr = imin(16, p.m - m0);
      if (mr != cfg) amx_config(cfg = mr);
      amx_block<NP>(buf, ke - kb, p.xb + m0 * p.k + kb, p.k, tmp);
      for (int64_t m = 0; m < mr; ++m)
        for (int q = 0; q < NP; ++q) {
          float* d = sc + (m0 + m) * ss + q * kPanelCols;
          const __m512 t = V::load(tmp + m * NP * kPanelCols + q * kPanelCols);
          V::store(d, gs ? V::fma(t, V::load(gs + q * kPanelCols), V::load(d)) : V::add(V::load(d), t));
        }
    }
  }
}

// The rows of M from which the tiles run (below, run_block_bf16's vector kernels).
constexpr int64_t kAmxMinM = 12;

template <int FMT>
static void run_amx(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc) {
  int64_t cfg = 0;
  for_panel_groups<4>(c0, c1, acc, [&](auto np, int64_t j, float* sc, int64_t ss) {
    panel_group_amx<FMT, decltype(np)::value>(p, k0, k1, j, sc, ss, cfg);
  });
  _tile_release();
}

// Panels whose every k block is a whole number of 32-row tiles take the tiles (int4: groups of 32 k rows
// or a multiple, at most kQuantKC); the rest, as on avx512bf16.
static void run_block_amx(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc, bool accumulate) {
  const bool panels = p.fmt == kBF16Panel || p.fmt == kInt8Panel || (p.fmt == kInt4Panel && p.group <= kQuantKC);
  const int64_t step = p.fmt == kInt4Panel ? p.group : kAmxK;
  if (!panels || p.xb == nullptr || p.m < kAmxMinM || step % kAmxK || k0 % kAmxK || (k1 - k0) % kAmxK)
    return run_block_bf16(p, k0, k1, c0, c1, acc, accumulate);
  if (!accumulate) std::memset(acc, 0, sizeof(float) * p.m * (c1 - c0));
  if (p.fmt == kBF16Panel) run_amx<kBF16Panel>(p, k0, k1, c0, c1, acc);
  else if (p.fmt == kInt8Panel) run_amx<kInt8Panel>(p, k0, k1, c0, c1, acc);
  else run_amx<kInt4Panel>(p, k0, k1, c0, c1, acc);
}
#endif

#ifdef ER_NATIVE_AMX
const Kernels kTable = {"amx", kAmx, kNV1 * V::W, kNV1 * V::W, kKR, run_block_amx, attend, sample_row, rows};
#else
const Kernels kTable = {"avx512bf16", kAvx512Bf16, kNV1 * V::W, kNV1 * V::W, kKR, run_block_bf16, attend, sample_row, rows};
#endif
#endif

}  // namespace
}  // namespace er_native

#if defined(ER_NATIVE_AMX)
extern "C" const er_native::Kernels* er_native_kernels_amx() { return &er_native::kTable; }
#elif defined(ER_NATIVE_AVX512_BF16)
extern "C" const er_native::Kernels* er_native_kernels_avx512bf16() { return &er_native::kTable; }
#else
extern "C" const er_native::Kernels* er_native_kernels_avx512() { return &er_native::kTable; }
#endif
