// er_jax native CPU matmuls as XLA FFI handlers: runtime ISA dispatch, the thread pool, the handlers.
//
// Handlers (registered from kernels/native.py with jax.ffi.register_ffi_target(..., platform="cpu")):
//   er_jax_native_dense(x, w)                 -> y   x f32|bf16 [..., M, K], w f32|bf16 [..., K, N]
//   er_jax_native_panel(x, w)                 -> y   w f32|bf16 [..., N/16, K, 16] (panel-major, er_native.h)
//   er_jax_native_panel_int8(x, data, scale)  -> y   data int8 [..., N/16, K, 16], scale f32 [..., 1, N]
//   er_jax_native_panel_int4(x, data, scale, zero) -> y   data uint8 [..., N/16, Kp/2, 16], scale / zero as int4's
//   er_jax_native_int8(x, data, scale)        -> y   data int8 [..., K, N], scale f32 [..., 1, N]
//   er_jax_native_int4(x, data, scale, zero)  -> y   data uint8 [..., Kp/2, N], scale f32 / zero uint8
//                                                    [..., Kp/G, N] (er_jax.quant.QuantArray's layout)
//   er_jax_native_attention(q, k, v, q_pos, layer) -> o   attention over the cache, read in place (below)
//   er_jax_native_sample(logw, u)             -> tok, logp  inverse-CDF sampling, one token per row (below)
//   er_jax_native_kv_write(k_all, v_all, k, v, pos, layer) -> (k_all, v_all)   the KV cache write, in place
//   er_jax_native_rms_norm / _silu_mul / _rope_qkv     a decoder layer's pointwise ops (below)
// y has x's dtype; accumulation is f32. Every handler takes the int32 attributes `isa` (0: the process
// default, 1: portable, 2: avx2, 3: avx512, 4: avx512bf16, 5: amx) and `threads` (0: the default, else a cap for this call). The weights' leading
// dimensions are batch axes (vmap_method="expand_dims" puts them in front of every operand), each 1 or the
// output's; x's other leading dimensions are rows (M), so weights without batch dimensions let all of x's
// leading rows run as one matmul (the weights are read once).
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include "er_native.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace er_native {
namespace {

// ---------------------------------------------------------------------------------------------------
// ISA selection

bool cpu_supports(int isa) {
  if (isa == kPortable) return true;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();  // libgcc also checks that the OS saves the AVX / AVX-512 register state
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx2) return avx2;
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == kAvx512) return avx512;
  const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  if (isa == kAvx512Bf16) return bf16;
  if (isa == kAmx) {  // CPUID.7.0:EDX bit 22 amx_bf16, bit 24 amx_tile; then the kernel's permission
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!bf16 || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, ...)
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }
#endif
  return false;
}

// Whether vdpbf16ps beats the f32 FMAs for bf16 panels: on AMD's Zen 4 (bf16 x bf16 panels at 16-64 rows:
// 300-360 against 170-210 GFLOP/s); not on Intel's Sapphire Rapids, whose one vdpbf16ps port does 32
// multiply-adds a cycle like its two FMA ports, the pair permute on top (0.7-0.8x; docs/native.md).
bool dp_pays() {
#if defined(__x86_64__) || defined(_M_X64)
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

const Kernels* table(int isa) {
  switch (isa) {
    case kPortable: return er_native_kernels_portable();
#if defined(__x86_64__) || defined(_M_X64)
    case kAvx2: return er_native_kernels_avx2();
    case kAvx512: return er_native_kernels_avx512();
    case kAvx512Bf16: return er_native_kernels_avx512bf16();
    case kAmx: return er_native_kernels_amx();
#endif
    default: return nullptr;
  }
}

const char* isa_name(int isa) {
  switch (isa) {
    case kPortable: return "portable";
    case kAvx2: return "avx2";
    case kAvx512: return "avx512";
    case kAvx512Bf16: return "avx512bf16";
    case kAmx: return "amx";
    default: return "?";
  }
}

// A run of every format and tile shape on small integer-valued data (all sums exact in f32), compared
// bit for bit with the portable kernels: a SIMD path that disagrees is never used.
bool self_check(const Kernels* kern) {
  const Kernels* ref = er_native_kernels_portable();
  if (kern == ref) return true;
  const int64_t K = 200, G = 128, N = 2 * kern->col_align + kern->col_align / 8 + 3, Kp = 256;
  std::vector<float> x(7 * Kp, 0.f), wf(K * N), scale(N * (Kp / G)), s0, s1;
  std::vector<uint16_t> wb(K * N);
  std::vector<int8_t> wi(K * N);
  std::vector<uint8_t> wq(Kp / 2 * N), zq(Kp / G * N);
  uint32_t r = 12345u;
  auto next = [&r]() { r = r * 1664525u + 1013904223u; return static_cast<int>((r >> 16) & 0xffff); };
  for (int64_t m = 0; m < 7; ++m)
    for (int64_t k = 0; k < K; ++k) x[m * Kp + k] = static_cast<float>(next() % 7 - 3);
  for (int64_t i = 0; i < K * N; ++i) {
    wf[i] = static_cast<float>(next() % 9 - 4);
    float f = static_cast<float>(next() % 9 - 4);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    wb[i] = static_cast<uint16_t>(u >> 16);
    wi[i] = static_cast<int8_t>(next() % 255 - 127);
  }
  for (auto& b : wq) b = static_cast<uint8_t>(next() & 0xff);
  for (auto& z : zq) z = static_cast<uint8_t>(next() % 16);
  for (auto& s : scale) s = 0.5f;
  // The portable kernels on the whole problem vs `kern` as the dispatcher splits work: two column blocks
  // (the second at an aligned column), each as two row blocks at row G (the second accumulated onto the first).
  auto agrees = [&](const Problem& p) {
    const int64_t m = p.m, n = p.n, ca = kern->col_align;
    s0.assign(m * n, 0.f);
    s1.assign(m * n, 0.f);
    ref->run_block(p, 0, p.k, 0, n, s0.data(), false);
    std::vector<float> a(m * ca), b(m * (n - ca));
    kern->run_block(p, 0, G, 0, ca, a.data(), false);
    kern->run_block(p, G, p.k, 0, ca, a.data(), true);
    kern->run_block(p, 0, G, ca, n, b.data(), false);
    kern->run_block(p, G, p.k, ca, n, b.data(), true);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) s1[i * n + j] = j < ca ? a[i * ca + j] : b[i * (n - ca) + j - ca];
    return std::memcmp(s0.data(), s1.data(), sizeof(float) * m * n) == 0;
  };
  for (int fmt : {kF32, kBF16, kInt8, kInt4}) {
    for (int64_t m : {1, 2, 7}) {
      Problem p{};
      p.fmt = fmt;
      p.m = m;
      p.k = K;
      p.n = N;
      p.x = x.data();
      p.xs = Kp;
      p.w = fmt == kF32 ? static_cast<const void*>(wf.data())
            : fmt == kBF16 ? static_cast<const void*>(wb.data())
            : fmt == kInt8 ? static_cast<const void*>(wi.data())
                           : static_cast<const void*>(wq.data());
      p.scale = scale.data();
      p.zero = zq.data();
      p.group = G;
      if (!agrees(p)) return false;
    }
  }
  // Panel-major f32 / bf16 / int8 / int4: N = 2 column blocks + one panel, K = 300 (int4: groups and padding);
  // K = 256 and 19 rows also for AMX's whole 32-row tiles and its 16-row M tiles (a full one and a partial one);
  // 4 and 7 rows for the quantized register tiles of 4 and 2 panels, 19 for two of them (isa_avx512.cc).
  for (const int64_t PK : {300, 256}) {
    const int64_t PN = 2 * kern->col_align + kPanelCols;
    std::vector<float> px(19 * PK), pf(PN * PK);
    std::vector<uint16_t> pb(PN * PK);
    std::vector<int8_t> pi(PN * PK);
    const int64_t PR = PK == 300 ? 192 : 128;  // int4: 3 groups of 128 rows, 84 of them padding (or 2), as byte rows
    std::vector<uint8_t> p4(PN * PR), z4(3 * PN);
    std::vector<float> s4(3 * PN, 0.5f);
    for (auto& b : p4) b = static_cast<uint8_t>(next() & 0xff);
    for (auto& z : z4) z = static_cast<uint8_t>(next() % 16);
    for (auto& v : px) v = static_cast<float>(next() % 7 - 3);
    std::vector<uint16_t> pxb(px.size());  // the same x as bf16 (exact): the avx512bf16 kernels' own path
    for (size_t i = 0; i < px.size(); ++i) {
      uint32_t u;
      std::memcpy(&u, &px[i], 4);
      pxb[i] = static_cast<uint16_t>(u >> 16);
    }
    for (int64_t i = 0; i < PN * PK; ++i) {
      pf[i] = static_cast<float>(next() % 9 - 4);
      uint32_t u;
      std::memcpy(&u, &pf[i], 4);
      pb[i] = static_cast<uint16_t>(u >> 16);
      pi[i] = static_cast<int8_t>(next() % 255 - 127);
    }
    for (int fmt : {kF32Panel, kBF16Panel, kInt8Panel, kInt4Panel}) {
      for (int64_t m : {1, 2, 4, 7, 19}) {
        Problem p{};
        p.fmt = fmt;
        p.m = m;
        p.k = PK;
        p.n = PN;
        p.x = px.data();
        p.xs = PK;
        p.w = fmt == kF32Panel ? static_cast<const void*>(pf.data())
              : fmt == kBF16Panel ? static_cast<const void*>(pb.data())
              : fmt == kInt8Panel ? static_cast<const void*>(pi.data())
                                  : static_cast<const void*>(p4.data());
        p.rows = fmt == kInt4Panel ? PR : PK;
        p.xb = pxb.data();  // every panel format has a vdpbf16ps path for bf16 x
        p.scale = s4.data();
        p.zero = z4.data();
        p.group = G;
        if (!agrees(p)) return false;
      }
    }
  }
  // Sampling (vector exp, max, masking): 37 log-weights spanning [-6, 3] and two -inf; each u is the middle
  // of one token's CDF interval (computed here in double), far from the kernel's ~1e-7 rounding.
  const int64_t n = 2 * 16 + 5;
  std::vector<float> lw(n), buf(n);
  std::vector<double> cdf(n + 1, 0.0);
  double m = -1e30;
  for (int64_t j = 0; j < n; ++j) {
    lw[j] = (j == 3 || j == 20) ? -INFINITY : static_cast<float>((j * 7) % 10 - 6);
    m = std::max<double>(m, lw[j]);
  }
  for (int64_t j = 0; j < n; ++j) cdf[j + 1] = cdf[j] + std::exp(static_cast<double>(lw[j]) - m);
  for (int64_t j = 0; j < n; ++j) {
    if (j == 3 || j == 20) continue;
    const float u = static_cast<float>((cdf[j] + cdf[j + 1]) / 2 / cdf[n]);
    double log_norm = 0.0;
    if (kern->sample_row(lw.data(), n, u, buf.data(), &log_norm) != j) return false;
    if (std::fabs(log_norm - (m + std::log(cdf[n]))) > 1e-5) return false;
  }
  return true;
}

