// The matmul kernels, written once over a small vector interface `V` and compiled once per ISA.
// Included by isa_*.cc inside an anonymous namespace, after that unit has defined
//   struct V { using F (W floats); using I (W int32); static constexpr int W;
//              zero, load, store, bcast, fma(a, b, c) = a * b + c, add,
//              load_bf16 (W bf16 -> f32), load_i8 (W int8 -> f32), load_u8_i32 (W uint8 -> int32),
//              load_u4 (W bytes -> the low / high nibbles minus a zero point, as f32) };
// and the register-tile shapes kMR1/kNV1 (M == 1), kMR2/kNV2 (M == 2), kMRB/kNVB (M >= 3).
//
// Layout (er_jax.quant.QuantArray, read in place): W is row-major [K, N] (int4: [Kp/2, N] bytes,
// byte j = rows 2j (low nibble) and 2j+1 (high nibble)). The work unit is a range of output columns
// [c0, c1) for all M rows (threads split N). Inside it: k-outer in blocks of G rows (int4: one
// quantization group), columns in tiles of NV vectors, rows of M in tiles of MR; a tile keeps its
// MR x NV accumulators in registers across the block's G rows, then adds them into a small f32 scratch
// [M, c1 - c0] (L1/L2 resident). Each weight byte is loaded from memory once per call; the M tiles after
// the first re-read the block's G x (NV * W) panel from L1.

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
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

// int4: packed rows [r0, r1) of group g; scratch += (sum_k x[m, k] * (q[k] - zero[g])) * scale[g].
template <int MR, int NV>
static inline void tile_int4(const Problem& p, int64_t g, int64_t r0, int64_t r1, int64_t col, int64_t m0,
                             float* sc, int64_t ss) {
  const uint8_t* data = static_cast<const uint8_t*>(p.w);
  typename V::I z[NV];
  for (int j = 0; j < NV; ++j) z[j] = V::load_u8_i32(p.zero + g * p.n + col + j * V::W);
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
      V::load_u4(row + j * V::W, z[j], lo, hi);
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

template <int FMT, int MR, int NV>
static void m_tiles(const Problem& p, int64_t b0, int64_t b1, int64_t g, int64_t col, int64_t c0, float* scratch,
                    int64_t cw) {
  int64_t m = 0;
  for (; m + MR <= p.m; m += MR) tile<FMT, MR, NV>(p, b0, b1, g, col, m, scratch + m * cw + (col - c0), cw);
  if (m < p.m) tile_rem<FMT, MR - 1, NV>(p.m - m, p, b0, b1, g, col, m, scratch + m * cw + (col - c0), cw);
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
        const int32_t z = p.zero[g * p.n + n];
        for (int64_t r = b0; r < b1; ++r) {
          const int32_t byte = data[r * p.n + n];
          acc += x[2 * r] * static_cast<float>((byte & 15) - z);
          acc += x[2 * r + 1] * static_cast<float>((byte >> 4) - z);
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

template <int FMT, int MR, int NV>
static void block(const Problem& p, int64_t b0, int64_t b1, int64_t g, int64_t c0, int64_t c1, float* scratch) {
  const int64_t cw = c1 - c0;
  int64_t col = c0;
  for (; col + NV * V::W <= c1; col += NV * V::W) m_tiles<FMT, MR, NV>(p, b0, b1, g, col, c0, scratch, cw);
  for (; col + V::W <= c1; col += V::W) m_tiles<FMT, MR, 1>(p, b0, b1, g, col, c0, scratch, cw);
  if (col < c1) tail_columns<FMT>(p, b0, b1, g, col, c0, c1, scratch, cw);
}

static void finalize(const Problem& p, int64_t c0, int64_t c1, const float* scratch) {
  const int64_t cw = c1 - c0;
  for (int64_t m = 0; m < p.m; ++m) {
    const float* s = scratch + m * cw;
    if (p.y_bf16) {
      uint16_t* y = static_cast<uint16_t*>(p.y) + m * p.n + c0;
      if (p.fmt == kInt8)
        for (int64_t i = 0; i < cw; ++i) y[i] = f32_to_bf16(s[i] * p.scale[c0 + i]);
      else
        for (int64_t i = 0; i < cw; ++i) y[i] = f32_to_bf16(s[i]);
    } else {
      float* y = static_cast<float*>(p.y) + m * p.n + c0;
      if (p.fmt == kInt8)
        for (int64_t i = 0; i < cw; ++i) y[i] = s[i] * p.scale[c0 + i];
      else
        std::memcpy(y, s, sizeof(float) * cw);
    }
  }
}

template <int FMT, int MR, int NV>
static void run_fmt(const Problem& p, int64_t c0, int64_t c1, float* scratch) {
  std::memset(scratch, 0, sizeof(float) * p.m * (c1 - c0));
  const int64_t G = p.group;
  if constexpr (FMT == kInt4) {
    const int64_t rows = (p.k + 1) / 2;  // packed rows holding a real row (the padding's x is zero)
    for (int64_t g = 0; g * G < p.k; ++g)
      block<FMT, MR, NV>(p, g * G / 2, imin((g + 1) * G / 2, rows), g, c0, c1, scratch);
  } else {
    for (int64_t k0 = 0; k0 < p.k; k0 += G) block<FMT, MR, NV>(p, k0, imin(k0 + G, p.k), 0, c0, c1, scratch);
  }
  finalize(p, c0, c1, scratch);
}

template <int FMT>
static void run_m(const Problem& p, int64_t c0, int64_t c1, float* scratch) {
  if (p.m == 1) run_fmt<FMT, kMR1, kNV1>(p, c0, c1, scratch);
  else if (p.m == 2) run_fmt<FMT, kMR2, kNV2>(p, c0, c1, scratch);
  else run_fmt<FMT, kMRB, kNVB>(p, c0, c1, scratch);
}

static void run_columns(const Problem& p, int64_t c0, int64_t c1, float* scratch) {
  switch (p.fmt) {
    case kF32: run_m<kF32>(p, c0, c1, scratch); break;
    case kBF16: run_m<kBF16>(p, c0, c1, scratch); break;
    case kInt8: run_m<kInt8>(p, c0, c1, scratch); break;
    case kInt4: run_m<kInt4>(p, c0, c1, scratch); break;
    default: break;
  }
}
