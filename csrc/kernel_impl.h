// The matmul kernels, written once over a small vector interface `V` and compiled once per ISA.
// Included by isa_*.cc inside an anonymous namespace, after that unit has defined
//   struct V { using F (W floats); using I (W int32); static constexpr int W;
//              zero, load, store, bcast, fma(a, b, c) = a * b + c, add,
//              load_bf16 (W bf16 -> f32), load_i8 (W int8 -> f32), load_u8_i32 (W uint8 -> int32),
//              fnmadd(a, b, c) = c - a * b, mul, cvt_u8 (W uint8 -> f32),
//              load_u4 (W bytes -> their low / high nibbles as f32), load_i32 (W raw 32-bit lanes),
//              u4<S> (each lane's nibble at bit S as f32), div, max, and_ge, floor, pow2i,
//              hsum, hsum4, hmax, store_bf16 (W floats -> bf16, round to nearest even) };
// and the register-tile shapes kMR1/kNV1 (M == 1), kMR2/kNV2 (M == 2), kMRB/kNVB (M >= 3); for panel-major
// weights, kPNP1 / kPNP2 panels at M = 1 / 2 and kPMRB rows x kPNPB panels at M >= 3.
//
// Layout (er_jax.quant.QuantArray, read in place): W is row-major [K, N] (int4: [Kp/2, N] bytes,
// byte j = rows 2j (low nibble) and 2j+1 (high nibble)). The work unit is a range of output columns
// [c0, c1) for all M rows (threads split N). Inside it: k-outer in blocks of G rows (int4: one
// quantization group), columns in tiles of NV vectors, rows of M in tiles of MR; a tile keeps its
// MR x NV accumulators in registers across the block's G rows, then adds them into a small f32 scratch
// [M, c1 - c0] (L1/L2 resident). Each weight byte is loaded from memory once per call; the M tiles after
// the first re-read the block's G x (NV * W) panel from L1.

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// f(integral_constant<int, 0>), ..., f(integral_constant<int, N - 1>), in that order (compile-time indices).
template <int N, class F>
static inline void unroll(F&& f) {
  if constexpr (N > 0) {
    unroll<N - 1>(f);
    f(std::integral_constant<int, N - 1>{});
  }
}

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int FMT>
static inline typename V::F load_w(const void* w, int64_t off) {
  if constexpr (FMT == kF32) return V::load(static_cast<const float*>(w) + off);
  else if constexpr (FMT == kBF16) return V::load_bf16(static_cast<const uint16_t*>(w) + off);
  else return V::load_i8(static_cast<const int8_t*>(w) + off);
}