struct Dispatch {
  const Kernels* active = nullptr;  // the process default
  std::string error;                // why there is none (only when ER_JAX_NATIVE_ISA asks for one we lack)
  std::string notes;                // SIMD paths skipped by the self-check
  bool usable[kIsaCount] = {};
};

const Dispatch& dispatch() {
  static const Dispatch d = [] {
    Dispatch d;
    for (int isa : {kPortable, kAvx2, kAvx512, kAvx512Bf16, kAmx}) {
      const Kernels* k = table(isa);
      if (k == nullptr || !cpu_supports(isa)) continue;
      if (!self_check(k)) {
        d.notes += std::string(isa_name(isa)) + " kernels failed the start-up self-check; ";
        continue;
      }
      d.usable[isa] = true;
    }
    const char* env = std::getenv("ER_JAX_NATIVE_ISA");
    std::string want = env ? env : "";
    int forced = kAuto;
    if (want == "portable") forced = kPortable;
    else if (want == "avx2") forced = kAvx2;
    else if (want == "avx512") forced = kAvx512;
    else if (want == "avx512bf16") forced = kAvx512Bf16;
    else if (want == "amx") forced = kAmx;
    else if (!want.empty() && want != "auto") {
      d.error = "ER_JAX_NATIVE_ISA=" + want + " is not one of amx, avx512bf16, avx512, avx2, portable, auto";
      return d;
    }
    if (forced != kAuto) {
      if (d.usable[forced]) d.active = table(forced);
      else d.error = "ER_JAX_NATIVE_ISA=" + want + " but this CPU (or this build) cannot run the " + want + " kernels";
      return d;
    }
    for (int isa : {kAmx, kAvx512Bf16, kAvx512, kAvx2, kPortable})
      if (d.usable[isa] && (isa != kAvx512Bf16 || dp_pays())) { d.active = table(isa); break; }
    return d;
  }();
  return d;
}

// ---------------------------------------------------------------------------------------------------
// Threads. Work is a number of column chunks claimed from an atomic counter. The caller claims chunks
// too and then waits only for chunks already claimed, never for a helper task to start, so a pool
// whose threads are all busy (or one that runs tasks inline) cannot deadlock or delay the call.

struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> slots{0};
  int64_t n = 0;
  int max_slots = 1;
  std::function<void(int64_t, int)> fn;  // (chunk, slot); touched only while a chunk is claimed
};

// Runs chunks until none is left. Each participant gets a distinct slot < max_slots (the caller 0), so
// it can own a private accumulator.
void drain(Job* job, bool caller) {
  int slot = -1;
  for (;;) {
    if (job->next.load(std::memory_order_relaxed) >= job->n) return;
    if (slot < 0) {
      slot = caller ? 0 : job->slots.fetch_add(1, std::memory_order_relaxed) + 1;
      if (slot >= job->max_slots) return;
    }
    const int64_t c = job->next.fetch_add(1, std::memory_order_relaxed);
    if (c >= job->n) return;
    job->fn(c, slot);
    job->done.fetch_add(1, std::memory_order_release);
  }
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return dflt;
  char* end = nullptr;
  const long long r = std::strtoll(v, &end, 10);
  return (end && *end == 0) ? r : dflt;
}

int affinity_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned h = std::thread::hardware_concurrency();
  return h ? static_cast<int>(h) : 1;
}

// Our own pool: affinity_cpus() - 1 workers (the calling thread is the last one), created on first use
// and kept for the life of the process. A worker that ran a task spins for spin_us before sleeping, so
// the matmuls of one decode step (tens of microseconds apart) find it awake.
class Pool {
 public:
  explicit Pool(int workers, int64_t spin_us) : spin_us_(spin_us) {
    for (int i = 0; i < workers; ++i) std::thread([this] { loop(); }).detach();
    workers_ = workers;
  }
  int workers() const { return workers_; }
  void schedule(std::function<void()> f) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(f));
      pending_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_one();
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> f;
      if (!pop(f)) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
        while (pending_.load(std::memory_order_acquire) == 0 && std::chrono::steady_clock::now() < until)
          for (int i = 0; i < 32; ++i) cpu_relax();
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lock, [this] { return !queue_.empty(); });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        f = std::move(queue_.front());
        queue_.pop_front();
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
      f();
    }
  }
  bool pop(std::function<void()>& f) {
    std::lock_guard<std::mutex> lock(mu_);
    if (queue_.empty()) return false;
    f = std::move(queue_.front());
    queue_.pop_front();
    pending_.fetch_sub(1, std::memory_order_acq_rel);
    return true;
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::atomic<int64_t> pending_{0};
  std::atomic<int> sleeping_{0};
  int workers_ = 0;
  int64_t spin_us_;
};

