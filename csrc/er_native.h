// er_jax native CPU kernels: declarations shared by the dispatcher (er_native.cc) and the per-ISA
// translation units (isa_*.cc). Only plain C++ types cross this boundary: each ISA unit is compiled
// with its own -m flags, so nothing here may instantiate a template or define an inline function that
// the linker could merge across units (that could run AVX-512 code on an AVX2-only machine).
#pragma once
#include <cstdint>

namespace er_native {

// kAvx512Bf16: the AVX-512 kernels plus vdpbf16ps (avx512_bf16) for bf16 x times bf16 panel weights.
// kAmx: the avx512bf16 kernels plus AMX tiles (amx_bf16) for bf16 / int8 / int4 panels times bf16 x.
enum Isa : int32_t { kAuto = 0, kPortable = 1, kAvx2 = 2, kAvx512 = 3, kAvx512Bf16 = 4, kAmx = 5, kIsaCount = 6 };
enum Format : int32_t { kF32 = 0, kBF16 = 1, kInt8 = 2, kInt4 = 3, kF32Panel = 4, kBF16Panel = 5, kInt8Panel = 6,
                         kInt4Panel = 7 };

// Panel-major weights (er_jax.panels.PanelArray; f32, bf16, int8 with a per-column scale [1, N], or int4
// bytes with scale / zero [Kp/G, N] as in the [Kp/2, N] layout): W [N / kPanelCols, R, kPanelCols] (R = K,
// int4: Kp / 2 byte rows), column kPanelCols * j + i of row r at [j, r, i]; N is a multiple of kPanelCols.
constexpr int64_t kPanelCols = 16;

// One matmul y[M, N] = x[M, K] @ W[K, N]. x has been converted to f32 (row stride xs >= K, zero-padded
// up to a multiple of the block size so the int4 kernel may read the padding rows' x as zeros).
struct Problem {
  int32_t fmt;
  int64_t m, k, n;
  const float* x;
  int64_t xs;
  const void* w;        // f32 | bf16 (uint16) | int8 [K, N]; int4: uint8 [Kp/2, N]; panels: [N/16, R, 16]
  const float* scale;   // int8: [1, N]; int4: [Kp/G, N] (panels too)
  const uint8_t* zero;  // int4: [Kp/G, N] (panels too)
  int64_t group;        // int4 group size G (even)
  int64_t rows;         // panels: rows per panel (K; int4: Kp / 2 byte rows)
  const uint16_t* xb;   // x's own bf16 values [M, K] (row stride K) when x is bf16, else nullptr
};

// The f32 partial sums of rows [k0, k1) of W for output columns [c0, c1) and all M rows, written to
// (or, with accumulate, added to) acc [M, c1 - c0]; int8's per-column scale is not applied.
// int4: k0 is a multiple of the group size. Panels: c0 and c1 are multiples of kPanelCols.
typedef void (*RunBlockFn)(const Problem& p, int64_t k0, int64_t k1, int64_t c0, int64_t c1, float* acc,
                           bool accumulate);

// Attention over one layer of the KV cache, read in place (see attention_impl in er_native.cc).
struct AttnProblem {
  int64_t B, T, H, KV, G, hd, S;
  const void* q;    // f32 | bf16 [B, T, H, hd]
  const void* k;    // f32 | bf16 [B, S, KV, hd]: this layer of the cache
  const void* v;
  const int32_t* pos;  // [B, T]
  void* o;          // q's dtype, [B, T, H, hd]
  bool q_bf16, kv_bf16;
};

// A work item's part of the keys (attention_impl splits the keys of an f32 cache's batch rows when they are
// too few to give every thread work): kAttnWhole reads all of a row's visible keys and writes o; kAttnPart
// reads keys [j0, j1) only, with a softmax over those keys alone (flash-decoding), and writes that part's
// unnormalized share of o, f32 [KV * rows, hd], to o_part and each (KV head, query row)'s max score and sum
// of exp(s - max) over the part's visible keys to stats ([2, KV * rows]: maxima, then sums; -inf and 0 for a
// row that sees none of them); attend_split rescales and adds the parts.
enum AttnPhase { kAttnWhole = 0, kAttnPart = 1 };
struct AttnPart {
  int32_t phase;
  int64_t j0, j1;
  float* o_part;
  float* stats;
};

// Query rows [r0, r1) (row = t * G + g) of batch row b, for each KV head in [kv0, kv1).
typedef void (*AttendFn)(const AttnProblem& a, int64_t b, int64_t kv0, int64_t kv1, int64_t r0, int64_t r1,
                         const AttnPart& part);

// Inverse-CDF sampling of one row of n log-weights (see sample_impl in er_native.cc); buf holds n floats;
// *log_norm = the row's log-normalizer log(sum_j exp(logw_j)) (when the row has a finite maximum).
typedef int32_t (*SampleRowFn)(const float* logw, int64_t n, float u, float* buf, double* log_norm);

// A decoder layer's pointwise ops (er_native.cc's pointwise handlers; kernels/pointwise.py has their
// references), rows of x computed in f32 and rounded once into the output's dtype (x's).
enum RowOpKind { kRmsNorm = 0, kSiluMul = 1, kRopeQkv = 2 };
struct RowProblem {
  int32_t op;
  int64_t n;           // elements of an input row: rms_norm D, silu_mul 2 I, rope_qkv (H + 2 KV) hd
  const void* x;       // f32 | bf16 [rows, n]
  bool bf16;           // x's and the outputs' dtype
  void* y[3];          // rms_norm: y[0] [rows, D]; silu_mul: y[0] [rows, I]; rope_qkv: q, k, v
  const float* w;      // rms_norm: the weight [D] as f32
  float eps;           // rms_norm
  const float* cos;    // rope_qkv: [rows, hd / 2]
  const float* sin;
  int64_t hd, heads, kv_heads;  // rope_qkv
};
typedef void (*RowsFn)(const RowProblem& p, int64_t r0, int64_t r1);

struct Kernels {
  const char* name;
  int32_t isa;
  int64_t col_align;  // column blocks start at multiples of this (the widest register tile)
  int64_t panel_align;  // ... and panel-major ones at M >= 3 at multiples of this (that tile's width)
  int64_t k_align;    // row blocks (other than int4's whole groups) start at multiples of this
  RunBlockFn run_block;
  AttendFn attend;
  SampleRowFn sample_row;
  RowsFn rows;
};

}  // namespace er_native

extern "C" {
const er_native::Kernels* er_native_kernels_portable();
#if defined(__x86_64__) || defined(_M_X64)
const er_native::Kernels* er_native_kernels_avx2();
const er_native::Kernels* er_native_kernels_avx512();
const er_native::Kernels* er_native_kernels_avx512bf16();
const er_native::Kernels* er_native_kernels_amx();
#endif
}
