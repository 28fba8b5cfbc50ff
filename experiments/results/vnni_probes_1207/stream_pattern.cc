// Streaming pattern probe: int4-like work (3 shifts, 4 ternlog, 4 vdpbf16ps per 64-B line) over 256 MB,
// (a) tile of NP panels as NP separate streams of PB bytes each (panel-major), (b) the same lines interleaved
// (one sequential stream per tile). Single thread; also 2 threads on halves.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <thread>
#include <vector>
static inline __m512bh pairs(__m512i line, int j) {
  __m512i f = j == 0 ? line : _mm512_srli_epi16(line, 4 * j);
  return (__m512bh)_mm512_ternarylogic_epi32(f, _mm512_set1_epi32(0x000F000F), _mm512_set1_epi32(0x43004300), 0xEA);
}
template <int NP>
float run(const uint8_t* w, size_t bytes, int64_t pb, bool inter, int64_t ahead) {
  // pb: bytes per panel stream; a "matrix" = NP * pb bytes... we walk groups of NP panels
  __m512 acc[NP];
  for (int q = 0; q < NP; ++q) acc[q] = _mm512_setzero_ps();
  const __m512bh xv = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  const size_t group = NP * pb;
  for (size_t g = 0; g + group <= bytes; g += group) {
    const uint8_t* base = w + g;
    for (int64_t r = 0; r < pb; r += 64) {
      for (int q = 0; q < NP; ++q) {
        const uint8_t* line = inter ? base + r * NP + q * 64 : base + q * pb + r;
        if (ahead) __builtin_prefetch(inter ? line + ahead * NP : line + ahead);
        __m512i v = _mm512_loadu_si512(line);
        acc[q] = _mm512_dpbf16_ps(acc[q], pairs(v, 0), xv);
        acc[q] = _mm512_dpbf16_ps(acc[q], pairs(v, 1), xv);
        acc[q] = _mm512_dpbf16_ps(acc[q], pairs(v, 2), xv);
        acc[q] = _mm512_dpbf16_ps(acc[q], pairs(v, 3), xv);
      }
    }
  }
  float s = 0; for (int q = 0; q < NP; ++q) s += _mm512_reduce_add_ps(acc[q]);
  return s;
}
int main(int argc, char** argv) {
  size_t bytes = 256ul << 20;
  uint8_t* w = (uint8_t*)aligned_alloc(4096, bytes);
  for (size_t i = 0; i < bytes; ++i) w[i] = (uint8_t)(i * 131);
  volatile float sink;
  for (int rep = 0; rep < 3; ++rep)
  for (int64_t pb : {4608, 12288}) for (int64_t ahead : {0, 256, 1024}) for (int inter = 0; inter < 2; ++inter) for (int thr : {1, 2}) {
    auto t0 = std::chrono::steady_clock::now();
    if (thr == 1) sink = run<8>(w, bytes, pb, inter, ahead);
    else { std::thread a([&]{ sink = run<8>(w, bytes / 2, pb, inter, ahead); }); sink = run<8>(w + bytes / 2, bytes / 2, pb, inter, ahead); a.join(); }
    double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep == 2 || rep == 0) printf("rep%d panel %5ld B ahead %4ld %s thr%d: %.1f GB/s\n", rep, pb, ahead, inter ? "interleaved" : "8 streams  ", thr, bytes / t / 1e9);
  }
}