struct Threading {
  bool use_xla = true;   // ER_JAX_NATIVE_POOL=xla (default) | own
  int64_t max_threads;   // ER_JAX_NATIVE_THREADS (default: the affinity's CPU count)
  int64_t min_bytes;     // ER_JAX_NATIVE_MIN_PARALLEL_BYTES: smaller weights run on the calling thread
};

const Threading& threading() {
  static const Threading t = [] {
    Threading t;
    const char* pool = std::getenv("ER_JAX_NATIVE_POOL");
    t.use_xla = !(pool && std::string(pool) == "own");
    t.max_threads = std::max<int64_t>(1, env_int("ER_JAX_NATIVE_THREADS", affinity_cpus()));
    t.min_bytes = env_int("ER_JAX_NATIVE_MIN_PARALLEL_BYTES", 96 << 10);
    return t;
  }();
  return t;
}

Pool& own_pool() {
  static Pool* pool = new Pool(static_cast<int>(threading().max_threads) - 1,
                               env_int("ER_JAX_NATIVE_SPIN_US", 100));  // never destroyed
  return *pool;
}

// Runs fn(chunk, slot) for chunk in [0, n) on up to `threads` threads (slot < threads).
void parallel_chunks(ffi::ThreadPool* xla_pool, int64_t threads, int64_t n, std::function<void(int64_t, int)> fn) {
  if (threads <= 1 || n <= 1) {
    for (int64_t c = 0; c < n; ++c) fn(c, 0);
    return;
  }
  auto job = std::make_shared<Job>();
  job->n = n;
  job->fn = std::move(fn);
  const int64_t helpers = std::min(threads, n) - 1;
  job->max_slots = static_cast<int>(helpers + 1);
  for (int64_t h = 0; h < helpers; ++h) {
    if (xla_pool) xla_pool->Schedule([job] { drain(job.get(), false); });
    else own_pool().schedule([job] { drain(job.get(), false); });
  }
  drain(job.get(), true);
  for (int spins = 0; job->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < 20000) cpu_relax();
    else std::this_thread::yield();
  }
}

// Threads for one call: the pool's (XLA's or ours), at most ER_JAX_NATIVE_THREADS, capped by the call's
// `threads` attribute when > 0.
int64_t call_threads(ffi::ThreadPool& tp, int32_t max_threads) {
  int64_t t = std::max<int64_t>(1, std::min<int64_t>(threading().max_threads,
                                                     threading().use_xla ? tp.num_threads() : 1 << 30));
  return max_threads > 0 ? std::min<int64_t>(t, max_threads) : t;
}

// Per-thread buffers, grown as needed and kept (no allocation, page faults or zero-filling per call):
// kScratch for an item's block accumulator, kSlots for the items' partial sums of a K split and
// kX for x converted to f32 (both owned by the calling thread for the duration of one call).
enum Buffer { kScratch = 0, kSlots = 1, kX = 2, kXb = 3 };  // kXb: x's bf16 copy (avx512bf16, f32 x)
float* buffer(Buffer which, size_t floats) {
  thread_local std::vector<float> bufs[4];
  std::vector<float>& buf = bufs[which];
  if (buf.size() < floats) buf.resize(floats);
  return buf.data();
}
float* scratch(size_t floats) { return buffer(kScratch, floats); }

// ---------------------------------------------------------------------------------------------------
// One matmul of already validated operands.

inline float bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

struct Output {
  void* y;              // [M, N] f32 or bf16
  bool bf16;
  const float* scale;   // int8's per-column scale, else nullptr
};

// y[:, c0:c0+cw] = (sum of the partial blocks [M, cw]) * scale, in y's dtype.
void finalize(const float* const* parts, int64_t nparts, int64_t m, int64_t n, int64_t c0, int64_t cw,
              const Output& out) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < cw; ++i) {
      float v = parts[0][r * cw + i];
      for (int64_t s = 1; s < nparts; ++s) v += parts[s][r * cw + i];
      if (out.scale) v *= out.scale[c0 + i];
      if (out.bf16) static_cast<uint16_t*>(out.y)[r * n + c0 + i] = f32_to_bf16(v);
      else static_cast<float*>(out.y)[r * n + c0 + i] = v;
    }
  }
}

constexpr int64_t kAccFloats = 32768;  // a block accumulator [M, cw] of at most 128 KiB (L2)
constexpr int64_t kMaxKSplitM = 16;    // M up to which threads may split K (adding up their partial sums)

// How one matmul is cut into items = (row range, column block).
struct Plan {
  int64_t threads, nc, cw, ks, kr;
};

// Small M (memory-bound): column blocks as wide as the accumulator allows, rows split into ~4 ranges
// per thread claimed dynamically; every thread reads long contiguous row segments, each item writes its
// own partial sums, and the caller adds them in a fixed order (the same sums whichever thread ran what).
// Large M (compute-bound): column blocks only, ~4 per thread, each with all of K.
Plan plan(const Kernels* kern, const Problem& p, int64_t threads, size_t weight_bytes) {
  Plan pl{};
  const bool panels = p.fmt >= kF32Panel;  // sequential streams: columns only
  // Panels at M >= 3 (compute-bound) are split at their M >= 3 tile's width into ~8 blocks per thread: at
  // the widest (M = 1) tile's, 4 panels on AVX2, a 576-column matrix made 5 blocks for 2 threads (one idle
  // for a fifth of the call; docs/cpu_profile.md, "Afternoon, 2026-12-03").
  const bool fine = panels && p.m >= 3 && kern->panel_align < kern->col_align;
  const int64_t align = fine ? kern->panel_align : kern->col_align;  // a multiple of kPanelCols
  const int64_t kalign = p.fmt == kInt4 ? p.group : kern->k_align;
  pl.threads = static_cast<int64_t>(weight_bytes) < threading().min_bytes ? 1 : threads;
  const int64_t T = pl.threads;
  const int64_t cw_max = std::max<int64_t>(align, kAccFloats / p.m / align * align);
  const int64_t max_blocks = (p.n + align - 1) / align;
  int64_t nc = (p.n + cw_max - 1) / cw_max;
  const bool ksplit = T > 1 && p.m <= kMaxKSplitM && !panels;
  if (T > 1 && !ksplit) nc = std::max(nc, (fine ? 8 : 4) * T);
  nc = std::max<int64_t>(1, std::min(nc, max_blocks));
  pl.cw = (p.n + nc - 1) / nc;
  pl.cw = (pl.cw + align - 1) / align * align;
  pl.nc = (p.n + pl.cw - 1) / pl.cw;
  pl.ks = 1;
  pl.kr = p.k;
  if (ksplit) {
    const int64_t ks = std::max<int64_t>(1, (4 * T + pl.nc - 1) / pl.nc);
    pl.kr = ((p.k + ks - 1) / ks + kalign - 1) / kalign * kalign;
    pl.ks = (p.k + pl.kr - 1) / pl.kr;
  }
  if (pl.nc * pl.ks <= 1) pl.threads = 1;
  return pl;
}