// f32 / bf16 / int8: rows [k0, k1) of columns [col, col + NV*W) for rows m0 .. m0+MR-1 of M.
// sc = &scratch[m0, col - c0], row stride ss. int8's per-column scale is applied in finalize().
template <int FMT, int MR, int NV>
static inline void tile_rows(const Problem& p, int64_t k0, int64_t k1, int64_t col, int64_t m0, float* sc,
                             int64_t ss) {
  typename V::F acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = V::zero();
  const float* x = p.x + m0 * p.xs;
  for (int64_t k = k0; k < k1; ++k) {
    typename V::F w[NV];
    const int64_t off = k * p.n + col;
    for (int j = 0; j < NV; ++j) w[j] = load_w<FMT>(p.w, off + j * V::W);
    for (int m = 0; m < MR; ++m) {
      const typename V::F b = V::bcast(x[m * p.xs + k]);
      for (int j = 0; j < NV; ++j) acc[m][j] = V::fma(b, w[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) {
      float* s = sc + m * ss + j * V::W;
      V::store(s, V::add(V::load(s), acc[m][j]));
    }
}

// int4: packed rows [r0, r1) of group g; scratch += (sum_k x[m, k] * q[k]) * scale[g]. The zero point is
// folded out of the inner loop: sum_k x (q - z) s = s (sum_k x q) - s z (sum_k x), and the second term is
// subtracted once per group (int4_zero_correction) — two instructions fewer per 2 x W weights.
template <int MR, int NV>
static inline void tile_int4(const Problem& p, int64_t g, int64_t r0, int64_t r1, int64_t col, int64_t m0,
                             float* sc, int64_t ss) {
  const uint8_t* data = static_cast<const uint8_t*>(p.w);
  typename V::F acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = V::zero();
  const float* x = p.x + m0 * p.xs;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = data + r * p.n + col;
    typename V::F b0[MR], b1[MR];
    for (int m = 0; m < MR; ++m) {
      b0[m] = V::bcast(x[m * p.xs + 2 * r]);
      b1[m] = V::bcast(x[m * p.xs + 2 * r + 1]);
    }
    for (int j = 0; j < NV; ++j) {
      typename V::F lo, hi;
      V::load_u4(row + j * V::W, lo, hi);
      for (int m = 0; m < MR; ++m) acc[m][j] = V::fma(b1[m], hi, V::fma(b0[m], lo, acc[m][j]));
    }
  }
  for (int j = 0; j < NV; ++j) {
    const typename V::F s = V::load(p.scale + g * p.n + col + j * V::W);
    for (int m = 0; m < MR; ++m) {
      float* d = sc + m * ss + j * V::W;
      V::store(d, V::fma(acc[m][j], s, V::load(d)));
    }
  }
}

// scratch[m, c] -= scale[g, c] * (zero[g, c] + offset) * (sum of x[m, k] over group g's rows), columns
// [c0, c1). xsums: those sums given (xsums[m * xsum_stride]), else computed from p.x.
static void int4_zero_correction(const Problem& p, int64_t g, int64_t c0, int64_t c1, float* scratch,
                                 const float* xsums = nullptr, int64_t xsum_stride = 0, float offset = 0.f) {
  const int64_t cw = c1 - c0, k0 = g * p.group, k1 = imin(k0 + p.group, p.k);
  const typename V::F off = V::bcast(offset);
  for (int64_t m = 0; m < p.m; ++m) {
    float xsum = 0.f;
    if (xsums) xsum = xsums[m * xsum_stride];
    else for (int64_t k = k0; k < k1; ++k) xsum += p.x[m * p.xs + k];
    const typename V::F xs = V::bcast(xsum);
    float* sc = scratch + m * cw;
    const float* s = p.scale + g * p.n;
    const uint8_t* z = p.zero + g * p.n;
    int64_t c = c0;
    for (; c + V::W <= c1; c += V::W)
      V::store(sc + (c - c0), V::fnmadd(V::mul(V::load(s + c), V::add(V::cvt_u8(z + c), off)), xs, V::load(sc + (c - c0))));
    for (; c < c1; ++c) sc[c - c0] -= s[c] * (static_cast<float>(z[c]) + offset) * xsum;
  }
}

template <int FMT, int MR, int NV>
static inline void tile(const Problem& p, int64_t b0, int64_t b1, int64_t g, int64_t col, int64_t m0, float* sc,
                        int64_t ss) {
  if constexpr (FMT == kInt4) tile_int4<MR, NV>(p, g, b0, b1, col, m0, sc, ss);
  else tile_rows<FMT, MR, NV>(p, b0, b1, col, m0, sc, ss);
}

// The last r < MR rows of M.
template <int FMT, int R, int NV>
static inline void tile_rem(int64_t r, const Problem& p, int64_t b0, int64_t b1, int64_t g, int64_t col,
                            int64_t m0, float* sc, int64_t ss) {
  if constexpr (R >= 1) {
    if (r == R) tile<FMT, R, NV>(p, b0, b1, g, col, m0, sc, ss);
    else tile_rem<FMT, R - 1, NV>(r, p, b0, b1, g, col, m0, sc, ss);
  }
}

// M >= 3 and a non-f32 weight: the kKR x NV*W weight panel is converted to f32 once into an L1 buffer,
// then every M tile runs the plain f32 tile on it (instead of re-converting per M tile).
template <int MR, int NV>
static inline void tile_panel(const float* panel, int64_t rows, const float* x, int64_t xs, float* sc, int64_t ss,
                              const float* scale) {
  typename V::F acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = V::zero();
  for (int64_t i = 0; i < rows; ++i) {
    typename V::F w[NV];
    for (int j = 0; j < NV; ++j) w[j] = V::load(panel + i * NV * V::W + j * V::W);
    for (int m = 0; m < MR; ++m) {
      const typename V::F b = V::bcast(x[m * xs + i]);
      for (int j = 0; j < NV; ++j) acc[m][j] = V::fma(b, w[j], acc[m][j]);
    }
  }
  for (int j = 0; j < NV; ++j) {
    const typename V::F s = scale ? V::load(scale + j * V::W) : V::zero();
    for (int m = 0; m < MR; ++m) {
      float* d = sc + m * ss + j * V::W;
      V::store(d, scale ? V::fma(acc[m][j], s, V::load(d)) : V::add(V::load(d), acc[m][j]));
    }
  }
}

template <int R, int NV>
static inline void panel_rem(int64_t r, const float* panel, int64_t rows, const float* x, int64_t xs, float* sc,
                             int64_t ss, const float* scale) {
  if constexpr (R >= 1) {
    if (r == R) tile_panel<R, NV>(panel, rows, x, xs, sc, ss, scale);
    else panel_rem<R - 1, NV>(r, panel, rows, x, xs, sc, ss, scale);
  }
}

template <int FMT, int MR, int NV>
static void m_tiles(const Problem& p, int64_t b0, int64_t b1, int64_t g, int64_t col, int64_t c0, float* scratch,
                    int64_t cw) {
  if constexpr (FMT != kF32 && MR > 2) {
    alignas(64) float panel[kKRB * NV * V::W];
    int64_t rows, kbase;
    if constexpr (FMT == kInt4) {
      const uint8_t* data = static_cast<const uint8_t*>(p.w);
      for (int64_t r = b0; r < b1; ++r)
        for (int j = 0; j < NV; ++j) {
          typename V::F lo, hi;
          V::load_u4(data + r * p.n + col + j * V::W, lo, hi);
          V::store(panel + (2 * (r - b0)) * NV * V::W + j * V::W, lo);
          V::store(panel + (2 * (r - b0) + 1) * NV * V::W + j * V::W, hi);
        }
      rows = 2 * (b1 - b0);
      kbase = 2 * b0;
    } else {
      for (int64_t k = b0; k < b1; ++k)
        for (int j = 0; j < NV; ++j)
          V::store(panel + (k - b0) * NV * V::W + j * V::W, load_w<FMT>(p.w, k * p.n + col + j * V::W));
      rows = b1 - b0;
      kbase = b0;
    }
    const float* scale = FMT == kInt4 ? p.scale + g * p.n + col : nullptr;
    int64_t m = 0;
    for (; m + MR <= p.m; m += MR)
      tile_panel<MR, NV>(panel, rows, p.x + m * p.xs + kbase, p.xs, scratch + m * cw + (col - c0), cw, scale);
    if (m < p.m)
      panel_rem<MR - 1, NV>(p.m - m, panel, rows, p.x + m * p.xs + kbase, p.xs, scratch + m * cw + (col - c0), cw,
                            scale);
  } else {
    int64_t m = 0;
    for (; m + MR <= p.m; m += MR) tile<FMT, MR, NV>(p, b0, b1, g, col, m, scratch + m * cw + (col - c0), cw);
    if (m < p.m) tile_rem<FMT, MR - 1, NV>(p.m - m, p, b0, b1, g, col, m, scratch + m * cw + (col - c0), cw);
  }
}

// Columns [col, c1), fewer than W of them: scalar.
template <int FMT>
static void tail_columns(const Problem& p, int64_t b0, int64_t b1, int64_t g, int64_t col, int64_t c0, int64_t c1,
                         float* scratch, int64_t cw) {
  for (int64_t m = 0; m < p.m; ++m) {
    const float* x = p.x + m * p.xs;
    for (int64_t n = col; n < c1; ++n) {
      float acc = 0.f;
      if constexpr (FMT == kInt4) {
        const uint8_t* data = static_cast<const uint8_t*>(p.w);
        for (int64_t r = b0; r < b1; ++r) {
          const int32_t byte = data[r * p.n + n];
          acc += x[2 * r] * static_cast<float>(byte & 15);
          acc += x[2 * r + 1] * static_cast<float>(byte >> 4);
        }
        scratch[m * cw + (n - c0)] += acc * p.scale[g * p.n + n];
      } else {
        for (int64_t k = b0; k < b1; ++k) {
          float w;
          if constexpr (FMT == kF32) w = static_cast<const float*>(p.w)[k * p.n + n];
          else if constexpr (FMT == kBF16) w = bf16_to_f32(static_cast<const uint16_t*>(p.w)[k * p.n + n]);
          else w = static_cast<float>(static_cast<const int8_t*>(p.w)[k * p.n + n]);
          acc += x[k] * w;
        }
        scratch[m * cw + (n - c0)] += acc;
      }
    }
  }
}

// While a row block sweeps its columns, prefetch the same columns of the next block's rows (one sweep
// ahead): at M >= 3, and for 1-byte / int4 weights at every M, whose row segments (N bytes or fewer) are too
// short for the hardware prefetcher to ramp up on every one of the block's row streams, and a decode step's
// matmuls follow each other with nothing to overlap them. (Prefetches past the weights' last row are
// harmless: a prefetch never faults.) Not for f32 / bf16 at M <= 2: there the hardware prefetcher keeps up
// on their 2-4x longer segments and the prefetches only cost (SmolLM2's head, f32, M = 1: 11 -> 18-23 GB/s
// without them and with kKR / 2 rows; docs/cpu_profile.md, "Night").
template <int FMT>
static inline void prefetch_rows(const Problem& p, int64_t r0, int64_t r1, int64_t col, int64_t cols) {
  constexpr int64_t esize = FMT == kF32 ? 4 : FMT == kBF16 ? 2 : 1;  // int4: bytes of packed rows
  const char* w = static_cast<const char*>(p.w);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t off = 0; off < cols * esize; off += 64) __builtin_prefetch(w + (r * p.n + col) * esize + off);
}

template <int FMT, int MR, int NV>
static void block(const Problem& p, int64_t b0, int64_t b1, int64_t g, int64_t c0, int64_t c1, float* scratch) {
  const int64_t cw = c1 - c0;
  int64_t col = c0;
  for (; col + NV * V::W <= c1; col += NV * V::W) {
    if constexpr (MR > 2 || FMT >= kInt8) prefetch_rows<FMT>(p, b1, 2 * b1 - b0, col, NV * V::W);
    m_tiles<FMT, MR, NV>(p, b0, b1, g, col, c0, scratch, cw);
  }
  for (; col + V::W <= c1; col += V::W) m_tiles<FMT, MR, 1>(p, b0, b1, g, col, c0, scratch, cw);
  if (col < c1) tail_columns<FMT>(p, b0, b1, g, col, c0, c1, scratch, cw);
}

// Rows [k0, k1) x columns [c0, c1) into acc [M, c1 - c0] (overwritten). kKR rows at a time sweep the
// whole column range, so a thread reads kKR contiguous row segments (prefetcher-friendly) rather than
// one cache line per row and page. int4: k0 is a multiple of the group size.
template <int FMT, int MR, int NV>
static void run_fmt(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc, bool accumulate) {
  if (!accumulate) std::memset(acc, 0, sizeof(float) * p.m * (c1 - c0));
  // Rows swept together: kKR up to M = 8 (few row streams, each ahead of the FMAs: at M = 8 on AVX2, 32 rows
  // ran SmolLM2's head at 3.8 GB/s and 8 rows at 8.6), kKRB beyond (fewer accumulator round trips to the
  // L2-resident block accumulator per FMA); f32 / bf16 at M <= 2 half of kKR (fewer, longer streams for the
  // hardware prefetcher, see block()).
  const int64_t KR = MR > 2 && p.m > 8 ? kKRB : MR <= 2 && FMT < kInt8 ? kKR / 2 : kKR;
  if constexpr (FMT == kInt4) {
    const int64_t G = p.group;
    for (int64_t g = k0 / G; g * G < k1; ++g) {
      const int64_t r1 = (imin((g + 1) * G, k1) + 1) / 2;  // packed rows; the padding row's x is zero
      for (int64_t r = g * G / 2; r < r1; r += KR / 2) block<FMT, MR, NV>(p, r, imin(r + KR / 2, r1), g, c0, c1, acc);
      int4_zero_correction(p, g, c0, c1, acc);
    }
  } else {
    for (int64_t k = k0; k < k1; k += KR) block<FMT, MR, NV>(p, k, imin(k + KR, k1), 0, c0, c1, acc);
  }
}

template <int FMT>
static void run_m(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc, bool accumulate) {
  if (p.m == 1) run_fmt<FMT, kMR1, kNV1>(p, k0, k1, c0, c1, acc, accumulate);
  else if (p.m == 2) run_fmt<FMT, kMR2, kNV2>(p, k0, k1, c0, c1, acc, accumulate);
  else run_fmt<FMT, kMRB, kNVB>(p, k0, k1, c0, c1, acc, accumulate);
}

// ---------------------------------------------------------------------------------------------------
// Panel-major weights (kF32Panel / kBF16Panel / kInt8Panel, er_native.h; kInt4Panel below): a 16-column
// panel is one contiguous K x 16 stream, so a thread reads NP sequential streams whatever M is (the [K, N]
// layout above makes it read kKR row segments per column block, which at M >= 3 left the f32 kernels
// latency-bound at 3-4 GB/s; docs/native.md, "Panel-major weights").
// A tile keeps MR rows x NP panels of accumulators in registers over all of its rows of K and adds them into
// the scratch [M, c1 - c0] (panel_group below says which tile prefetches). int8 weights are converted in
// registers (by every M tile: the conversion is 2 instructions per W weights against MR FMAs); their scale
// is applied in finalize().

// Which lines a prefetching tile asks for. A tile of many rows (M >= 3, compute-bound) prefetches the next NP
// panels' line, so that the next group's first tile finds its rows in L2 (panel_group). At M <= 2 the only tile
// reads each weight once, bound by memory: it prefetches kStreamAhead bytes ahead in its own NP streams. The
// next panels' line is a whole sweep ahead there (NP x K x 16 weights: 4.6 MB in f32 at Qwen2.5-1.5B's down
// projection, past the 1 MB L2), and that rule cost the M <= 2 kernels 10-30% of their bandwidth
// (docs/native.md, "Prefetch at M <= 2").
constexpr int64_t kStreamAhead = 256;

template <int FMT, int MR, int NP, bool PF>
static inline void panel_tile(const Problem& p, int64_t k0, int64_t k1, int64_t j0, const float* x, float* sc,
                              int64_t ss) {
  constexpr int kLocality = MR > 2 ? 1 : 3;  // prefetcht2 for the tiles of many rows (the lines wait for a while)
  constexpr int WF = FMT == kF32Panel ? kF32 : FMT == kBF16Panel ? kBF16 : kInt8;
  constexpr int NV = kPanelCols / V::W, U = NP * NV;
  constexpr int64_t esize = WF == kF32 ? 4 : WF == kBF16 ? 2 : 1, line_rows = 64 / (kPanelCols * esize);
  typename V::F acc[MR][U];
  for (int m = 0; m < MR; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = V::zero();
  const int64_t stride = p.rows * kPanelCols, base = j0 * stride;  // elements between panels; panel j0's start
  for (int64_t k = k0; k < k1; ++k) {
    if constexpr (PF) {
      if (k % line_rows == 0)  // one prefetch per 64-byte line
        for (int q = 0; q < NP; ++q) {
          const char* line = static_cast<const char*>(p.w) + (base + q * stride + k * kPanelCols) * esize;
          __builtin_prefetch(MR <= 2 ? line + kStreamAhead : line + NP * stride * esize, 0, kLocality);
        }
    }
    if constexpr (MR == 1) {  // each weight vector converted just before its FMA: U accumulators + 2 registers
      const typename V::F b = V::bcast(x[k]);
      for (int u = 0; u < U; ++u)
        acc[0][u] = V::fma(b, load_w<WF>(p.w, base + u / NV * stride + k * kPanelCols + u % NV * V::W), acc[0][u]);
      continue;
    }
    typename V::F w[U];
    for (int q = 0; q < NP; ++q)
      for (int v = 0; v < NV; ++v) w[q * NV + v] = load_w<WF>(p.w, base + q * stride + k * kPanelCols + v * V::W);
    for (int m = 0; m < MR; ++m) {
      const typename V::F b = V::bcast(x[m * p.xs + k]);
      for (int u = 0; u < U; ++u) acc[m][u] = V::fma(b, w[u], acc[m][u]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int u = 0; u < U; ++u) {
      float* d = sc + m * ss + u * V::W;  // panel q = u / NV, vector v = u % NV: column 16 q + W v
      V::store(d, V::add(V::load(d), acc[m][u]));
    }
}

template <int FMT, int R, int NP>
static inline void panel_rem(int64_t r, bool pf, const Problem& p, int64_t k0, int64_t k1, int64_t j0,
                             const float* x, float* sc, int64_t ss) {
  if constexpr (R >= 1) {
    if (r != R) return panel_rem<FMT, R - 1, NP>(r, pf, p, k0, k1, j0, x, sc, ss);
    if (pf) panel_tile<FMT, R, NP, true>(p, k0, k1, j0, x, sc, ss);
    else panel_tile<FMT, R, NP, false>(p, k0, k1, j0, x, sc, ss);
  }
}

// Panels [j0, j0 + NP) for all M rows and rows [k0, k1) of K; sc = &scratch[0, 16 j0 - c0], row stride ss.
// Each tile keeps its accumulators over all of [k0, k1), and the last full tile (or the only one) prefetches
// the next panels' rows: the other tiles re-read these panels from the caches, and the first tile of the next
// group, bound by DRAM, then finds its rows in L2. (With blocks of 256 rows and the first tile prefetching,
// one thread ran bf16 [576, 3072] at M = 48 / 8 at 180 / 112 GFLOP/s on Zen 4; now 207 / 164.)
template <int FMT, int MR, int NP>
static void panel_group(const Problem& p, int64_t k0, int64_t k1, int64_t j0, float* sc, int64_t ss) {
  const int64_t last = p.m >= MR ? (p.m / MR - 1) * MR : 0;  // the last full tile's first row (or the only one)
  for (int64_t m = 0; m < p.m; m += MR) {
    const float* x = p.x + m * p.xs;
    if (m + MR > p.m) panel_rem<FMT, MR - 1, NP>(p.m - m, m == last, p, k0, k1, j0, x, sc + m * ss, ss);
    else if (m == last) panel_tile<FMT, MR, NP, true>(p, k0, k1, j0, x, sc + m * ss, ss);
    else panel_tile<FMT, MR, NP, false>(p, k0, k1, j0, x, sc + m * ss, ss);
  }
}

// The panels of columns [c0, c1) in groups of NP, then one by one: group(np, j0, sc, ss) with np an
// integral_constant (NP or 1), sc = &acc[0, 16 j0 - c0] and ss = c1 - c0.
template <int NP, class Group>
static inline void for_panel_groups(int64_t c0, int64_t c1, float* acc, Group&& group) {
  const int64_t cw = c1 - c0, j1 = c1 / kPanelCols;
  int64_t j = c0 / kPanelCols;
  for (; j + NP <= j1; j += NP) group(std::integral_constant<int, NP>{}, j, acc + (j * kPanelCols - c0), cw);
  for (; j < j1; ++j) group(std::integral_constant<int, 1>{}, j, acc + (j * kPanelCols - c0), cw);
}

template <int FMT, int MR, int NP>
static void run_panels_mr(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc) {
  for_panel_groups<NP>(c0, c1, acc, [&](auto np, int64_t j, float* sc, int64_t ss) {
    panel_group<FMT, MR, decltype(np)::value>(p, k0, k1, j, sc, ss);
  });
}

// int4 panels: rows [k0, k1) of group g (k0 a multiple of 8), one 64-byte line (8 rows x 16 columns,
// panels.py's line order) per panel at a time: lane c of the line's 32-bit word v holds the code of row
// 8b + t at bits 16 (t & 1) + 4 (t >> 1) (V::u4). The group's partial sums times its scale are added into the
// scratch; the zero point is subtracted per group after all panels (int4_zero_correction).
template <int MR, int NP, bool PF>
static inline void panel_tile_int4(const Problem& p, int64_t g, int64_t k0, int64_t k1, int64_t j0, const float* x,
                                   float* sc, int64_t ss) {
  constexpr int NV = kPanelCols / V::W, U = NP * NV;
  const uint8_t* data = static_cast<const uint8_t*>(p.w);
  typename V::F acc[MR][U];
  for (int m = 0; m < MR; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = V::zero();
  const int64_t stride = p.rows * kPanelCols, base = j0 * stride;  // bytes between panels; panel j0's start
  for (int64_t k = k0; k < k1; k += 8) {
    const uint8_t* line = data + base + k / 2 * kPanelCols;
    typename V::I v[U];
    for (int q = 0; q < NP; ++q)
      for (int i = 0; i < NV; ++i) v[q * NV + i] = V::load_i32(line + q * stride + i * V::W * 4);
    if constexpr (PF)
      for (int q = 0; q < NP; ++q) __builtin_prefetch(line + q * stride + (MR <= 2 ? kStreamAhead : NP * stride));
    const int64_t rows = imin(8, k1 - k);
    unroll<8>([&](auto t) {
      if (t >= rows) return;
      constexpr int shift = 16 * (decltype(t)::value & 1) + 4 * (decltype(t)::value >> 1);
      for (int u = 0; u < U; ++u) {
        const typename V::F w = V::template u4<shift>(v[u]);
        for (int m = 0; m < MR; ++m) acc[m][u] = V::fma(V::bcast(x[m * p.xs + k + t]), w, acc[m][u]);
      }
    });
  }
  const float* scale = p.scale + g * p.n + j0 * kPanelCols;
  for (int u = 0; u < U; ++u) {
    const typename V::F s = V::load(scale + u * V::W);
    for (int m = 0; m < MR; ++m) {
      float* d = sc + m * ss + u * V::W;
      V::store(d, V::fma(acc[m][u], s, V::load(d)));
    }
  }
}

template <int R, int NP>
static inline void panel_rem_int4(int64_t r, bool pf, const Problem& p, int64_t g, int64_t k0, int64_t k1, int64_t j0,
                                  const float* x, float* sc, int64_t ss) {
  if constexpr (R >= 1) {
    if (r != R) return panel_rem_int4<R - 1, NP>(r, pf, p, g, k0, k1, j0, x, sc, ss);
    if (pf) panel_tile_int4<R, NP, true>(p, g, k0, k1, j0, x, sc, ss);
    else panel_tile_int4<R, NP, false>(p, g, k0, k1, j0, x, sc, ss);
  }
}

template <int MR, int NP>
static void panel_group_int4(const Problem& p, int64_t k0, int64_t k1, int64_t j0, float* sc, int64_t ss) {
  const int64_t G = p.group;
  for (int64_t g = k0 / G; g * G < k1; ++g) {
    const int64_t g0 = g * G, g1 = imin((g + 1) * G, k1);  // the group's rows
    int64_t m = 0;
    for (; m + MR <= p.m; m += MR) {
      if (m == 0) panel_tile_int4<MR, NP, true>(p, g, g0, g1, j0, p.x, sc, ss);
      else panel_tile_int4<MR, NP, false>(p, g, g0, g1, j0, p.x + m * p.xs, sc + m * ss, ss);
    }
    if (m < p.m) panel_rem_int4<MR - 1, NP>(p.m - m, m == 0, p, g, g0, g1, j0, p.x + m * p.xs, sc + m * ss, ss);
  }
}

template <int MR, int NP>
static void run_panels_int4_mr(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc) {
  for_panel_groups<NP>(c0, c1, acc, [&](auto np, int64_t j, float* sc, int64_t ss) {
    panel_group_int4<MR, decltype(np)::value>(p, k0, k1, j, sc, ss);
  });
  for (int64_t g = k0 / p.group; g * p.group < k1; ++g) int4_zero_correction(p, g, c0, c1, acc);
}

template <int FMT>
static void run_panels(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc, bool accumulate) {
  if (!accumulate) std::memset(acc, 0, sizeof(float) * p.m * (c1 - c0));
  if constexpr (FMT == kInt4Panel) {
    if (p.m == 1) run_panels_int4_mr<1, kPNP1>(p, k0, k1, c0, c1, acc);
    else if (p.m == 2) run_panels_int4_mr<2, kPNP2>(p, k0, k1, c0, c1, acc);
    else run_panels_int4_mr<kPMRB, kPNPB>(p, k0, k1, c0, c1, acc);
    return;
  }
  if (p.m == 1) run_panels_mr<FMT, 1, kPNP1>(p, k0, k1, c0, c1, acc);
  else if (p.m == 2) run_panels_mr<FMT, 2, kPNP2>(p, k0, k1, c0, c1, acc);
  else run_panels_mr<FMT, kPMRB, kPNPB>(p, k0, k1, c0, c1, acc);
}

static void run_block(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc, bool accumulate) {
  switch (p.fmt) {
    case kF32: run_m<kF32>(p, k0, k1, c0, c1, acc, accumulate); break;
    case kBF16: run_m<kBF16>(p, k0, k1, c0, c1, acc, accumulate); break;
    case kInt8: run_m<kInt8>(p, k0, k1, c0, c1, acc, accumulate); break;
    case kInt4: run_m<kInt4>(p, k0, k1, c0, c1, acc, accumulate); break;
    case kF32Panel: run_panels<kF32Panel>(p, k0, k1, c0, c1, acc, accumulate); break;
    case kBF16Panel: run_panels<kBF16Panel>(p, k0, k1, c0, c1, acc, accumulate); break;
    case kInt8Panel: run_panels<kInt8Panel>(p, k0, k1, c0, c1, acc, accumulate); break;
    case kInt4Panel: run_panels<kInt4Panel>(p, k0, k1, c0, c1, acc, accumulate); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------------
// Attention (er_native.cc's attention_impl validates and splits the work): query rows [r0, r1) of batch
// row b and KV head kv read the keys up to the rows' largest position once: scores [rows, n] in a thread
// buffer (f32 dots, times 1 / sqrt(hd)), a per-row softmax (vector exp), then o = p @ V (p rounded to
// bf16 first when the cache is bf16, as the reference casts p to V's dtype).

static inline uint16_t f32_to_bf16_rne(float f) {  // round to nearest even (NaN stays NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// One cache row (hd elements) as f32: an f32 cache is read in place, a bf16 one converted into buf.
static inline const float* kv_row(const void* base, int64_t off, int64_t hd, bool bf16, float* buf) {
  if (!bf16) return static_cast<const float*>(base) + off;
  const uint16_t* s = static_cast<const uint16_t*>(base) + off;
  int64_t d = 0;
  for (; d + V::W <= hd; d += V::W) V::store(buf + d, V::load_bf16(s + d));
  for (; d < hd; ++d) buf[d] = bf16_to_f32(s[d]);
  return buf;
}

// e^x for x <= 0 (softmax arguments s - max), f32: Cephes' expf (2^n times a degree-7 polynomial of the
// remainder; relative error ~2e-7). Exactly 0 below -87.3 (and for -inf / NaN): those terms are < 1e-37
// of the largest one, e^0 = 1, which every softmax row here holds.
static inline typename V::F vexp_nonpositive(typename V::F x0) {
  const typename V::F lo = V::bcast(-87.3f);
  const typename V::F x = V::max(x0, lo);
  const typename V::F n = V::floor(V::fma(x, V::bcast(1.44269504088896341f), V::bcast(0.5f)));
  typename V::F r = V::fnmadd(n, V::bcast(0.693359375f), x);
  r = V::fnmadd(n, V::bcast(-2.12194440e-4f), r);
  typename V::F y = V::bcast(1.9875691500e-4f);
  y = V::fma(y, r, V::bcast(1.3981999507e-3f));
  y = V::fma(y, r, V::bcast(8.3334519073e-3f));
  y = V::fma(y, r, V::bcast(4.1665795894e-2f));
  y = V::fma(y, r, V::bcast(1.6666665459e-1f));
  y = V::fma(y, r, V::bcast(5.0000001201e-1f));
  y = V::add(V::fma(y, V::mul(r, r), r), V::bcast(1.f));
  return V::and_ge(x0, lo, V::mul(y, V::pow2i(n)));
}

// The attention kernels below take the head dimension as a template argument HD (64 and 128 are compiled
// fully unrolled; HD = 0 reads it at run time): at hd = 64 the unrolled loops run ~2x fewer instructions.

// Scores of NK consecutive keys (rows kj[0 .. NK)) for RT query rows q[0 .. RT): RT x NK independent FMA
// chains, each key vector loaded once for all RT rows (one chain per dot made each FMA wait on the last);
// the NK sums of a row reduced together (V::hsum4).
template <int HD, int NK, int RT>
static inline void score_tile(const float* q, int64_t hd_rt, const float* const* kj, float inv_sqrt, float* s,
                              int64_t n) {
  const int64_t hd = HD > 0 ? HD : hd_rt, hv = hd - hd % V::W;
  typename V::F acc[RT][NK];
  for (int r = 0; r < RT; ++r)
    for (int u = 0; u < NK; ++u) acc[r][u] = V::zero();
#pragma GCC unroll 16
  for (int64_t d = 0; d < hv; d += V::W)
    for (int u = 0; u < NK; ++u) {
      const typename V::F kd = V::load(kj[u] + d);
      for (int r = 0; r < RT; ++r) acc[r][u] = V::fma(V::load(q + r * hd + d), kd, acc[r][u]);
    }
  for (int r = 0; r < RT; ++r) {
    float sc[NK];
    if constexpr (NK == 4) V::hsum4(acc[r], sc);
    else
      for (int u = 0; u < NK; ++u) sc[u] = V::hsum(acc[r][u]);
    for (int u = 0; u < NK; ++u) {
      for (int64_t d = hv; d < hd; ++d) sc[u] += q[r * hd + d] * kj[u][d];
      s[r * n + u] = sc[u] * inv_sqrt;
    }
  }
}

// Scores of NK consecutive keys (from key j0) for query rows [0, rows) of qbuf into sbuf [rows, n].
template <int HD, int NK>
static inline void score_keys(const float* qbuf, int64_t rows, int64_t hd, const float* const* kj, float inv_sqrt,
                              float* sbuf, int64_t n, int64_t j0) {
  constexpr int kRT = NK > 1 ? 3 : 4;  // RT x NK accumulators in registers
  int64_t r = 0;
  for (; r + kRT <= rows; r += kRT) score_tile<HD, NK, kRT>(qbuf + r * hd, hd, kj, inv_sqrt, sbuf + r * n + j0, n);
  for (; r < rows; ++r) score_tile<HD, NK, 1>(qbuf + r * hd, hd, kj, inv_sqrt, sbuf + r * n + j0, n);
}

// o[r] += sum over keys j0 .. j0 + NK - 1 (those before lim[r]: row r's visible keys) of p[r, j] * v_j: one
// load and store of o per NK keys. Keys past a row's limit are never read (their cache rows may hold anything).
template <int HD, int NK>
static inline void accumulate_keys(const float* sbuf, int64_t n, int64_t j0, int64_t rows, int64_t hd_rt,
                                   const float* const* vj, float* obuf, const int64_t* lim) {
  const int64_t hd = HD > 0 ? HD : hd_rt, hv = hd - hd % V::W;
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = sbuf + r * n + j0;
    float* o = obuf + r * hd;
    const int64_t cnt = lim[r] - j0;
    if (cnt >= NK) {
      typename V::F pv[NK];
      for (int u = 0; u < NK; ++u) pv[u] = V::bcast(p[u]);
#pragma GCC unroll 16
      for (int64_t d = 0; d < hv; d += V::W) {
        typename V::F acc = V::load(o + d);
        for (int u = 0; u < NK; ++u) acc = V::fma(pv[u], V::load(vj[u] + d), acc);
        V::store(o + d, acc);
      }
      for (int64_t d = hv; d < hd; ++d)
        for (int u = 0; u < NK; ++u) o[d] += p[u] * vj[u][d];
    } else {
      for (int64_t u = 0; u < cnt; ++u) {
        const typename V::F pu = V::bcast(p[u]);
        for (int64_t d = 0; d < hv; d += V::W) V::store(o + d, V::fma(pu, V::load(vj[u] + d), V::load(o + d)));
        for (int64_t d = hv; d < hd; ++d) o[d] += p[u] * vj[u][d];
      }
    }
  }
}

// The max m of s[0, lim) (lim > 0) and the sum of e_j = exp(s_j - m) over it (vector max, exp and sum);
// kStore: s[j] = e_j.
struct RowStats {
  float m, sum;
};
template <bool kStore>
static inline RowStats exp_sum(float* s, int64_t lim) {
  const int64_t lv = lim - lim % V::W;
  alignas(64) float tail[V::W];
  for (int i = 0; i < V::W; ++i) tail[i] = lv + i < lim ? s[lv + i] : s[0];  // padded with a real score
  typename V::F mv = V::load(tail);
  for (int64_t j = 0; j < lv; j += V::W) mv = V::max(mv, V::load(s + j));
  const float m = V::hmax(mv);
  const typename V::F neg_m = V::bcast(-m);
  typename V::F sumv = V::zero();
  for (int64_t j = 0; j < lv; j += V::W) {
    const typename V::F e = vexp_nonpositive(V::add(V::load(s + j), neg_m));
    if constexpr (kStore) V::store(s + j, e);
    sumv = V::add(sumv, e);
  }
  V::store(tail, vexp_nonpositive(V::add(V::load(tail), neg_m)));
  float sum = V::hsum(sumv);
  for (int64_t j = lv; j < lim; ++j) {
    sum += tail[j - lv];
    if constexpr (kStore) s[j] = tail[j - lv];
  }
  return {m, sum};
}

static inline float round_p(float p, bool round_bf16) { return round_bf16 ? bf16_to_f32(f32_to_bf16_rne(p)) : p; }

// Softmax of s[0, lim) in place; s[lim, n) = 0.
static inline void softmax_row(float* s, int64_t lim, int64_t n, bool round_bf16) {
  if (lim <= 0) {
    for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
    return;
  }
  const float inv = 1.f / exp_sum<true>(s, lim).sum;
  for (int64_t j = 0; j < lim; ++j) s[j] = round_p(s[j] * inv, round_bf16);
  for (int64_t j = lim; j < n; ++j) s[j] = 0.f;
}

// A key split's part of a row (kAttnPart): s[j0, e1) = exp(s_j - m) in place over the part's visible keys
// (e1 = min(j1, lim)), m their max; *m and *sum (-inf and 0 when the part sees none).
static inline void softmax_local(float* s, int64_t lim, int64_t j0, int64_t j1, float* m, float* sum) {
  const int64_t e1 = imin(j1, lim);
  if (e1 <= j0) {
    *m = -INFINITY, *sum = 0.f;
    return;
  }
  const RowStats st = exp_sum<true>(s + j0, e1 - j0);
  *m = st.m, *sum = st.sum;
}

#ifdef ER_NATIVE_AVX512_BF16
// Scores of query rows [r0, r0 + rows) of batch row b against keys [j0, j1) of KV heads [kv0, kv1), key by
// key, for a bf16 q and cache (hd a multiple of 32): vdpbf16ps on q's and each key's bf16 values as they
// are (pairs along the head dimension), so no key is converted to f32; the products of two bf16 are exact,
// as in the f32 path, and the sums are f32 in another order (with denormals flushed, as in the bf16
// matmul; docs/native.md). Rows not visible to a query are scored too (softmax_row ignores them).
static void score_keys_dp(const AttnProblem& a, int64_t b, int64_t kv0, int64_t kv1, int64_t r0, int64_t rows,
                          int64_t hd, float inv_sqrt, float* sbuf, int64_t n, int64_t j0, int64_t j1) {
  const int64_t nkv = kv1 - kv0, key_stride = a.KV * hd;
  thread_local std::vector<uint16_t> qbv;
  qbv.resize(nkv * rows * hd);
  uint16_t* qb = qbv.data();
  const uint16_t* q = static_cast<const uint16_t*>(a.q);
  for (int64_t kv = kv0; kv < kv1; ++kv)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = (r0 + r) / a.G, g = (r0 + r) % a.G;
      std::memcpy(qb + ((kv - kv0) * rows + r) * hd, q + ((b * a.T + t) * a.H + kv * a.G + g) * hd, 2 * hd);
    }
  const uint16_t* keys = static_cast<const uint16_t*>(a.k) + b * a.S * key_stride;
  for (int64_t j = j0; j < j1; ++j) {
    const char* ahead = reinterpret_cast<const char*>(keys + (j + 8) * key_stride + kv0 * hd);
    if (j + 8 < j1)
      for (int64_t off = 0; off < nkv * hd * 2; off += 64) __builtin_prefetch(ahead + off);
    for (int64_t kv = kv0; kv < kv1; ++kv) {
      const uint16_t* kr = keys + j * key_stride + kv * hd;
      const int64_t h = kv - kv0;
      for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* qr = qb + (h * rows + r) * hd;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; d += 32)
          acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qr + d), (__m512bh)_mm512_loadu_si512(kr + d));
        sbuf[(h * rows + r) * n + j] = _mm512_reduce_add_ps(acc) * inv_sqrt;
      }
    }
  }
}
#endif

// The value pass of up to kKeyByKeyRows query rows with their outputs in registers: RT rows x HD / W
// accumulators, one head's keys [j0, min(j1, max lim)) streamed once per tile (a bf16 value row widened in registers),
// p[r, j] * v_j added only for j < lim[r] (keys past a row's limit are read only for the tile's other rows,
// which see them; nothing past the tile's largest limit is read). kVRegs: the ISA's vector registers.
constexpr int kVRegs = V::W >= 16 ? 32 : 16;
template <int HD>
constexpr int kValueTileRows = HD > 0 ? (kVRegs - 2 * (HD / V::W) - 1) / (HD / V::W) : 0;

template <int HD, int RT>
static inline void value_tile(const void* cache, bool bf16, const float* sb, int64_t n, const int64_t* lim,
                              int64_t j0, int64_t j1, int64_t key0, int64_t key_stride, float* ob, int64_t pf_bytes) {
  constexpr int NV = HD / V::W;
  constexpr int64_t kAhead = 32;  // keys, as attend_hd's prefetch
  const int64_t esize = bf16 ? 2 : 4;
  typename V::F acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int d = 0; d < NV; ++d) acc[r][d] = V::zero();
  int64_t lo = lim[0], hi = lim[0];
  for (int r = 1; r < RT; ++r) lo = imin(lo, lim[r]), hi = lim[r] > hi ? lim[r] : hi;
  hi = imin(hi, j1);
  for (int64_t j = j0; j < hi; ++j) {
    typename V::F vv[NV];
    const int64_t off = key0 + j * key_stride;
    if (pf_bytes && j + kAhead < hi)  // the first tile of the first head: the whole span of key j + kAhead
      for (int64_t o = 0; o < pf_bytes; o += 64)
        __builtin_prefetch(static_cast<const char*>(cache) + (off + kAhead * key_stride) * esize + o);
    for (int d = 0; d < NV; ++d)
      vv[d] = bf16 ? V::load_bf16(static_cast<const uint16_t*>(cache) + off + d * V::W)
                   : V::load(static_cast<const float*>(cache) + off + d * V::W);
    for (int r = 0; r < RT; ++r) {
      if (j >= lo && j >= lim[r]) continue;
      const typename V::F pb = V::bcast(sb[r * n + j]);
      for (int d = 0; d < NV; ++d) acc[r][d] = V::fma(pb, vv[d], acc[r][d]);
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int d = 0; d < NV; ++d) V::store(ob + r * HD + d * V::W, acc[r][d]);
}

template <int HD, int RT>
static inline void value_rows(int64_t rows, const void* cache, bool bf16, const float* sb, int64_t n,
                              const int64_t* lim, int64_t j0, int64_t j1, int64_t key0, int64_t key_stride, float* ob,
                              int64_t pf_bytes) {
  if constexpr (RT >= 1) {
    int64_t r = 0;
    for (; r + RT <= rows; r += RT, pf_bytes = 0)
      value_tile<HD, RT>(cache, bf16, sb + r * n, n, lim + r, j0, j1, key0, key_stride, ob + r * HD, pf_bytes);
    if (r < rows)
      value_rows<HD, RT - 1>(rows - r, cache, bf16, sb + r * n, n, lim + r, j0, j1, key0, key_stride, ob + r * HD,
                             pf_bytes);
  }
}

template <int HD>
static void attend_hd(const AttnProblem& a, int64_t b, int64_t kv0, int64_t kv1, int64_t r0, int64_t r1,
                      const AttnPart& part) {
  constexpr int kScoreKeys = 4, kValueKeys = 8;  // keys processed together in each pass (many rows)
  // Up to this many query rows (a decode step's G, a short verify) both passes go key by key instead:
  // every key's span of KV heads is read front to back. At batch 64, 150 cached positions (f32, one
  // thread) that ran an item in 19 us instead of 37 (the key groups' reads jump between keys and heads and
  // kept the loads from DRAM at ~6 GB/s); at 24 rows the two were level, at 36 the groups ahead.
  constexpr int64_t kKeyByKeyRows = 16;
  const int64_t rows = r1 - r0, hd = HD > 0 ? HD : a.hd, nkv = kv1 - kv0, hrows = nkv * rows;  // hrows: (kv, row) pairs
  // Per-thread buffers, grown as needed; plain pointers below (a thread_local access in a shared library
  // is a function call). Row h = (kv - kv0) * rows + r of qbuf / sbuf / obuf.
  thread_local std::vector<float> qv, sv, ov, rowv;
  thread_local std::vector<int64_t> limv;
  qv.resize(hrows * hd);
  ov.assign(hrows * hd, 0.f);
  rowv.resize(kValueKeys * hd);
  limv.resize(rows);
  float *qbuf = qv.data(), *obuf = ov.data(), *rowbuf = rowv.data();
  int64_t* lim = limv.data();
  int64_t n = 0;
  auto q_off = [&](int64_t kv, int64_t r) {  // row r0 + r = t * G + g of KV head kv
    const int64_t t = (r0 + r) / a.G, g = (r0 + r) % a.G;
    return ((b * a.T + t) * a.H + kv * a.G + g) * hd;
  };
  const bool whole = part.phase == kAttnWhole;
  for (int64_t r = 0; r < rows; ++r) {
    lim[r] = imin(a.pos[b * a.T + (r0 + r) / a.G], a.S - 1) + 1;  // visible keys [0, lim)
    if (lim[r] > n) n = lim[r];
    for (int64_t kv = kv0; kv < kv1; ++kv) {
      const int64_t off = q_off(kv, r);
      float* qr = qbuf + ((kv - kv0) * rows + r) * hd;
      for (int64_t d = 0; d < hd; ++d)
        qr[d] = a.q_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(a.q)[off + d]) : static_cast<const float*>(a.q)[off + d];
    }
  }
  const float inv_sqrt = 1.f / std::sqrt(static_cast<float>(hd));
  // This item's keys [j0, j1); its scores (or, in the value phase, p) of row h at sbuf + h * n + j.
  const int64_t j0 = whole ? 0 : part.j0, j1 = whole ? n : imin(part.j1, n);
  sv.resize(hrows * (n > 0 ? n : 1));
  float* sbuf = sv.data();
  const int64_t key_stride = a.KV * hd, base = b * a.S * key_stride;
  const int64_t esize = a.kv_bf16 ? 2 : 4, span = nkv * hd * esize;  // bytes of one key this item reads
  // Key j of heads [kv0, kv1) is one contiguous span, key_stride elements after key j - 1's: prefetch
  // 32 keys ahead (at batch 64 a key's work is shorter than a DRAM miss: 8 keys ahead ran SmolLM2's 30
  // layers at 300 positions in 49-55 ms, 32 in 43-48, 16 and 64 no better than 8).
  constexpr int64_t kAhead = 32;
  auto prefetch = [&](const void* cache, int64_t j) {
    if (j >= j1) return;
    const char* p = static_cast<const char*>(cache) + (base + j * key_stride + kv0 * hd) * esize;
    for (int64_t off = 0; off < span; off += 64) __builtin_prefetch(p + off);
  };
  // An f32 cache's score pass prefetches the values of its keys too where they fit in L2 beside the rest
  // (two streams in flight instead of one; the value pass then reads them from cache), and the first kAhead
  // keys before it starts. SmolLM2's 30 layers at 300 positions in a batch-1 step (traced, with the split
  // below): 1.3-1.5 ms -> 1.0 ms. With a bf16 cache it made them slower (0.9-1.1 -> 1.0-1.3 ms), so not there.
  constexpr int64_t kValuesInL2 = 256 << 10;
  const bool pf_values = !a.kv_bf16 && (j1 - j0) * span <= kValuesInL2;
  for (int64_t j = j0; j < imin(j0 + kAhead, j1); ++j) {
    prefetch(a.k, j);
    if (pf_values) prefetch(a.v, j);
  }
  const float* rp[kValueKeys];
  auto rows_at = [&](const void* cache, int64_t j0, int nk, int64_t kv) {
    for (int u = 0; u < nk; ++u)
      rp[u] = kv_row(cache, base + (j0 + u) * key_stride + kv * hd, hd, a.kv_bf16, rowbuf + u * hd);
  };
  // Keys [j0, j1) in groups of NK (then one by one): fn_group(j, h) / fn_one(j, h) for each KV head h.
  auto for_keys = [&](auto nk, const void* cache, auto&& fn_group, auto&& fn_one) {
    constexpr int NK = decltype(nk)::value;
    int64_t j = j0;
    const bool values_too = pf_values && cache == a.k;
    for (; j + NK <= j1; j += NK) {
      for (int u = 0; u < NK; ++u) {
        prefetch(cache, j + u + kAhead);
        if (values_too) prefetch(a.v, j + u + kAhead);
      }
      for (int64_t kv = kv0; kv < kv1; ++kv) {
        rows_at(cache, j, NK, kv);
        fn_group(j, kv - kv0);
      }
    }
    for (; j < j1; ++j)
      for (int64_t kv = kv0; kv < kv1; ++kv) {
        rows_at(cache, j, 1, kv);
        fn_one(j, kv - kv0);
      }
  };
  using One = std::integral_constant<int, 1>;
  using Score = std::integral_constant<int, kScoreKeys>;
  using Value = std::integral_constant<int, kValueKeys>;
  auto score_one = [&](int64_t j, int64_t h) {
    score_keys<HD, 1>(qbuf + h * rows * hd, rows, hd, rp, inv_sqrt, sbuf + h * rows * n, n, j);
  };
  auto value_one = [&](int64_t j, int64_t h) {
    accumulate_keys<HD, 1>(sbuf + h * rows * n, n, j, rows, hd, rp, obuf + h * rows * hd, lim);
  };
  const bool by_key = rows <= kKeyByKeyRows;
#ifdef ER_NATIVE_AVX512_BF16
  if (by_key && a.q_bf16 && a.kv_bf16 && hd % 32 == 0)  // vdpbf16ps on q and the cache's bf16 keys in place
    score_keys_dp(a, b, kv0, kv1, r0, rows, hd, inv_sqrt, sbuf, n, j0, j1);
  else
#endif
  if (by_key) for_keys(One{}, a.k, score_one, score_one);
  else
    for_keys(Score{}, a.k,
             [&](int64_t j, int64_t h) { score_keys<HD, kScoreKeys>(qbuf + h * rows * hd, rows, hd, rp, inv_sqrt, sbuf + h * rows * n, n, j); },
             score_one);
  for (int64_t h = 0; h < hrows; ++h) {
    if (whole) softmax_row(sbuf + h * n, lim[h % rows], n, a.kv_bf16);
    else softmax_local(sbuf + h * n, lim[h % rows], j0, j1, part.stats + h, part.stats + hrows + h);
  }
  // Few rows: outputs in registers (value_tile), one KV head at a time, for a bf16 cache and for a split part
  // of an f32 one (its keys' values were prefetched into L2 by the score pass: 0.73-0.88x the key-by-key order's
  // time at batch 1-3). A whole f32 row reads twice the bytes of a bf16 one and is bound by them; there the
  // key-by-key order below (each key's heads in one contiguous read) is faster.
  const bool tiled = by_key && (a.kv_bf16 || !whole) && kValueTileRows<HD> >= 1;
  if constexpr (kValueTileRows<HD> >= 1) {
    if (tiled) {
      for (int64_t j = j0; j < j0 + kAhead; ++j) prefetch(a.v, j);
      for (int64_t kv = kv0; kv < kv1; ++kv) {
        const int64_t h = kv - kv0;
        value_rows<HD, kValueTileRows<HD>>(rows, a.v, a.kv_bf16, sbuf + h * rows * n, n, lim, j0, j1, base + kv * hd,
                                           key_stride, obuf + h * rows * hd, kv == kv0 ? span : 0);
      }
    }
  }
  if (by_key && !tiled) for_keys(One{}, a.v, value_one, value_one);
  else if (!by_key)
    for_keys(Value{}, a.v,
             [&](int64_t j, int64_t h) { accumulate_keys<HD, kValueKeys>(sbuf + h * rows * n, n, j, rows, hd, rp, obuf + h * rows * hd, lim); },
             value_one);
  if (!whole) {
    std::memcpy(part.o_part, obuf, sizeof(float) * hrows * hd);
    return;
  }
  for (int64_t kv = kv0; kv < kv1; ++kv)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t off = q_off(kv, r);
      const float* orow = obuf + ((kv - kv0) * rows + r) * hd;
      for (int64_t d = 0; d < hd; ++d) {
        if (a.q_bf16) static_cast<uint16_t*>(a.o)[off + d] = f32_to_bf16_rne(orow[d]);
        else static_cast<float*>(a.o)[off + d] = orow[d];
      }
    }
}

