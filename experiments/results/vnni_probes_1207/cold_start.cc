// Cold-start probe: a "step" of 120 int4-like matrices (SmolLM2 drafter shapes: per layer [576,960] [576,576]
// [576,3072] [1536,576] as panel-major 8-panel tiles, bytes = K/2 * N), distinct buffers, 2 threads splitting each
// matrix's panels (static halves), a ~3 us single-threaded gap between matrices (the step's other ops).
// Variant: at the end of each matrix each thread prefetches the first `head` bytes of every panel of its half
// of the next matrix.
#include <immintrin.h>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <thread>
#include <vector>
struct Mat { const uint8_t* w; int64_t pb; int64_t np; };
static inline __m512bh pairs(__m512i line, int j) {
  __m512i f = j == 0 ? line : _mm512_srli_epi16(line, 4 * j);
  return (__m512bh)_mm512_ternarylogic_epi32(f, _mm512_set1_epi32(0x000F000F), _mm512_set1_epi32(0x43004300), 0xEA);
}
static float work(const Mat& m, int64_t p0, int64_t p1) {
  __m512 acc[8];
  for (int q = 0; q < 8; ++q) acc[q] = _mm512_setzero_ps();
  const __m512bh xv = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  for (int64_t j = p0; j < p1; j += 8) {
    const uint8_t* base = m.w + j * m.pb;
    for (int64_t r = 0; r < m.pb; r += 64)
      for (int q = 0; q < 8; ++q) {
        const uint8_t* line = base + q * m.pb + r;
        __builtin_prefetch(line + 256);
        __m512i v = _mm512_loadu_si512(line);
        for (int jj = 0; jj < 4; ++jj) acc[q] = _mm512_dpbf16_ps(acc[q], pairs(v, jj), xv);
      }
  }
  float s = 0; for (int q = 0; q < 8; ++q) s += _mm512_reduce_add_ps(acc[q]);
  return s;
}
static void head(const Mat& m, int64_t p0, int64_t p1, int64_t bytes) {
  for (int64_t j = p0; j < p1; ++j)
    for (int64_t b = 0; b < bytes && b < m.pb; b += 64) _mm_prefetch((const char*)(m.w + j * m.pb + b), _MM_HINT_T1);
}
int main() {
  const int64_t shapes[4][2] = {{576, 960}, {576, 576}, {576, 3072}, {1536, 576}};
  std::vector<Mat> mats;
  for (int l = 0; l < 30; ++l)
    for (auto& s : shapes) {
      int64_t pb = s[0] / 2 * 16, np = s[1] / 16;
      uint8_t* w = (uint8_t*)aligned_alloc(4096, ((pb * np + 4095) / 4096) * 4096);
      for (int64_t i = 0; i < pb * np; ++i) w[i] = (uint8_t)(i * 7);
      mats.push_back({w, pb, np});
    }
  // a big buffer to flush caches between steps
  size_t fl = 64ul << 20; uint8_t* flush = (uint8_t*)aligned_alloc(4096, fl);
  for (size_t i = 0; i < fl; ++i) flush[i] = 1;
  std::atomic<int> phase{0}, done{0};
  int64_t head_bytes = 0;
  volatile float sink = 0;
  std::thread helper([&] {
    int seen = 0;
    for (;;) {
      int ph; while ((ph = phase.load(std::memory_order_acquire)) == seen) _mm_pause();
      if (ph < 0) return;
      seen = ph;
      const Mat& m = mats[(ph - 1) % mats.size()];
      int64_t half = (m.np / 8 / 2) * 8;
      sink = work(m, half, (m.np / 8) * 8);
      if (head_bytes && (ph % mats.size()) != 0) { const Mat& n = mats[ph % mats.size()]; int64_t nh = (n.np / 8 / 2) * 8; head(n, nh, n.np, head_bytes); }
      done.fetch_add(1, std::memory_order_release);
    }
  });
  int ph = 0;
  for (int rep = 0; rep < 12; ++rep) {
    head_bytes = (rep % 3 == 0) ? 0 : (rep % 3 == 1) ? 256 : 1024;
    long s = 0; for (size_t i = 0; i < fl; i += 64) s += flush[i]; sink = s;
    auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < mats.size(); ++i) {
      const Mat& m = mats[i];
      int d0 = done.load();
      phase.store(++ph, std::memory_order_release);
      int64_t half = (m.np / 8 / 2) * 8;
      sink = work(m, 0, half);
      if (head_bytes && i + 1 < mats.size()) head(mats[i + 1], 0, (mats[i + 1].np / 8 / 2) * 8, head_bytes);
      while (done.load(std::memory_order_acquire) == d0) _mm_pause();
      auto g = std::chrono::steady_clock::now();  // the gap: other ops
      while (std::chrono::duration<double>(std::chrono::steady_clock::now() - g).count() < 3e-6) {}
    }
    double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    size_t bytes = 0; for (auto& m : mats) bytes += m.pb * m.np;
    if (rep >= 3) printf("head %4ld B: %.2f ms, %.1f GB/s\n", head_bytes, t * 1e3, bytes / t / 1e9);
  }
  phase.store(-1); helper.join();
}