// f32 x whose every value is a bf16 (the low 16 bits zero: e.g. bf16 activations cast to f32 for an f32
// result, as the LM head's are) as those bf16 values [M, K], else nullptr: the vdpbf16ps kernel's
// products are then exactly the f32 kernel's.
const uint16_t* exact_bf16(const float* x, int64_t m, int64_t k) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(x);
  uint32_t low = 0;
  for (int64_t i = 0; i < m * k; ++i) low |= u[i] & 0xffffu;
  if (low != 0) return nullptr;
  uint16_t* xb = reinterpret_cast<uint16_t*>(buffer(kXb, static_cast<size_t>((m * k + 1) / 2)));
  for (int64_t i = 0; i < m * k; ++i) xb[i] = static_cast<uint16_t>(u[i] >> 16);
  return xb;
}

void run_matmul(const Kernels* kern, ffi::ThreadPool* xla_pool, int64_t threads, Problem p, const void* x,
                bool x_bf16, const Output& out, size_t weight_bytes) {
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {  // an empty sum
    for (int64_t i = 0; i < p.m * p.n; ++i) {
      if (out.bf16) static_cast<uint16_t*>(out.y)[i] = 0;
      else static_cast<float*>(out.y)[i] = 0.f;
    }
    return;
  }
  // x as f32, row stride xs; zero padding up to an even K for int4 (the high nibble of the last byte). Quantized
  // weights take 16-bit activations (the paper's W4A16): f32 x is rounded to bf16 values.
  const bool pad = (p.fmt == kInt4 || p.fmt == kInt4Panel) && (p.k & 1);
  const bool round = !x_bf16 && (p.fmt == kInt8 || p.fmt == kInt8Panel || p.fmt == kInt4 || p.fmt == kInt4Panel);
  if (!x_bf16 && !pad && !round) {
    p.x = static_cast<const float*>(x);
    p.xs = p.k;
  } else {
    p.xs = p.k + (pad ? 1 : 0);
    float* xbuf = buffer(kX, static_cast<size_t>(p.m * p.xs));
    for (int64_t m = 0; m < p.m; ++m) {
      float* d = xbuf + m * p.xs;
      if (pad) d[p.k] = 0.f;
      if (x_bf16) {
        const uint16_t* s = static_cast<const uint16_t*>(x) + m * p.k;
        for (int64_t k = 0; k < p.k; ++k) d[k] = bf16_value(s[k]);
      } else {
        const float* s = static_cast<const float*>(x) + m * p.k;
        if (round)
          for (int64_t k = 0; k < p.k; ++k) d[k] = bf16_value(f32_to_bf16(s[k]));
        else
          std::memcpy(d, s, sizeof(float) * p.k);
      }
    }
    p.x = xbuf;
  }
  p.xb = x_bf16 ? static_cast<const uint16_t*>(x) : nullptr;  // row stride K (xs may be K + 1 only for int4)
  const bool dp_panels = p.fmt == kBF16Panel || p.fmt == kInt8Panel || p.fmt == kInt4Panel;
  if (!x_bf16 && dp_panels && kern->isa >= kAvx512Bf16) p.xb = exact_bf16(p.x, p.m, p.k);
  const Plan pl = plan(kern, p, threads, weight_bytes);
  const int64_t nc = pl.nc, cw = pl.cw, kr = pl.kr, ks = pl.ks;
  if (ks == 1) {
    parallel_chunks(xla_pool, pl.threads, nc, [&](int64_t c, int) {
      const int64_t c0 = c * cw, c1 = std::min(p.n, c0 + cw);
      float* acc = scratch(static_cast<size_t>(p.m * (c1 - c0)));
      kern->run_block(p, 0, p.k, c0, c1, acc, false);
      const float* parts[1] = {acc};
      finalize(parts, 1, p.m, p.n, c0, c1 - c0, out);
    });
    return;
  }
  // Items (row range s = i / nc, column block c = i % nc), each into its own partial sums acc[s][c] [M, cw],
  // added up in the order of s: the result does not depend on which thread ran which item.
  const int64_t part_floats = nc * p.m * cw;
  float* acc = buffer(kSlots, static_cast<size_t>(ks * part_floats));
  parallel_chunks(xla_pool, pl.threads, nc * ks, [&](int64_t i, int) {
    const int64_t s = i / nc, c = i % nc;
    const int64_t c0 = c * cw, c1 = std::min(p.n, c0 + cw);
    kern->run_block(p, s * kr, std::min(p.k, s * kr + kr), c0, c1, acc + s * part_floats + c * p.m * cw, false);
  });
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t c0 = c * cw, c1 = std::min(p.n, c0 + cw), len = p.m * (c1 - c0);
    float* sum = acc + c * p.m * cw;  // part 0, plus each later part in turn (a loop the compiler vectorizes)
    for (int64_t s = 1; s < ks; ++s) {
      const float* part = sum + s * part_floats;
      for (int64_t i = 0; i < len; ++i) sum[i] += part[i];
    }
    const float* parts[1] = {sum};
    finalize(parts, 1, p.m, p.n, c0, c1 - c0, out);
  }
}

// ---------------------------------------------------------------------------------------------------
// Handlers: validation, broadcasting of leading dimensions, then run_matmul per batch element.

std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error invalid(const std::string& msg) { return ffi::Error::InvalidArgument("er_jax native: " + msg); }

// The kernels a call runs: the process default for isa == kAuto, else that ISA's if it runs here.
ffi::Error select_kernels(int32_t isa, const Kernels*& kern) {
  const Dispatch& d = dispatch();
  kern = d.active;
  if (isa != kAuto) {
    if (isa < kPortable || isa >= kIsaCount || !d.usable[isa])
      return invalid(std::string("the ") + (isa >= kPortable && isa < kIsaCount ? isa_name(isa) : "requested") +
                     " kernels cannot run on this CPU / build");
    kern = table(isa);
  }
  if (kern == nullptr) return invalid(d.error.empty() ? "no usable kernels" : d.error);
  return ffi::Error::Success();
}

struct Operand {
  const char* name;
  ffi::AnyBuffer::Dimensions dims;
  int64_t batch_stride_bytes;  // bytes of one [.., R, C] matrix
};