static void attend(const AttnProblem& a, int64_t b, int64_t kv0, int64_t kv1, int64_t r0, int64_t r1,
                   const AttnPart& part) {
  if (a.hd == 64) attend_hd<64>(a, b, kv0, kv1, r0, r1, part);
  else if (a.hd == 128) attend_hd<128>(a, b, kv0, kv1, r0, r1, part);
  else attend_hd<0>(a, b, kv0, kv1, r0, r1, part);
}

// ---------------------------------------------------------------------------------------------------
// Sampling (er_native.cc's sample_impl): one draw from p_j proportional to exp(logw_j - max) by inverse
// CDF: w_j = vexp_nonpositive(logw_j - max) into buf (f32; exactly 0 for -inf), f64 sums of blocks of
// kSampleBlock weights (four interleaved partial sums, which the compiler may keep in one vector), the
// total = the block sums added in order, then the block where the running sum of block sums first exceeds
// u * total — the same additions as the total's, so a block is always found (u < 1) — and in it the first
// j whose running f64 sum exceeds it. (Before: one f64 sum chain per entry for the total and for the scan,
// 3.9 ms for 64 rows of 49152.) Should the in-block sum, added in another order than the block's sum,
// stop short, the block's last nonzero weight is drawn: the f64 rounding of a block's sum, ~1e-16 of
// the total. *log_norm = max + log(total), so the drawn token's log-prob is logw_j - *log_norm. Returns -1
// when the row has no finite maximum (all -inf or NaN).
constexpr int64_t kSampleBlock = 64;