ffi::Error run_handler(ffi::ThreadPool& tp, int fmt, ffi::AnyBuffer x, ffi::AnyBuffer w, const ffi::AnyBuffer* scale,
                       const ffi::AnyBuffer* zero, ffi::Result<ffi::AnyBuffer>& y, int32_t isa, int32_t max_threads) {
  const Kernels* kern = nullptr;
  if (ffi::Error e = select_kernels(isa, kern); e.failure()) return e;

  const auto xt = x.element_type(), wt = w.element_type();
  const bool x_bf16 = xt == ffi::DataType::BF16;
  if (xt != ffi::DataType::F32 && !x_bf16) return invalid("x must be float32 or bfloat16");
  if (y->element_type() != xt) return invalid("the output dtype must be x's");
  if ((fmt == kF32 || fmt == kF32Panel) && wt != ffi::DataType::F32 && wt != ffi::DataType::BF16)
    return invalid("dense weights must be float32 or bfloat16");
  if ((fmt == kInt8 || fmt == kInt8Panel) && wt != ffi::DataType::S8) return invalid("int8 weights must be int8");
  if ((fmt == kInt4 || fmt == kInt4Panel) && wt != ffi::DataType::U8)
    return invalid("int4 weights must be uint8 (two codes per byte)");
  if (scale && scale->element_type() != ffi::DataType::F32) return invalid("scale must be float32");
  if (zero && zero->element_type() != ffi::DataType::U8) return invalid("zero must be uint8");
  const bool bf16_w = wt == ffi::DataType::BF16;
  const int f = fmt == kF32 && bf16_w ? kBF16 : fmt == kF32Panel && bf16_w ? kBF16Panel : fmt;
  const bool panels = fmt == kF32Panel || fmt == kInt8Panel || fmt == kInt4Panel;
  const bool int4 = f == kInt4 || f == kInt4Panel;

  const auto xd = x.dimensions(), yd = y->dimensions();
  // Panels [..., N / 16, K, 16] are read as [..., N / 16, K] for the shape and broadcasting rules below.
  const auto wfull = w.dimensions();
  if (panels && (wfull.size() < 3 || wfull[wfull.size() - 1] != kPanelCols))
    return invalid("panel weights must be [..., N / 16, K, 16], got " + dims_str(wfull));
  const bool int8 = f == kInt8 || f == kInt8Panel;  // a per-column scale [1, N], applied in finalize()
  const auto wd = panels ? wfull.first(wfull.size() - 1) : wfull;
  if (xd.size() < 2 || wd.size() < 2 || yd.size() != xd.size())
    return invalid("x must be at least 2-D, w at least 2-D and the output of x's rank; got x " + dims_str(xd) +
                   ", w " + dims_str(wd) + ", output " + dims_str(yd));
  // w's leading dimensions are vmap's batch axes, the first nb of x's and the output's (expand_dims puts them
  // in front); x's other leading dimensions are rows, M of them in all.
  const size_t nd = yd.size(), nb = wd.size() - 2;
  if (nb > nd - 2) return invalid("w " + dims_str(wd) + " has more batch dimensions than x " + dims_str(xd) + " has leading ones");
  int64_t M = 1;
  for (size_t i = nb; i + 1 < nd; ++i) M *= yd[i];
  const int64_t K = xd[nd - 1];
  const int64_t R = panels ? wd[wd.size() - 1] : wd[wd.size() - 2];
  const int64_t N = panels ? wd[wd.size() - 2] * kPanelCols : wd[wd.size() - 1];
  bool rows_match = yd[nd - 1] == N;
  for (size_t i = nb; i + 1 < nd; ++i) rows_match = rows_match && xd[i] == yd[i];
  if (!rows_match)
    return invalid("output shape " + dims_str(yd) + " does not match x " + dims_str(xd) + " @ w " + dims_str(wd));
  int64_t group = 128, S = 0;
  if (int4) {
    if (!scale || !zero) return invalid("int4 needs scale and zero");
    S = scale->dimensions()[scale->dimensions().size() - 2];
    const int64_t Kp = 2 * R;
    if (S <= 0 || Kp % S || (Kp / S) % 2 || K > Kp || Kp - K >= Kp / S)
      return invalid("int4 data " + dims_str(wd) + " / scale " + dims_str(scale->dimensions()) +
                     " do not hold K = " + std::to_string(K) + " rows in whole groups");
    group = Kp / S;
    if (f == kInt4Panel && group % 8)
      return invalid("int4 panels need a group size that is a multiple of 8 (whole 8-row lines), got " +
                     std::to_string(group));
  } else if (R != K) {
    return invalid("x " + dims_str(xd) + " and w " + dims_str(wd) + " disagree on K");
  }
  if (int8 && scale->dimensions()[scale->dimensions().size() - 2] != 1)
    return invalid("int8 scale must be [1, N]");
  for (const ffi::AnyBuffer* b : {scale, zero}) {
    if (!b) continue;
    const auto bd = b->dimensions();
    if (bd.size() != nb + 2 || bd[bd.size() - 1] != N || (int4 && bd[bd.size() - 2] != S))
      return invalid("scale / zero shape " + dims_str(bd) + " does not match the weight " + dims_str(wd));
  }

  // The batch axes: each operand's is 1 (broadcast) or the output's.
  const int64_t wsize = f == kF32 || f == kF32Panel ? 4 : f == kBF16 || f == kBF16Panel ? 2 : 1;
  std::vector<Operand> ops = {{"x", xd, M * K * (x_bf16 ? 2 : 4)}, {"w", wd, R * N * wsize}};
  if (scale) ops.push_back({"scale", scale->dimensions(), (int4 ? S : 1) * N * 4});
  if (zero) ops.push_back({"zero", zero->dimensions(), S * N});
  std::vector<std::vector<int64_t>> strides(ops.size(), std::vector<int64_t>(nb, 0));
  bool weights_batched = false, x_full = true;  // x_full: x has every batch axis of the output
  for (size_t o = 0; o < ops.size(); ++o) {
    int64_t stride = ops[o].batch_stride_bytes;
    for (size_t i = nb; i-- > 0;) {
      const int64_t d = ops[o].dims[i];
      if (d != 1 && d != yd[i])
        return invalid(std::string(ops[o].name) + " " + dims_str(ops[o].dims) + " does not broadcast to the output " + dims_str(yd));
      strides[o][i] = d == 1 ? 0 : stride;
      if (d != 1 && o > 0) weights_batched = true;
      if (o == 0 && d != yd[i]) x_full = false;
      stride *= d;
    }
  }
  int64_t batch = 1;
  for (size_t i = 0; i < nb; ++i) batch *= yd[i];

  const int64_t threads = call_threads(tp, max_threads);
  ffi::ThreadPool* xla_pool = threading().use_xla ? &tp : nullptr;
  const size_t wbytes = static_cast<size_t>(ops[1].batch_stride_bytes);
  Problem p{};
  p.fmt = f;
  p.k = K;
  p.n = N;
  p.group = int4 ? group : 128;
  p.rows = R;
  const int64_t y_stride = M * N * (x_bf16 ? 2 : 4);
  if (!weights_batched && x_full) {  // one matmul of batch * M rows: the weights are read once
    p.m = batch * M;
    p.w = w.untyped_data();
    p.scale = scale ? static_cast<const float*>(scale->untyped_data()) : nullptr;
    p.zero = zero ? static_cast<const uint8_t*>(zero->untyped_data()) : nullptr;
    const Output out{y->untyped_data(), x_bf16, int8 ? p.scale : nullptr};
    run_matmul(kern, xla_pool, threads, p, x.untyped_data(), x_bf16, out, wbytes);
    return ffi::Error::Success();
  }
  std::vector<int64_t> idx(nb, 0);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t off[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < nb; ++i)
      for (size_t o = 0; o < ops.size(); ++o) off[o] += idx[i] * strides[o][i];
    p.m = M;
    p.w = static_cast<const char*>(w.untyped_data()) + off[1];
    p.scale = scale ? reinterpret_cast<const float*>(static_cast<const char*>(scale->untyped_data()) + off[2]) : nullptr;
    p.zero = zero ? static_cast<const uint8_t*>(zero->untyped_data()) + off[3] : nullptr;
    const Output out{static_cast<char*>(y->untyped_data()) + b * y_stride, x_bf16, int8 ? p.scale : nullptr};
    run_matmul(kern, xla_pool, threads, p, static_cast<const char*>(x.untyped_data()) + off[0], x_bf16, out, wbytes);
    for (size_t i = nb; i-- > 0;) {  // row-major increment of the batch index
      if (++idx[i] < yd[i]) break;
      idx[i] = 0;
    }
  }
  return ffi::Error::Success();
}

ffi::Error dense_impl(ffi::ThreadPool tp, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                      int32_t isa, int32_t threads) {
  return run_handler(tp, kF32, x, w, nullptr, nullptr, y, isa, threads);
}
ffi::Error panel_impl(ffi::ThreadPool tp, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                      int32_t isa, int32_t threads) {
  return run_handler(tp, kF32Panel, x, w, nullptr, nullptr, y, isa, threads);
}
ffi::Error panel_int8_impl(ffi::ThreadPool tp, ffi::AnyBuffer x, ffi::AnyBuffer data, ffi::AnyBuffer scale,
                           ffi::Result<ffi::AnyBuffer> y, int32_t isa, int32_t threads) {
  return run_handler(tp, kInt8Panel, x, data, &scale, nullptr, y, isa, threads);
}
ffi::Error panel_int4_impl(ffi::ThreadPool tp, ffi::AnyBuffer x, ffi::AnyBuffer data, ffi::AnyBuffer scale,
                           ffi::AnyBuffer zero, ffi::Result<ffi::AnyBuffer> y, int32_t isa, int32_t threads) {
  return run_handler(tp, kInt4Panel, x, data, &scale, &zero, y, isa, threads);
}
ffi::Error int8_impl(ffi::ThreadPool tp, ffi::AnyBuffer x, ffi::AnyBuffer data, ffi::AnyBuffer scale,
                     ffi::Result<ffi::AnyBuffer> y, int32_t isa, int32_t threads) {
  return run_handler(tp, kInt8, x, data, &scale, nullptr, y, isa, threads);
}
ffi::Error int4_impl(ffi::ThreadPool tp, ffi::AnyBuffer x, ffi::AnyBuffer data, ffi::AnyBuffer scale,
                     ffi::AnyBuffer zero, ffi::Result<ffi::AnyBuffer> y, int32_t isa, int32_t threads) {
  return run_handler(tp, kInt4, x, data, &scale, &zero, y, isa, threads);
}


// ---------------------------------------------------------------------------------------------------
// Attention over the KV cache, read in place (kernels/attention.py's attention_reference, the semantics).
//   q f32|bf16 [B, T, H, hd]; k, v f32|bf16 [L, B, S, KV, hd] (one layer: L = 1); q_pos int32 [B, T];
//   layer int32 [] -> o [B, T, H, hd] in q's dtype. Key j is visible to query (b, t) iff j <= q_pos[b, t];
//   H = KV * G (GQA, head h = kv * G + g). A query with no visible key (q_pos < 0) gets zeros.
// Work item: one (b, chunk of <= kAttnRows of the T * G query rows of each KV head, all KV heads or one).
// It reads the keys up to its chunk's largest position once for all of its rows: scores in a thread buffer, an exact
// f32 softmax per row (max, exp, sum), then o = p @ V; with a bf16 cache p is rounded to bf16 before
// p @ V, as the reference casts p to V's dtype. XLA instead transposes each layer's K and V into a
// [B, KV, S, hd] copy and runs B * KV tiny batched dots (docs/cpu_profile.md): ~15x the bytes' time.

constexpr int64_t kAttnRows = 32;  // query rows per work item
constexpr int64_t kAttnSplitKeys = 64;  // the fewest keys a part of a split row takes

// An f32 cache with fewer batch rows than two per thread (decode and verify at batch 1-3, all query rows in
// one chunk): each row's keys split into parts, two per thread, each part one item reading all KV heads of
// its keys (one contiguous span per key) — instead of one item per KV head, three items on two threads at
// SmolLM2's batch 1, each reading a third of every key's span. Each part takes the softmax over its own keys
// (kAttnPart: flash-decoding); the parts are rescaled to the row's max and added here, in order. Returns false
// (nothing done) where the rows are too short to split. (With a bf16 cache the split made SmolLM2's batch-1
// step slower: 0.9-1.1 -> 1.3-1.7 ms of attention, traced.)
bool attend_split(const Kernels* kern, const AttnProblem& a, int64_t threads, ffi::ThreadPool* pool) {
  std::vector<int64_t> nb(a.B, 0);  // batch row b's keys: those of its longest query row
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t t = 0; t < a.T; ++t) nb[b] = std::max<int64_t>(nb[b], std::min<int64_t>(a.pos[b * a.T + t], a.S - 1) + 1);
  const int64_t n = *std::max_element(nb.begin(), nb.end());
  const int64_t parts = std::min((2 * threads + a.B - 1) / a.B, n / kAttnSplitKeys);
  if (parts < 2) return false;
  const int64_t rows = a.T * a.G, hrows = a.KV * rows;
  thread_local std::vector<float> ov, stv;  // this thread's (the items run on others: plain pointers below)
  ov.resize(a.B * parts * hrows * a.hd);
  stv.resize(a.B * parts * 2 * hrows);
  float *o = ov.data(), *st = stv.data();
  parallel_chunks(pool, threads, a.B * parts, [&](int64_t i, int) {
    const int64_t b = i / parts, p = i % parts;
    const AttnPart part{kAttnPart, nb[b] * p / parts, nb[b] * (p + 1) / parts, o + i * hrows * a.hd,
                        st + i * 2 * hrows};
    kern->attend(a, b, 0, a.KV, 0, rows, part);
  });
  std::vector<float> w(parts);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < hrows; ++h) {  // h = kv * rows + r
      const float* s0 = st + b * parts * 2 * hrows;
      float m = -INFINITY, sum = 0.f;
      for (int64_t p = 0; p < parts; ++p) m = std::max(m, s0[p * 2 * hrows + h]);
      for (int64_t p = 0; p < parts; ++p) {
        const float mp = s0[p * 2 * hrows + h];
        w[p] = mp == -INFINITY ? 0.f : std::exp(mp - m);
        sum += w[p] * s0[p * 2 * hrows + hrows + h];
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no visible key (a query at a negative position): zeros
      const int64_t kv = h / rows, r = h % rows, t = r / a.G, g = r % a.G;
      const int64_t off = ((b * a.T + t) * a.H + kv * a.G + g) * a.hd;
      for (int64_t d = 0; d < a.hd; ++d) {
        float acc = 0.f;
        for (int64_t p = 0; p < parts; ++p) acc += w[p] * o[((b * parts + p) * hrows + h) * a.hd + d];
        if (a.q_bf16) static_cast<uint16_t*>(a.o)[off + d] = f32_to_bf16(acc * inv);
        else static_cast<float*>(a.o)[off + d] = acc * inv;
      }
    }
  return true;
}