static int32_t sample_row(const float* logw, int64_t n, float u, float* buf, double* log_norm) {
  if (n <= 0) return -1;
  const int64_t nv = n - n % V::W;
  alignas(64) float tail[V::W];
  for (int i = 0; i < V::W; ++i) tail[i] = nv + i < n ? logw[nv + i] : logw[0];
  typename V::F mv = V::load(tail);
  for (int64_t j = 0; j < nv; j += V::W) mv = V::max(mv, V::load(logw + j));
  const float m = V::hmax(mv);
  if (!(m > -INFINITY && m < INFINITY)) return -1;
  const typename V::F neg_m = V::bcast(-m);
  for (int64_t j = 0; j < nv; j += V::W) V::store(buf + j, vexp_nonpositive(V::add(V::load(logw + j), neg_m)));
  V::store(tail, vexp_nonpositive(V::add(V::load(tail), neg_m)));
  for (int64_t j = nv; j < n; ++j) buf[j] = tail[j - nv];
  const int64_t nb = (n + kSampleBlock - 1) / kSampleBlock;
  thread_local std::vector<double> bsv;
  if (static_cast<int64_t>(bsv.size()) < nb) bsv.resize(nb);
  double* bs = bsv.data();
  double total = 0.0;
  for (int64_t i = 0; i < nb; ++i) {
    const float* w = buf + i * kSampleBlock;
    const int64_t len = imin(kSampleBlock, n - i * kSampleBlock);
    double a[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t j = 0;
    for (; j + 4 <= len; j += 4)
      for (int q = 0; q < 4; ++q) a[q] += w[j + q];
    for (; j < len; ++j) a[0] += w[j];
    bs[i] = (a[0] + a[1]) + (a[2] + a[3]);
    total += bs[i];
  }
  *log_norm = static_cast<double>(m) + std::log(total);
  const double target = static_cast<double>(u) * total;
  double cum = 0.0;
  int64_t i = 0;
  for (; i + 1 < nb && !(cum + bs[i] > target); ++i) cum += bs[i];  // the last block: cum + bs = total > target
  const int64_t j0 = i * kSampleBlock, j1 = imin(n, j0 + kSampleBlock);
  int32_t last = -1;
  for (int64_t j = j0; j < j1; ++j) {
    if (buf[j] == 0.f) continue;
    cum += buf[j];
    last = static_cast<int32_t>(j);
    if (cum > target) return last;
  }
  return last;
}

// ---------------------------------------------------------------------------------------------------
// A decoder layer's pointwise ops (RowProblem, er_native.h): rows [r0, r1), each read into f32, computed in
// f32 and rounded once into the output's dtype. kernels/pointwise.py holds the references.

static inline void row_in(const void* src, bool bf16, int64_t off, int64_t n, float* dst) {
  if (!bf16) {
    std::memcpy(dst, static_cast<const float*>(src) + off, sizeof(float) * n);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src) + off;
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store(dst + i, V::load_bf16(s + i));
  for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
}

static inline void row_out(const float* src, int64_t n, void* dst, bool bf16, int64_t off) {
  if (!bf16) {
    std::memcpy(static_cast<float*>(dst) + off, src, sizeof(float) * n);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst) + off;
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store_bf16(d + i, V::load(src + i));
  for (; i < n; ++i) d[i] = f32_to_bf16_rne(src[i]);
}

static inline float silu_scalar(float g) { return g / (1.f + std::exp(-g)); }

// x / (1 + e^-x) * u over n floats, in place into g: e^-|x| on vexp_nonpositive, so nothing overflows.
static inline void silu_mul_f32(float* g, const float* u, int64_t n) {
  const typename V::F zero = V::zero(), one = V::bcast(1.f), neg = V::bcast(-1.f);
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) {
    const typename V::F x = V::load(g + i);
    const typename V::F e = vexp_nonpositive(V::mul(V::max(x, V::mul(x, neg)), neg));  // e^-|x|
    const typename V::F pos = V::and_ge(x, zero, one);                                  // x >= 0
    const typename V::F num = V::add(pos, V::fnmadd(pos, e, e));                         // x >= 0 ? 1 : e
    V::store(g + i, V::mul(V::mul(x, V::div(num, V::add(one, e))), V::load(u + i)));
  }
  for (; i < n; ++i) g[i] = silu_scalar(g[i]) * u[i];
}