ffi::Error attention_impl(ffi::ThreadPool tp, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> o,
                          int32_t isa, int32_t max_threads) {
  const auto qt = q.element_type(), kt = k.element_type();
  const bool q_bf16 = qt == ffi::DataType::BF16, kv_bf16 = kt == ffi::DataType::BF16;
  if (qt != ffi::DataType::F32 && !q_bf16) return invalid("attention: q must be float32 or bfloat16");
  if (kt != ffi::DataType::F32 && !kv_bf16) return invalid("attention: k must be float32 or bfloat16");
  if (v.element_type() != kt) return invalid("attention: v must have k's dtype");
  if (o->element_type() != qt) return invalid("attention: the output dtype must be q's");
  const auto qd = q.dimensions(), kd = k.dimensions(), pd = q_pos.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || pd.size() != 2 || layer.dimensions().size() != 0)
    return invalid("attention: want q [B, T, H, hd], k / v [L, B, S, KV, hd], q_pos [B, T], layer []; got q " +
                   dims_str(qd) + ", k " + dims_str(kd) + ", q_pos " + dims_str(pd));
  if (v.dimensions().size() != 5 || !std::equal(kd.begin(), kd.end(), v.dimensions().begin()))
    return invalid("attention: v " + dims_str(v.dimensions()) + " must have k's shape " + dims_str(kd));
  const Kernels* kern = nullptr;
  if (ffi::Error e = select_kernels(isa, kern); e.failure()) return e;
  AttnProblem a{};
  a.B = qd[0], a.T = qd[1], a.H = qd[2], a.hd = qd[3], a.S = kd[2], a.KV = kd[3];
  if (kd[1] != a.B || kd[4] != a.hd || a.KV <= 0 || a.H % a.KV || pd[0] != a.B || pd[1] != a.T)
    return invalid("attention: q " + dims_str(qd) + ", k " + dims_str(kd) + " and q_pos " + dims_str(pd) +
                   " disagree (batch, head_dim, or heads not a multiple of the KV heads)");
  a.G = a.H / a.KV;
  const int64_t L = kd[0], l = layer.typed_data()[0];
  if (l < 0 || l >= L) return invalid("attention: layer " + std::to_string(l) + " is outside [0, " + std::to_string(L) + ")");
  const int64_t layer_elems = a.B * a.S * a.KV * a.hd, esize = kv_bf16 ? 2 : 4;
  a.k = static_cast<const char*>(k.untyped_data()) + l * layer_elems * esize;
  a.v = static_cast<const char*>(v.untyped_data()) + l * layer_elems * esize;
  a.q = q.untyped_data();
  a.pos = q_pos.typed_data();
  a.o = o->untyped_data();
  a.q_bf16 = q_bf16, a.kv_bf16 = kv_bf16;
  if (a.B * a.T * a.H * a.hd == 0) return ffi::Error::Success();
  const int64_t rows = a.T * a.G, chunks = (rows + kAttnRows - 1) / kAttnRows;
  const int64_t threads = call_threads(tp, max_threads);
  ffi::ThreadPool* pool = threading().use_xla ? &tp : nullptr;
  if (!kv_bf16 && chunks == 1 && a.B < 2 * threads && attend_split(kern, a, threads, pool)) return ffi::Error::Success();
  // KV heads per work item: all of them (one contiguous read of each key's KV * hd values) when that still
  // gives each thread two items; else one (three times the items, keys KV * hd apart).
  const int64_t kvg = a.B * chunks >= 2 * threads ? a.KV : 1;
  const int64_t groups = (a.KV + kvg - 1) / kvg;
  parallel_chunks(pool, threads, a.B * groups * chunks, [&](int64_t i, int) {
    const int64_t c = i % chunks, bk = i / chunks, kv0 = (bk % groups) * kvg;
    kern->attend(a, bk / groups, kv0, std::min(a.KV, kv0 + kvg), c * kAttnRows, std::min(rows, (c + 1) * kAttnRows),
                 AttnPart{kAttnWhole, 0, 0, nullptr, nullptr});
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------
// Sampling: logw f32 [B, V] (each row's log-probabilities, or any log-weights), u f32 [B] in [0, 1)
//   -> token int32 [B]: the first j with sum_{i <= j} w_i > u_b * sum_i w_i, w = exp(logw_b - max_b)
//   (kernel_impl.h's sample_row: vector exp, f64 sums), and its log-prob f32 [B], logw_j - log(sum_i w_i)
//   - max_b (so the caller need not normalize the row first). A row without a finite maximum gets token 0
//   and log-prob NaN.
// One pass over the row instead of XLA's V Gumbel draws (threefry bits and two logs per entry): at
// V = 49152 that was 2.6 ms per row at batch 1 (docs/cpu_profile.md).

ffi::Error sample_impl(ffi::ThreadPool tp, ffi::Buffer<ffi::F32> logw, ffi::Buffer<ffi::F32> u,
                       ffi::Result<ffi::Buffer<ffi::S32>> tok, ffi::Result<ffi::Buffer<ffi::F32>> logp,
                       int32_t isa, int32_t max_threads) {
  const auto ld = logw.dimensions(), ud = u.dimensions();
  if (ld.size() != 2 || ud.size() != 1 || ud[0] != ld[0] || tok->dimensions().size() != 1 ||
      tok->dimensions()[0] != ld[0] || logp->dimensions().size() != 1 || logp->dimensions()[0] != ld[0])
    return invalid("sample: want logw [B, V], u [B] -> tokens [B], log-probs [B]; got logw " + dims_str(ld) +
                   ", u " + dims_str(ud));
  const Kernels* kern = nullptr;
  if (ffi::Error e = select_kernels(isa, kern); e.failure()) return e;
  const int64_t B = ld[0], n = ld[1];
  if (n > (int64_t{1} << 31) - 1) return invalid("sample: more than 2^31 - 1 entries per row");
  const float *w = logw.typed_data(), *uu = u.typed_data();
  int32_t* out = tok->typed_data();
  float* lp = logp->typed_data();
  const int64_t threads = call_threads(tp, max_threads);
  parallel_chunks(threading().use_xla ? &tp : nullptr, threads, B, [&](int64_t b, int) {
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
    double log_norm = 0.0;
    const int32_t t = kern->sample_row(w + b * n, n, uu[b], buf.data(), &log_norm);
    out[b] = t < 0 ? 0 : t;
    lp[b] = t < 0 ? NAN : static_cast<float>(static_cast<double>(w[b * n + t]) - log_norm);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------
// The KV cache write: k_all / v_all [L, B, S, KV, hd] (f32 or bf16, aliased to the outputs, so the write is
// in place), k / v [B, T, KV, hd] of the cache's dtype, pos int32 [B, T], layer int32 []:
// k_all[layer, b, pos[b, t]] = k[b, t] (and v), with jnp's `.at[].set` index rules — a negative position
// counts from the end (pos + S), one still outside [0, S) is dropped. XLA's CPU scatter does this in place
// for f32 but for bf16 converted the whole cache to f32 and back around every write (SmolLM2, batch 16:
// 0.8 s per decode step; docs/cpu_profile.md, "Night").

ffi::Error kv_write_impl(ffi::AnyBuffer k_all, ffi::AnyBuffer v_all, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> k_out,
                         ffi::Result<ffi::AnyBuffer> v_out) {
  const auto ct = k_all.element_type();
  if (ct != ffi::DataType::F32 && ct != ffi::DataType::BF16) return invalid("kv_write: the cache must be float32 or bfloat16");
  if (v_all.element_type() != ct || k.element_type() != ct || v.element_type() != ct)
    return invalid("kv_write: k_all, v_all, k and v must have one dtype");
  const auto cd = k_all.dimensions(), nd = k.dimensions(), pd = pos.dimensions();
  if (cd.size() != 5 || nd.size() != 4 || pd.size() != 2 || layer.dimensions().size() != 0 ||
      !std::equal(cd.begin(), cd.end(), v_all.dimensions().begin()) || v.dimensions().size() != 4 ||
      !std::equal(nd.begin(), nd.end(), v.dimensions().begin()) || nd[0] != cd[1] || nd[2] != cd[3] ||
      nd[3] != cd[4] || pd[0] != nd[0] || pd[1] != nd[1])
    return invalid("kv_write: want k_all / v_all [L, B, S, KV, hd], k / v [B, T, KV, hd], pos [B, T], layer []; got "
                   "k_all " + dims_str(cd) + ", k " + dims_str(nd) + ", pos " + dims_str(pd));
  const int64_t L = cd[0], B = cd[1], S = cd[2], T = nd[1], l = layer.typed_data()[0];
  if (l < 0 || l >= L) return invalid("kv_write: layer " + std::to_string(l) + " is outside [0, " + std::to_string(L) + ")");
  const int64_t esize = ct == ffi::DataType::BF16 ? 2 : 4, row = cd[3] * cd[4] * esize;  // bytes of one position
  struct Pair { const char* src; char* dst; };
  const Pair pairs[2] = {{static_cast<const char*>(k.untyped_data()), static_cast<char*>(k_out->untyped_data())},
                         {static_cast<const char*>(v.untyped_data()), static_cast<char*>(v_out->untyped_data())}};
  // The outputs alias the inputs (input_output_aliases); copy first if XLA ever gives distinct buffers.
  if (k_out->untyped_data() != k_all.untyped_data()) std::memcpy(k_out->untyped_data(), k_all.untyped_data(), k_all.size_bytes());
  if (v_out->untyped_data() != v_all.untyped_data()) std::memcpy(v_out->untyped_data(), v_all.untyped_data(), v_all.size_bytes());
  const int32_t* p = pos.typed_data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      int64_t s = p[b * T + t];
      if (s < 0) s += S;
      if (s < 0 || s >= S) continue;
      for (const Pair& pr : pairs)
        std::memcpy(pr.dst + ((l * B + b) * S + s) * row, pr.src + (b * T + t) * row, row);
    }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------
// A decoder layer's pointwise ops (RowProblem, er_native.h; kernels/pointwise.py has the references): x's
// rows [..., n], f32 or bf16, the outputs in x's dtype. Each is one call instead of the several small XLA
// fusions (and their copies) it compiled to, which took ~10% of a 64-row step (docs/native.md, "Pointwise ops").
//   er_jax_native_rms_norm(x [.., D], w [D]; eps)                 -> y [.., D]
//   er_jax_native_silu_mul(x [.., 2 I])                             -> y [.., I]: silu(x[:I]) * x[I:]
//   er_jax_native_rope_qkv(x [.., (H + 2 KV) hd], cos, sin [.., hd / 2]; heads, kv_heads)
//                                                                   -> q [.., H hd], k, v [.., KV hd]

constexpr int64_t kRowsParallel = 32768;  // elements of x from which the rows are split over the threads

int64_t rows_of(ffi::AnyBuffer::Dimensions d) {
  int64_t r = 1;
  for (size_t i = 0; i + 1 < d.size(); ++i) r *= d[i];
  return r;
}

ffi::Error run_rows(ffi::ThreadPool& tp, const char* what, RowProblem& p, ffi::AnyBuffer x,
                    std::initializer_list<ffi::Result<ffi::AnyBuffer>*> outs, std::initializer_list<int64_t> widths,
                    int32_t isa, int32_t max_threads) {
  const auto xt = x.element_type();
  if (xt != ffi::DataType::F32 && xt != ffi::DataType::BF16) return invalid(std::string(what) + ": x must be float32 or bfloat16");
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd.back() != p.n)
    return invalid(std::string(what) + ": x " + dims_str(xd) + " must have " + std::to_string(p.n) + " elements a row");
  const int64_t rows = rows_of(xd);
  auto w = widths.begin();
  int i = 0;
  for (auto* o : outs) {  // any shape of rows x *w elements (the caller's: no reshape, no copy after the call)
    const auto od = (*o)->dimensions();
    if ((*o)->element_type() != xt || static_cast<int64_t>((*o)->element_count()) != rows * *w)
      return invalid(std::string(what) + ": output " + std::to_string(i) + " must be x's dtype, " +
                     std::to_string(rows) + " rows of " + std::to_string(*w) + "; got " + dims_str(od));
    p.y[i++] = (*o)->untyped_data();
    ++w;
  }
  const Kernels* kern = nullptr;
  if (ffi::Error e = select_kernels(isa, kern); e.failure()) return e;
  p.x = x.untyped_data();
  p.bf16 = xt == ffi::DataType::BF16;
  const int64_t threads = rows * p.n >= kRowsParallel ? call_threads(tp, max_threads) : 1;
  const int64_t chunks = std::min(rows, 4 * threads), per = chunks ? (rows + chunks - 1) / chunks : 0;
  parallel_chunks(threading().use_xla ? &tp : nullptr, threads, chunks, [&](int64_t c, int) {
    kern->rows(p, c * per, std::min(rows, (c + 1) * per));
  });
  return ffi::Error::Success();
}

ffi::Error rms_norm_impl(ffi::ThreadPool tp, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y, float eps,
                         int32_t isa, int32_t max_threads) {
  const auto wd = w.dimensions();
  if (wd.size() != 1 || (w.element_type() != ffi::DataType::F32 && w.element_type() != ffi::DataType::BF16))
    return invalid("rms_norm: w must be a float32 or bfloat16 vector, got " + dims_str(wd));
  std::vector<float> wf(wd[0]);
  for (int64_t i = 0; i < wd[0]; ++i)
    wf[i] = w.element_type() == ffi::DataType::F32 ? static_cast<const float*>(w.untyped_data())[i]
                                                   : bf16_value(static_cast<const uint16_t*>(w.untyped_data())[i]);
  RowProblem p{};
  p.op = kRmsNorm, p.n = wd[0], p.w = wf.data(), p.eps = eps;
  return run_rows(tp, "rms_norm", p, x, {&y}, {p.n}, isa, max_threads);
}

ffi::Error silu_mul_impl(ffi::ThreadPool tp, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int32_t isa,
                         int32_t max_threads) {
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd.back() % 2) return invalid("silu_mul: x's last axis (gate | up) must be even, got " + dims_str(xd));
  RowProblem p{};
  p.op = kSiluMul, p.n = xd.back();
  return run_rows(tp, "silu_mul", p, x, {&y}, {p.n / 2}, isa, max_threads);
}

ffi::Error rope_qkv_impl(ffi::ThreadPool tp, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                         ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> k, ffi::Result<ffi::AnyBuffer> v,
                         int64_t heads, int64_t kv_heads, int32_t isa, int32_t max_threads) {
  const auto xd = x.dimensions(), cd = cos.dimensions();
  const int64_t parts = heads + 2 * kv_heads;
  if (heads < 1 || kv_heads < 1 || xd.size() < 1 || xd.back() % parts || (xd.back() / parts) % 2)
    return invalid("rope_qkv: x " + dims_str(xd) + " must hold heads + 2 kv_heads = " + std::to_string(parts) +
                   " heads of an even size a row");
  RowProblem p{};
  p.op = kRopeQkv, p.n = xd.back(), p.hd = p.n / parts, p.heads = heads, p.kv_heads = kv_heads;
  if (cd.size() < 1 || cd.back() != p.hd / 2 || rows_of(cd) != rows_of(xd) || !std::equal(cd.begin(), cd.end(), sin.dimensions().begin()) ||
      sin.dimensions().size() != cd.size())
    return invalid("rope_qkv: cos and sin must be [" + std::to_string(rows_of(xd)) + " rows, " + std::to_string(p.hd / 2) +
                   "] like x " + dims_str(xd) + "; got " + dims_str(cd) + " and " + dims_str(sin.dimensions()));
  p.cos = cos.typed_data(), p.sin = sin.typed_data();
  return run_rows(tp, "rope_qkv", p, x, {&q, &k, &v}, {heads * p.hd, kv_heads * p.hd, kv_heads * p.hd}, isa, max_threads);
}

}  // namespace
}  // namespace er_native

#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_dense, er_native::dense_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_panel, er_native::panel_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_panel_int8, er_native::panel_int8_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_panel_int4, er_native::panel_int4_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_int8, er_native::int8_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_int4, er_native::int4_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_attention, er_native::attention_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_sample, er_native::sample_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_kv_write, er_native::kv_write_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_rms_norm, er_native::rms_norm_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_silu_mul, er_native::silu_mul_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(er_jax_native_rope_qkv, er_native::rope_qkv_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("threads"));

// Plain C queries for kernels/native.py (ctypes).
extern "C" {
// The default ISA's name, or "" when there is none (then er_jax_native_error() says why).
const char* er_jax_native_isa() {
  const auto* k = er_native::dispatch().active;
  return k ? k->name : "";
}
const char* er_jax_native_error() { return er_native::dispatch().error.c_str(); }
const char* er_jax_native_notes() { return er_native::dispatch().notes.c_str(); }
// 1 when the kernels of `isa` (1 portable, 2 avx2, 3 avx512, 4 avx512bf16, 5 amx) run on this CPU and passed the
// self-check.
int er_jax_native_usable(int isa) {
  return (isa >= 1 && isa < er_native::kIsaCount && er_native::dispatch().usable[isa]) ? 1 : 0;
}
const char* er_jax_native_pool() { return er_native::threading().use_xla ? "xla" : "own"; }
int er_jax_native_max_threads() { return static_cast<int>(er_native::threading().max_threads); }
int er_jax_native_affinity_cpus() { return er_native::affinity_cpus(); }
}

#pragma GCC visibility pop