// Rotate-half RoPE of one head (hd floats, in place) by the row's cos / sin [hd / 2].
static inline void rope_head(float* x, const float* c, const float* s, int64_t half) {
  int64_t i = 0;
  for (; i + V::W <= half; i += V::W) {
    const typename V::F x1 = V::load(x + i), x2 = V::load(x + half + i), ci = V::load(c + i), si = V::load(s + i);
    V::store(x + i, V::fnmadd(x2, si, V::mul(x1, ci)));
    V::store(x + half + i, V::fma(x1, si, V::mul(x2, ci)));
  }
  for (; i < half; ++i) {
    const float x1 = x[i], x2 = x[half + i];
    x[i] = x1 * c[i] - x2 * s[i];
    x[half + i] = x2 * c[i] + x1 * s[i];
  }
}

static void rows(const RowProblem& p, int64_t r0, int64_t r1) {
  thread_local std::vector<float> bufv;
  if (static_cast<int64_t>(bufv.size()) < p.n) bufv.resize(p.n);
  float* buf = bufv.data();
  for (int64_t r = r0; r < r1; ++r) {
    row_in(p.x, p.bf16, r * p.n, p.n, buf);
    if (p.op == kRmsNorm) {
      typename V::F acc = V::zero();
      int64_t i = 0;
      for (; i + V::W <= p.n; i += V::W) acc = V::fma(V::load(buf + i), V::load(buf + i), acc);
      float ss = V::hsum(acc);
      for (; i < p.n; ++i) ss += buf[i] * buf[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(p.n) + p.eps);
      const typename V::F vi = V::bcast(inv);
      for (i = 0; i + V::W <= p.n; i += V::W) V::store(buf + i, V::mul(V::mul(V::load(buf + i), vi), V::load(p.w + i)));
      for (; i < p.n; ++i) buf[i] = buf[i] * inv * p.w[i];
      row_out(buf, p.n, p.y[0], p.bf16, r * p.n);
    } else if (p.op == kSiluMul) {
      const int64_t half = p.n / 2;
      silu_mul_f32(buf, buf + half, half);
      row_out(buf, half, p.y[0], p.bf16, r * half);
    } else {  // kRopeQkv: heads [0, H) -> q, [H, H + KV) -> k, both rotated; [H + KV, H + 2 KV) -> v
      const int64_t half = p.hd / 2;
      for (int64_t h = 0; h < p.heads + p.kv_heads; ++h) rope_head(buf + h * p.hd, p.cos + r * half, p.sin + r * half, half);
      const int64_t nq = p.heads * p.hd, nk = p.kv_heads * p.hd;
      row_out(buf, nq, p.y[0], p.bf16, r * nq);
      row_out(buf + nq, nk, p.y[1], p.bf16, r * nk);
      row_out(buf + nq + nk, nk, p.y[2], p.bf16, r * nk);
    }
  }
}
