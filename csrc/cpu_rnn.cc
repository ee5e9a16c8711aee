// Compiled whole-sequence LSTM and GRU kernels for hk_rnn on CPU, as XLA FFI
// custom calls that run on XLA's own intra-op thread pool.
//
// hk_rnn/_src/kernels/compiled.py loads this library with ctypes and
// registers four handlers (platform "cpu"); every array is float32 unless
// marked u8, time-major, and an optional array is passed with size 0:
//
//   hk_rnn_cpu_lstm_forward(gx (T,B,4F), w_h (F,4F), b (4F), c_0, h_0,
//       reset_c, reset_h (B,F), valid u8 (T,B), reset u8 (T,B), mask (B,F))
//     -> (y (T,B,F), c_n, h_n, c_steps (T,B,F), coefficients (T,B,4F),
//         c_from_h (T,B,F), f (T,B,F), h_in (T,B,F))
//   hk_rnn_cpu_lstm_backward(coefficients, c_from_h, f, w_h, mask, valid,
//       reset, d_y, d_c_n, d_h_n, d_c_steps)
//     -> (d_z (T,B,4F), d_c_0, d_h_0, d_reset_c, d_reset_h)
//   hk_rnn_cpu_gru_forward(gx (T,B,3F), w_h (F,3F), b_i, b_h (3F), h_0,
//       reset_h, valid, reset, mask)
//     -> (y, h_n, k_x (T,B,3F), k_h (T,B,3F), z (T,B,F), h_in (T,B,F))
//   hk_rnn_cpu_gru_backward(k_x, k_h, z, w_h, mask, valid, reset, d_y,
//       d_h_n) -> (d_gx (T,B,3F), d_gh (T,B,3F), d_h_0, d_reset_h)
//
// gx = x W_i, the input projection, is computed by XLA before the call (one
// large GEMM); the kernels add the biases, run the recurrent product h_in W_h
// of every step and the gate math in the same loop. Results of size 0 are
// not computed: without the residual results the forward pass saves
// nothing, without c_steps it emits nothing. The semantics (resets, masks,
// dropout, the residuals and the backward recursion) are those of the XLA
// engine, hk_rnn/_src/fused.py; its module docstring has the math.
//
// Parallel scheme. The hidden units are split into chunks of whole units
// (all gate columns of a unit in one chunk); the recurrent weights are
// re-laid once per call so that each chunk's columns form one contiguous
// panel, K-major, with the gates of one SIMD group of units side by side
// (the micro-kernel computes every gate of its units for a block of rows in
// registers, and the gate math runs on those registers). A call is a
// sequence of phases (packing, then one per step); in each, every chunk is
// one ticket. Participants take tickets from one atomic counter, in order,
// and a ticket of phase p waits only until every ticket of phase p - 1 is
// done. The calling thread is a participant and the others are tasks
// scheduled on XLA's thread pool (the handler's ThreadPool context): a task
// that starts late, or never, only means the caller takes more tickets.
// Nothing ever waits for a thread to arrive, so there is no deadlock and no
// second thread pool beside XLA's. A caller kept waiting over 0.5 ms by a
// preempted participant finishes the call alone (Schedule::solo), and the
// calls of the next 0.2 s run on one thread (solo_until_ns).
//
// The SIMD code is written once with GCC vector extensions and compiled
// twice, for AVX-512 and for AVX2+FMA, through function attributes; the
// CPU is checked when the library loads (hk_rnn_cpu_isa).

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#define HK_RNN_EXPORT __attribute__((visibility("default")))
#define HK_INLINE inline __attribute__((always_inline))

namespace {

// ---------------------------------------------------------------------------
// SIMD vectors of V floats.

// The vector types are spelled out per width: GCC drops a vector_size
// attribute whose size depends on a template parameter.
template <int V>
struct VectorTypes;
template <>
struct VectorTypes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef float FU __attribute__((vector_size(64), aligned(4)));
  typedef int32_t I __attribute__((vector_size(64)));
};
template <>
struct VectorTypes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef float FU __attribute__((vector_size(32), aligned(4)));
  typedef int32_t I __attribute__((vector_size(32)));
};

template <int V>
struct Simd {
  typedef typename VectorTypes<V>::F F;
  typedef typename VectorTypes<V>::FU FU;
  typedef typename VectorTypes<V>::I I;
  static_assert(sizeof(F) == V * sizeof(float), "vector width");

  static HK_INLINE F Load(const float* p) { return *(const FU*)p; }
  static HK_INLINE void Store(float* p, F v) { *(FU*)p = v; }
  // Lane 0 shuffled to every lane: one broadcast instruction.
  static HK_INLINE F Set(float x) { return __builtin_shuffle(F{x}, I{}); }
  // The first n lanes from p, zero beyond (n < V reads nothing past p + n).
  static HK_INLINE F LoadPart(const float* p, int n) {
    if (n == V) return Load(p);
    float tmp[V] = {};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return Load(tmp);
  }
  static HK_INLINE void StorePart(float* p, F v, int n) {
    if (n == V) {
      Store(p, v);
      return;
    }
    float tmp[V];
    Store(tmp, v);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }
  static HK_INLINE F Reciprocal(F x) { return Set(1.0f) / x; }
  static HK_INLINE F Min(F a, F b) { return a < b ? a : b; }
  static HK_INLINE F Max(F a, F b) { return a > b ? a : b; }
  // exp(x), relative error ~1e-7 on [-87, 88]: x = n ln2 + r, |r| <= ln2/2,
  // exp(r) by its Taylor polynomial of degree 7, 2^n built in the exponent.
  static HK_INLINE F Exp(F x) {
    x = Max(Min(x, Set(88.3762626647949f)), Set(-87.3365447504f));
    const F magic = Set(12582912.0f);  // 1.5 * 2^23: rounds to an integer.
    const F shifted = x * Set(1.44269504088896341f) + magic;
    const F n = shifted - magic;
    F r = x - n * Set(0.693359375f);
    r = r - n * Set(-2.12194440e-4f);
    F p = Set(1.0f / 5040);
    p = p * r + Set(1.0f / 720);
    p = p * r + Set(1.0f / 120);
    p = p * r + Set(1.0f / 24);
    p = p * r + Set(1.0f / 6);
    p = p * r + Set(0.5f);
    p = p * r + Set(1.0f);
    p = p * r + Set(1.0f);
    // shifted's low mantissa bits hold n: its bits minus magic's are n.
    const I bits = (((I)shifted) - 0x4B400000 + 127) << 23;
    return p * (F)bits;  // vector casts reinterpret the bits
  }
  static HK_INLINE F Sigmoid(F x) { return Reciprocal(Set(1.0f) + Exp(-x)); }
  // tanh(x) = 2 sigmoid(2x) - 1, as the XLA engine computes it.
  static HK_INLINE F Tanh(F x) {
    return Set(2.0f) * Sigmoid(x + x) - Set(1.0f);
  }
};

// acc[m][n] = sum_k a[m * lda + k] * panel[k * NV * V + n * V + (0..V)].
template <int V, int M, int NV>
HK_INLINE void Tile(const float* a, int64_t lda, const float* panel, int64_t k,
                    typename Simd<V>::F (&acc)[M][NV]) {
  using S = Simd<V>;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < NV; ++n) acc[m][n] = S::Set(0.0f);
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* w = panel + kk * NV * V;
    typename S::F wv[NV];
    for (int n = 0; n < NV; ++n) wv[n] = S::Load(w + n * V);
    for (int m = 0; m < M; ++m) {
      typename S::F av = S::Set(a[m * lda + kk]);
      for (int n = 0; n < NV; ++n) acc[m][n] += av * wv[n];
    }
  }
}

// ---------------------------------------------------------------------------
// Phases and tickets on XLA's thread pool.

struct Schedule {
  int64_t phases = 0;
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  // Set by the caller when it waited too long for a ticket another thread
  // holds (that thread was preempted: the cores are oversubscribed); the
  // pool tasks then take no new ticket and the caller finishes alone.
  std::atomic<bool> solo{false};
};

// How long the caller waits on one ticket before going solo.
constexpr auto kSoloAfter = std::chrono::microseconds(500);

HK_INLINE void Relax(int64_t& spins) {
  if (++spins < 4096) {
    __builtin_ia32_pause();
  } else {
    sched_yield();
  }
}

// Takes tickets until none is left; work(phase, chunk) runs each.
template <typename Work>
void Participate(Schedule& s, const Work& work, bool caller) {
  const int64_t total = s.phases * s.chunks;
  for (;;) {
    if (!caller && s.solo.load(std::memory_order_relaxed)) return;
    const int64_t ticket = s.next.fetch_add(1, std::memory_order_relaxed);
    if (ticket >= total) return;
    const int64_t phase = ticket / s.chunks;
    const int64_t ready = phase * s.chunks;
    int64_t spins = 0;
    std::chrono::steady_clock::time_point start;
    while (s.done.load(std::memory_order_acquire) < ready) {
      Relax(spins);
      if (caller && (spins & 255) == 0) {
        const auto now = std::chrono::steady_clock::now();
        if (spins == 256) {
          start = now;
        } else if (now - start > kSoloAfter) {
          s.solo.store(true, std::memory_order_relaxed);
        }
      }
    }
    work(phase, ticket - ready);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

// Grow-only scratch memory of the calling thread, kept between calls (a
// fresh megabyte each call would cost page faults). Slots are independent.
float* Scratch(int slot, std::size_t floats) {
  struct Buffer {
    float* data = nullptr;
    std::size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[3];
  Buffer& b = buffers[slot];
  if (b.size < floats) {
    std::free(b.data);
    b.data = static_cast<float*>(
        std::aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64));
    if (b.data == nullptr) {
      b.size = 0;
      throw std::bad_alloc();
    }
    b.size = floats;
  }
  return b.data;
}

// After a call whose caller had to finish alone (a participant was
// preempted: the cores are oversubscribed, say by another busy process),
// calls run on one thread for a while, then try again with several. On a
// busy machine one thread loses less than several that wait for each other
// at every step; on an idle one the backoff never starts.
std::atomic<int64_t> solo_until_ns{0};
constexpr int64_t kBackoffNs = 200'000'000;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool Adaptive() {
  const char* adaptive = std::getenv("HK_RNN_COMPILED_ADAPTIVE");
  return adaptive == nullptr || std::strcmp(adaptive, "0") != 0;
}

int Participants(ffi::ThreadPool& pool, int64_t chunks) {
  int64_t n = pool.num_threads();
  int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0)
    cores = std::max(1, CPU_COUNT(&allowed));  // taskset, cgroups
  if (Adaptive() && NowNs() < solo_until_ns.load(std::memory_order_relaxed))
    cores = 1;
  if (const char* env = std::getenv("HK_RNN_COMPILED_THREADS")) {
    const int64_t cap = std::atoll(env);
    if (cap > 0) n = std::min(n, cap);
  }
  return static_cast<int>(std::max<int64_t>(1, std::min({n, cores, chunks})));
}

// Runs phases x chunks tickets: the caller and participants - 1 pool tasks.
// The work functor is copied into shared state, so a pool task that starts
// after the caller has returned finds no ticket and touches nothing else.
template <typename Work>
void RunPhases(ffi::ThreadPool& pool, int64_t phases, int64_t chunks,
               const Work& work) {
  if (phases <= 0 || chunks <= 0) return;
  struct Shared {
    Schedule schedule;
    Work work;
    explicit Shared(const Work& w) : work(w) {}
  };
  auto shared = std::make_shared<Shared>(work);
  shared->schedule.phases = phases;
  shared->schedule.chunks = chunks;
  const int helpers = Participants(pool, chunks) - 1;
  for (int i = 0; i < helpers; ++i) {
    pool.Schedule(
        [shared] { Participate(shared->schedule, shared->work, false); });
  }
  Participate(shared->schedule, shared->work, true);
  const int64_t total = phases * chunks;
  int64_t spins = 0;
  while (shared->schedule.done.load(std::memory_order_acquire) < total)
    Relax(spins);
  if (helpers > 0 && shared->schedule.solo.load(std::memory_order_relaxed))
    solo_until_ns.store(NowNs() + kBackoffNs, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------
// Shapes, optional arrays and scratch memory.

struct Dims {
  int64_t t, b, f;
};


template <typename T>
const T* Optional(const T* p, std::size_t size) {
  return size == 0 ? nullptr : p;
}

// Packs w (F, G F) for the forward pass: panel u holds units [uV, uV + V)
// as panel[k][g][v] = w[k][g F + u V + v] (zero for units past F).
template <int V>
void PackForward(const float* w, int64_t f, int g, int64_t u, float* panel) {
  const int64_t width = g * f;
  for (int64_t k = 0; k < f; ++k) {
    for (int gate = 0; gate < g; ++gate) {
      float* out = panel + (k * g + gate) * V;
      for (int v = 0; v < V; ++v) {
        const int64_t unit = u * V + v;
        out[v] = unit < f ? w[k * width + gate * f + unit] : 0.0f;
      }
    }
  }
}

// Packs w's transpose (G F, F) for the backward pass: panel q holds units
// [q W, q W + W), W = NV V, as panel[k][n] = w[q W + n][k].
template <int V, int NV>
void PackBackward(const float* w, int64_t f, int g, int64_t q, float* panel) {
  constexpr int kWidth = NV * V;
  const int64_t width = g * f;
  for (int n = 0; n < kWidth; ++n) {
    const int64_t unit = q * kWidth + n;
    for (int64_t k = 0; k < width; ++k)
      panel[k * kWidth + n] = unit < f ? w[unit * width + k] : 0.0f;
  }
}

// Runs body.Run<M>(m0) over rows [0, rows) in blocks of M, the micro-kernel's
// register block; the remainder takes a smaller instantiation.
template <int M, typename Body>
HK_INLINE void RestRows(int64_t rest, int64_t m0, const Body& body) {
  if constexpr (M > 0) {
    if (rest == M) {
      body.template Run<M>(m0);
    } else {
      RestRows<M - 1>(rest, m0, body);
    }
  }
}

template <int M, typename Body>
HK_INLINE void ForRows(int64_t rows, const Body& body) {
  int64_t m0 = 0;
  for (; m0 + M <= rows; m0 += M) body.template Run<M>(m0);
  if (rows > m0) RestRows<M - 1>(rows - m0, m0, body);
}

// ---------------------------------------------------------------------------
// The arguments of one call, shared by every chunk.

struct ForwardArgs {
  Dims d;
  int gates;  // 4 (LSTM) or 3 (GRU)
  const float* gx;
  const float* w_h;
  const float* b_i;  // LSTM: b
  const float* b_h;  // GRU only
  const float* c_0;  // LSTM only
  const float* h_0;
  const float* reset_c;  // LSTM only
  const float* reset_h;
  const float* mask;
  const uint8_t* valid;
  const uint8_t* reset;
  float* y;
  float* c;  // LSTM: the cell state, updated in place (c_n)
  float* h;  // the hidden state, updated in place (h_n)
  float* c_steps;
  // LSTM: coefficients (T,B,4F), c_from_h, f; GRU: k_x, k_h (T,B,3F), z.
  float* saved[3];
  float* h_in;  // (T, B, F): saved, or a (2, B, F) scratch ring
  bool h_in_ring;
  float* panels;

  HK_INLINE float* HIn(int64_t t) const {
    return h_in + (h_in_ring ? (t & 1) : t) * d.b * d.f;
  }
};

struct BackwardArgs {
  Dims d;
  int gates;
  const float* saved[3];
  const float* w_h;
  const float* mask;
  const uint8_t* valid;
  const uint8_t* reset;
  const float* d_y;
  const float* d_c_n;  // LSTM only
  const float* d_h_n;
  const float* d_c_steps;  // LSTM only, optional
  float* d_z;              // LSTM: d_z; GRU: d_gx
  float* d_gh;             // GRU only: the cotangent the GEMM reads
  float* d_c;              // LSTM: the running dc (ends as d_c_0)
  float* d_h;              // the running dh (ends as d_h_0)
  float* d_reset_c;
  float* d_reset_h;
  float* direct;  // (B, F): LSTM dc_total f; GRU dh' z
  float* panels;
};

// Phase 0 of a forward call, for the units [lo, hi): packs their panel and
// sets the state and h_in of step 0.
template <int V>
void ForwardStart(const ForwardArgs& a, int64_t u) {
  const int64_t f = a.d.f;
  PackForward<V>(a.w_h, f, a.gates, u, a.panels + u * f * a.gates * V);
  const int64_t lo = u * V, hi = std::min(f, lo + V);
  for (int64_t row = 0; row < a.d.b; ++row) {
    const bool reset = a.reset && a.reset[row];
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t i = row * f + j;
      a.h[i] = a.h_0[i];
      if (a.c) a.c[i] = a.c_0[i];
      float h = reset ? a.reset_h[i] : a.h_0[i];
      if (a.mask) h *= a.mask[i];
      a.HIn(0)[i] = h;
    }
  }
}

// The h_in of step t + 1 for a block of units of one row, from the state
// after step t.
template <int V>
HK_INLINE void NextHIn(const ForwardArgs& a, int64_t t, int64_t row,
                       int64_t col, int nv, typename Simd<V>::F h) {
  using S = Simd<V>;
  if (t + 1 >= a.d.t) return;
  const int64_t i = row * a.d.f + col;
  if (a.reset && a.reset[(t + 1) * a.d.b + row]) h = S::LoadPart(a.reset_h + i, nv);
  if (a.mask) h = h * S::LoadPart(a.mask + i, nv);
  S::StorePart(a.HIn(t + 1) + i, h, nv);
}

// P: the unit group is partial (F is not a multiple of V), nv_in < V.
template <int V, bool P>
struct LstmForwardRows {
  const ForwardArgs& a;
  int64_t t, u;
  int nv_in;

  template <int M>
  HK_INLINE void Run(int64_t m0) const {
    const int nv = P ? nv_in : V;  // a constant on the full path
    using S = Simd<V>;
    using F = typename S::F;
    const int64_t f = a.d.f, width = 4 * f, col = u * V;
    // This block's projected inputs come from memory (the step's first
    // touch): their loads overlap the product.
    for (int m = 0; m < M; ++m)
      for (int g = 0; g < 4; ++g)
        __builtin_prefetch(a.gx + (t * a.d.b + m0 + m) * width + col + g * f);
    F acc[M][4];
    Tile<V, M, 4>(a.HIn(t) + m0 * f, f, a.panels + u * f * 4 * V, f, acc);
    const F one = S::Set(1.0f), zero = S::Set(0.0f);
    for (int m = 0; m < M; ++m) {
      const int64_t row = m0 + m, tb = t * a.d.b + row, i = row * f + col;
      const bool valid = !a.valid || a.valid[tb];
      const bool reset = a.reset && a.reset[tb];
      const F c_prev = S::LoadPart((reset ? a.reset_c : a.c) + i, nv);
      F c_new = c_prev;
      F h_new = S::LoadPart((reset ? a.reset_h : a.h) + i, nv);
      F out = zero;
      const float* gx = a.gx + tb * width + col;
      const float* b = a.b_i + col;
      if (valid) {
        const F gi = S::Sigmoid(acc[m][0] + S::LoadPart(gx, nv) + S::LoadPart(b, nv));
        const F gf = S::Sigmoid(acc[m][1] + S::LoadPart(gx + f, nv) +
                                S::LoadPart(b + f, nv));
        const F gg = S::Tanh(acc[m][2] + S::LoadPart(gx + 2 * f, nv) +
                             S::LoadPart(b + 2 * f, nv));
        const F go = S::Sigmoid(acc[m][3] + S::LoadPart(gx + 3 * f, nv) +
                                S::LoadPart(b + 3 * f, nv));
        c_new = gf * c_prev + gi * gg;
        const F tanh_c = S::Tanh(c_new);
        h_new = go * tanh_c;
        out = h_new;
        if (a.saved[0]) {
          float* k = a.saved[0] + tb * width + col;
          S::StorePart(k, (one - gi) * gi * gg, nv);
          S::StorePart(k + f, (one - gf) * gf * c_prev, nv);
          S::StorePart(k + 2 * f, (one - gg * gg) * gi, nv);
          S::StorePart(k + 3 * f, (one - go) * go * tanh_c, nv);
          S::StorePart(a.saved[1] + tb * f + col, go * (one - tanh_c * tanh_c), nv);
          S::StorePart(a.saved[2] + tb * f + col, gf, nv);
        }
      } else if (a.saved[0]) {
        float* k = a.saved[0] + tb * width + col;
        for (int g = 0; g < 4; ++g) S::StorePart(k + g * f, zero, nv);
        S::StorePart(a.saved[1] + tb * f + col, zero, nv);
        S::StorePart(a.saved[2] + tb * f + col, zero, nv);
      }
      S::StorePart(a.c + i, c_new, nv);
      S::StorePart(a.h + i, h_new, nv);
      S::StorePart(a.y + tb * f + col, out, nv);
      if (a.c_steps) S::StorePart(a.c_steps + tb * f + col, c_new, nv);
      NextHIn<V>(a, t, row, col, nv, h_new);
    }
  }
};

// P: the unit group is partial (F is not a multiple of V), nv_in < V.
template <int V, bool P>
struct GruForwardRows {
  const ForwardArgs& a;
  int64_t t, u;
  int nv_in;

  template <int M>
  HK_INLINE void Run(int64_t m0) const {
    const int nv = P ? nv_in : V;  // a constant on the full path
    using S = Simd<V>;
    using F = typename S::F;
    const int64_t f = a.d.f, width = 3 * f, col = u * V;
    for (int m = 0; m < M; ++m)
      for (int g = 0; g < 3; ++g)
        __builtin_prefetch(a.gx + (t * a.d.b + m0 + m) * width + col + g * f);
    F acc[M][3];
    Tile<V, M, 3>(a.HIn(t) + m0 * f, f, a.panels + u * f * 3 * V, f, acc);
    const F one = S::Set(1.0f), zero = S::Set(0.0f);
    for (int m = 0; m < M; ++m) {
      const int64_t row = m0 + m, tb = t * a.d.b + row, i = row * f + col;
      const bool valid = !a.valid || a.valid[tb];
      const bool reset = a.reset && a.reset[tb];
      const F h_prev = S::LoadPart((reset ? a.reset_h : a.h) + i, nv);
      F h_new = h_prev, out = zero;
      const float* gx = a.gx + tb * width + col;
      const float* bi = a.b_i + col;
      const float* bh = a.b_h + col;
      if (valid) {
        const F h_r = acc[m][0] + S::LoadPart(bh, nv);
        const F h_z = acc[m][1] + S::LoadPart(bh + f, nv);
        const F h_n = acc[m][2] + S::LoadPart(bh + 2 * f, nv);
        const F r = S::Sigmoid(S::LoadPart(gx, nv) + S::LoadPart(bi, nv) + h_r);
        const F z = S::Sigmoid(S::LoadPart(gx + f, nv) + S::LoadPart(bi + f, nv) + h_z);
        const F n = S::Tanh(S::LoadPart(gx + 2 * f, nv) +
                            S::LoadPart(bi + 2 * f, nv) + r * h_n);
        h_new = n + z * (h_prev - n);
        out = h_new;
        if (a.saved[0]) {
          const F d_n = (one - z) * (one - n * n);
          const F d_r = d_n * h_n * r * (one - r);
          const F d_z = (h_prev - n) * z * (one - z);
          float* kx = a.saved[0] + tb * width + col;
          float* kh = a.saved[1] + tb * width + col;
          S::StorePart(kx, d_r, nv);
          S::StorePart(kx + f, d_z, nv);
          S::StorePart(kx + 2 * f, d_n, nv);
          S::StorePart(kh, d_r, nv);
          S::StorePart(kh + f, d_z, nv);
          S::StorePart(kh + 2 * f, d_n * r, nv);
          S::StorePart(a.saved[2] + tb * f + col, z, nv);
        }
      } else if (a.saved[0]) {
        for (int g = 0; g < 3; ++g) {
          S::StorePart(a.saved[0] + tb * width + col + g * f, zero, nv);
          S::StorePart(a.saved[1] + tb * width + col + g * f, zero, nv);
        }
        S::StorePart(a.saved[2] + tb * f + col, zero, nv);
      }
      S::StorePart(a.h + i, h_new, nv);
      S::StorePart(a.y + tb * f + col, out, nv);
      NextHIn<V>(a, t, row, col, nv, h_new);
    }
  }
};

// One forward ticket: phase 0 packs, phase p runs step p - 1 for unit group
// u of every row.
template <int V, int MLstm, int MGru>
HK_INLINE void ForwardChunk(const ForwardArgs& a, int64_t phase, int64_t u) {
  if (phase == 0) {
    ForwardStart<V>(a, u);
    return;
  }
  const int nv = static_cast<int>(std::min<int64_t>(V, a.d.f - u * V));
  const int64_t t = phase - 1;
  if (a.gates == 4) {
    if (nv == V) {
      ForRows<MLstm>(a.d.b, LstmForwardRows<V, false>{a, t, u, nv});
    } else {
      ForRows<MLstm>(a.d.b, LstmForwardRows<V, true>{a, t, u, nv});
    }
  } else if (nv == V) {
    ForRows<MGru>(a.d.b, GruForwardRows<V, false>{a, t, u, nv});
  } else {
    ForRows<MGru>(a.d.b, GruForwardRows<V, true>{a, t, u, nv});
  }
}

// Backward chunks hold NV SIMD groups of units.
constexpr int kBackwardGroups = 2;

template <int V>
void BackwardStart(const BackwardArgs& a, int64_t q) {
  constexpr int kWidth = kBackwardGroups * V;
  const int64_t f = a.d.f;
  PackBackward<V, kBackwardGroups>(a.w_h, f, a.gates, q,
                                   a.panels + q * a.gates * f * kWidth);
  const int64_t lo = q * kWidth, hi = std::min(f, lo + kWidth);
  for (int64_t row = 0; row < a.d.b; ++row) {
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t i = row * f + j;
      a.d_h[i] = a.d_h_n[i];
      a.d_reset_h[i] = 0.0f;
      if (a.d_c) {
        a.d_c[i] = a.d_c_n[i];
        a.d_reset_c[i] = 0.0f;
      }
    }
  }
}

// Part A of backward phase s: finishes step s for a chunk's units, given
// the complete gate cotangents of step s (the GEMM through w_hᵀ).
template <int V, bool P>
struct BackwardFinishRows {
  const BackwardArgs& a;
  int64_t s, q;
  int nv[kBackwardGroups];

  template <int M>
  HK_INLINE void Run(int64_t m0) const {
    using S = Simd<V>;
    using F = typename S::F;
    constexpr int kWidth = kBackwardGroups * V;
    const int64_t f = a.d.f, width = a.gates * f;
    const float* dz = (a.d_gh ? a.d_gh : a.d_z) + (s * a.d.b + m0) * width;
    F acc[M][kBackwardGroups];
    Tile<V, M, kBackwardGroups>(dz, width, a.panels + q * width * kWidth,
                                width, acc);
    const F zero = S::Set(0.0f);
    for (int m = 0; m < M; ++m) {
      const int64_t row = m0 + m, tb = s * a.d.b + row;
      const bool valid = !a.valid || a.valid[tb];
      const bool reset = a.reset && a.reset[tb];
      for (int n = 0; n < kBackwardGroups; ++n) {
        const int nvn = P ? nv[n] : V;
        if (nvn <= 0) continue;
        const int64_t i = row * f + q * kWidth + n * V;
        if (valid) {
          F d_h_in = acc[m][n];
          if (a.mask) d_h_in = d_h_in * S::LoadPart(a.mask + i, nvn);
          F d_h = d_h_in;
          if (!a.d_c) d_h = d_h + S::LoadPart(a.direct + i, nvn);
          S::StorePart(a.d_h + i, d_h, nvn);
          if (a.d_c) S::StorePart(a.d_c + i, S::LoadPart(a.direct + i, nvn), nvn);
        }
        if (reset) {
          S::StorePart(a.d_reset_h + i,
                       S::LoadPart(a.d_reset_h + i, nvn) +
                           S::LoadPart(a.d_h + i, nvn),
                       nvn);
          S::StorePart(a.d_h + i, zero, nvn);
          if (a.d_c) {
            S::StorePart(a.d_reset_c + i,
                         S::LoadPart(a.d_reset_c + i, nvn) +
                             S::LoadPart(a.d_c + i, nvn),
                         nvn);
            S::StorePart(a.d_c + i, zero, nvn);
          }
        }
      }
    }
  }
};

// Part B of backward phase s: the gate cotangents of step t = s - 1 for a
// chunk's units, from the state cotangents after it.
template <int V, bool P>
HK_INLINE void BackwardGates(const BackwardArgs& a, int64_t t, int64_t q) {
  using S = Simd<V>;
  using F = typename S::F;
  constexpr int kWidth = kBackwardGroups * V;
  const int64_t f = a.d.f, width = a.gates * f;
  const F zero = S::Set(0.0f);
  constexpr int kAhead = 2;  // rows whose saved coefficients are prefetched
  for (int64_t row = 0; row < a.d.b; ++row) {
    const int64_t tb = t * a.d.b + row;
    const bool valid = !a.valid || a.valid[tb];
    if (row + kAhead < a.d.b) {
      const int64_t ahead = tb + kAhead;
      const int64_t col = q * kWidth;
      for (int n = 0; n < kBackwardGroups; ++n) {
        for (int g = 0; g < a.gates; ++g) {
          __builtin_prefetch(a.saved[0] + ahead * width + col + n * V + g * f);
          if (!a.d_c)
            __builtin_prefetch(a.saved[1] + ahead * width + col + n * V + g * f);
        }
        __builtin_prefetch(a.d_y + ahead * f + col + n * V);
        __builtin_prefetch(a.saved[a.d_c ? 1 : 2] + ahead * f + col + n * V);
        if (a.d_c) __builtin_prefetch(a.saved[2] + ahead * f + col + n * V);
      }
    }
    for (int n = 0; n < kBackwardGroups; ++n) {
      const int64_t col = q * kWidth + n * V;
      const int nv = P ? static_cast<int>(std::min<int64_t>(V, f - col)) : V;
      if (nv <= 0) continue;
      const int64_t i = row * f + col, ti = tb * f + col;
      float* dz = a.d_z + tb * width + col;
      if (a.d_c) {  // LSTM
        F d_c = S::LoadPart(a.d_c + i, nv);
        if (a.d_c_steps) {
          d_c = d_c + S::LoadPart(a.d_c_steps + ti, nv);
          S::StorePart(a.d_c + i, d_c, nv);
        }
        if (!valid) {
          for (int g = 0; g < 4; ++g) S::StorePart(dz + g * f, zero, nv);
          continue;
        }
        const F d_h = S::LoadPart(a.d_h + i, nv) + S::LoadPart(a.d_y + ti, nv);
        const F d_total = d_c + d_h * S::LoadPart(a.saved[1] + ti, nv);
        const float* k = a.saved[0] + tb * width + col;
        S::StorePart(dz, d_total * S::LoadPart(k, nv), nv);
        S::StorePart(dz + f, d_total * S::LoadPart(k + f, nv), nv);
        S::StorePart(dz + 2 * f, d_total * S::LoadPart(k + 2 * f, nv), nv);
        S::StorePart(dz + 3 * f, d_h * S::LoadPart(k + 3 * f, nv), nv);
        S::StorePart(a.direct + i, d_total * S::LoadPart(a.saved[2] + ti, nv), nv);
      } else {  // GRU
        float* dgh = a.d_gh + tb * width + col;
        if (!valid) {
          for (int g = 0; g < 3; ++g) {
            S::StorePart(dz + g * f, zero, nv);
            S::StorePart(dgh + g * f, zero, nv);
          }
          continue;
        }
        const F d_h = S::LoadPart(a.d_h + i, nv) + S::LoadPart(a.d_y + ti, nv);
        const float* kx = a.saved[0] + tb * width + col;
        const float* kh = a.saved[1] + tb * width + col;
        for (int g = 0; g < 3; ++g) {
          S::StorePart(dz + g * f, d_h * S::LoadPart(kx + g * f, nv), nv);
          S::StorePart(dgh + g * f, d_h * S::LoadPart(kh + g * f, nv), nv);
        }
        S::StorePart(a.direct + i, d_h * S::LoadPart(a.saved[2] + ti, nv), nv);
      }
    }
  }
}

// One backward ticket: phase 0 packs; phase p handles s = T - (p - 1):
// finishes step s (if s < T) and computes the gate cotangents of s - 1.
template <int V, int M>
HK_INLINE void BackwardChunk(const BackwardArgs& a, int64_t phase, int64_t q) {
  if (phase == 0) {
    BackwardStart<V>(a, q);
    return;
  }
  constexpr int kWidth = kBackwardGroups * V;
  const int64_t s = a.d.t - (phase - 1);
  const bool partial = (q + 1) * kWidth > a.d.f;
  if (s < a.d.t) {
    int nv[kBackwardGroups];
    for (int n = 0; n < kBackwardGroups; ++n)
      nv[n] = static_cast<int>(
          std::max<int64_t>(0, std::min<int64_t>(V, a.d.f - q * kWidth - n * V)));
    if (partial) {
      ForRows<M>(a.d.b, BackwardFinishRows<V, true>{a, s, q, {nv[0], nv[1]}});
    } else {
      ForRows<M>(a.d.b, BackwardFinishRows<V, false>{a, s, q, {nv[0], nv[1]}});
    }
  }
  if (s > 0) {
    if (partial) {
      BackwardGates<V, true>(a, s - 1, q);
    } else {
      BackwardGates<V, false>(a, s - 1, q);
    }
  }
}

#define HK_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define HK_AVX2 __attribute__((target("avx2,fma")))

HK_AVX512 void ForwardChunk512(const ForwardArgs& a, int64_t p, int64_t c) {
  ForwardChunk<16, 6, 8>(a, p, c);
}
HK_AVX2 void ForwardChunk256(const ForwardArgs& a, int64_t p, int64_t c) {
  ForwardChunk<8, 3, 4>(a, p, c);
}
HK_AVX512 void BackwardChunk512(const BackwardArgs& a, int64_t p, int64_t c) {
  BackwardChunk<16, 12>(a, p, c);
}
HK_AVX2 void BackwardChunk256(const BackwardArgs& a, int64_t p, int64_t c) {
  BackwardChunk<8, 6>(a, p, c);
}

// 2: AVX-512, 1: AVX2 with FMA, 0: neither (the library refuses to load).
int DetectIsa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

int Isa() {
  static const int isa = [] {
    int detected = DetectIsa();
    if (const char* env = std::getenv("HK_RNN_COMPILED_ISA")) {
      // For tests of the narrower path on a wider machine.
      if (std::strcmp(env, "avx2") == 0 && detected >= 1) detected = 1;
    }
    return detected;
  }();
  return isa;
}

int Lanes() { return Isa() == 2 ? 16 : 8; }

// ---------------------------------------------------------------------------
// FFI handlers.

using In = ffi::Buffer<ffi::F32>;
using Mask = ffi::Buffer<ffi::U8>;
using Out = ffi::ResultBuffer<ffi::F32>;

template <typename Body>
ffi::Error Guarded(const Body& body) {
  try {
    if (Isa() == 0) return ffi::Error::Internal("hk_rnn: CPU lacks AVX2+FMA");
    body();
    return ffi::Error::Success();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "hk_rnn compiled RNN: out of memory");
  }
}

template <typename T>
T* Data(Out& r) {
  return r->element_count() == 0 ? nullptr : r->typed_data();
}

void RunForward(ffi::ThreadPool& pool, ForwardArgs& a) {
  const int v = Lanes();
  const int64_t groups = (a.d.f + v - 1) / v;
  a.panels = Scratch(0, groups * a.d.f * a.gates * v);
  if (a.h_in == nullptr) {
    a.h_in = Scratch(1, 2 * a.d.b * a.d.f);
    a.h_in_ring = true;
  }
  auto chunk = Isa() == 2 ? ForwardChunk512 : ForwardChunk256;
  const ForwardArgs args = a;
  RunPhases(pool, a.d.t + 1, groups,
            [args, chunk](int64_t p, int64_t c) { chunk(args, p, c); });
}

void RunBackward(ffi::ThreadPool& pool, BackwardArgs& a) {
  const int width = kBackwardGroups * Lanes();
  const int64_t chunks = (a.d.f + width - 1) / width;
  a.panels = Scratch(0, chunks * a.gates * a.d.f * width);
  a.direct = Scratch(2, a.d.b * a.d.f);
  auto chunk = Isa() == 2 ? BackwardChunk512 : BackwardChunk256;
  const BackwardArgs args = a;
  RunPhases(pool, a.d.t + 2, chunks,
            [args, chunk](int64_t p, int64_t c) { chunk(args, p, c); });
}

ffi::Error LstmForward(ffi::ThreadPool pool, In gx, In w_h, In b, In c_0,
                       In h_0, In reset_c, In reset_h, Mask valid, Mask reset,
                       In mask, Out y, Out c_n, Out h_n, Out c_steps,
                       Out coefficients, Out c_from_h, Out f_saved, Out h_in) {
  return Guarded([&] {
    const auto dims = gx.dimensions();
    ForwardArgs a{};
    a.d = {dims[0], dims[1], w_h.dimensions()[0]};
    a.gates = 4;
    if (a.d.b == 0 || a.d.f == 0) return;
    a.gx = gx.typed_data();
    a.w_h = w_h.typed_data();
    a.b_i = b.typed_data();
    a.c_0 = c_0.typed_data();
    a.h_0 = h_0.typed_data();
    a.reset_c = reset_c.typed_data();
    a.reset_h = reset_h.typed_data();
    a.valid = Optional(valid.typed_data(), valid.element_count());
    a.reset = Optional(reset.typed_data(), reset.element_count());
    a.mask = Optional(mask.typed_data(), mask.element_count());
    a.y = Data<float>(y);
    a.c = Data<float>(c_n);
    a.h = Data<float>(h_n);
    a.c_steps = Data<float>(c_steps);
    a.saved[0] = Data<float>(coefficients);
    a.saved[1] = Data<float>(c_from_h);
    a.saved[2] = Data<float>(f_saved);
    a.h_in = Data<float>(h_in);
    const std::size_t carry = a.d.b * a.d.f * sizeof(float);
    if (a.d.t == 0) {
      std::memcpy(a.c, a.c_0, carry);
      std::memcpy(a.h, a.h_0, carry);
      return;
    }
    RunForward(pool, a);
  });
}

ffi::Error GruForward(ffi::ThreadPool pool, In gx, In w_h, In b_i, In b_h,
                      In h_0, In reset_h, Mask valid, Mask reset, In mask,
                      Out y, Out h_n, Out k_x, Out k_h, Out z, Out h_in) {
  return Guarded([&] {
    const auto dims = gx.dimensions();
    ForwardArgs a{};
    a.d = {dims[0], dims[1], w_h.dimensions()[0]};
    a.gates = 3;
    if (a.d.b == 0 || a.d.f == 0) return;
    a.gx = gx.typed_data();
    a.w_h = w_h.typed_data();
    a.b_i = b_i.typed_data();
    a.b_h = b_h.typed_data();
    a.h_0 = h_0.typed_data();
    a.reset_h = reset_h.typed_data();
    a.valid = Optional(valid.typed_data(), valid.element_count());
    a.reset = Optional(reset.typed_data(), reset.element_count());
    a.mask = Optional(mask.typed_data(), mask.element_count());
    a.y = Data<float>(y);
    a.h = Data<float>(h_n);
    a.saved[0] = Data<float>(k_x);
    a.saved[1] = Data<float>(k_h);
    a.saved[2] = Data<float>(z);
    a.h_in = Data<float>(h_in);
    if (a.d.t == 0) {
      std::memcpy(a.h, a.h_0, a.d.b * a.d.f * sizeof(float));
      return;
    }
    RunForward(pool, a);
  });
}

ffi::Error LstmBackward(ffi::ThreadPool pool, In coefficients, In c_from_h,
                        In f_saved, In w_h, In mask, Mask valid, Mask reset,
                        In d_y, In d_c_n, In d_h_n, In d_c_steps, Out d_z,
                        Out d_c_0, Out d_h_0, Out d_reset_c, Out d_reset_h) {
  return Guarded([&] {
    const auto dims = d_y.dimensions();
    BackwardArgs a{};
    a.d = {dims[0], dims[1], w_h.dimensions()[0]};
    a.gates = 4;
    if (a.d.b == 0 || a.d.f == 0) return;
    a.saved[0] = coefficients.typed_data();
    a.saved[1] = c_from_h.typed_data();
    a.saved[2] = f_saved.typed_data();
    a.w_h = w_h.typed_data();
    a.mask = Optional(mask.typed_data(), mask.element_count());
    a.valid = Optional(valid.typed_data(), valid.element_count());
    a.reset = Optional(reset.typed_data(), reset.element_count());
    a.d_y = d_y.typed_data();
    a.d_c_n = d_c_n.typed_data();
    a.d_h_n = d_h_n.typed_data();
    a.d_c_steps = Optional(d_c_steps.typed_data(), d_c_steps.element_count());
    a.d_z = Data<float>(d_z);
    a.d_c = Data<float>(d_c_0);
    a.d_h = Data<float>(d_h_0);
    a.d_reset_c = Data<float>(d_reset_c);
    a.d_reset_h = Data<float>(d_reset_h);
    RunBackward(pool, a);
  });
}

ffi::Error GruBackward(ffi::ThreadPool pool, In k_x, In k_h, In z, In w_h,
                       In mask, Mask valid, Mask reset, In d_y, In d_h_n,
                       Out d_gx, Out d_gh, Out d_h_0, Out d_reset_h) {
  return Guarded([&] {
    const auto dims = d_y.dimensions();
    BackwardArgs a{};
    a.d = {dims[0], dims[1], w_h.dimensions()[0]};
    a.gates = 3;
    if (a.d.b == 0 || a.d.f == 0) return;
    a.saved[0] = k_x.typed_data();
    a.saved[1] = k_h.typed_data();
    a.saved[2] = z.typed_data();
    a.w_h = w_h.typed_data();
    a.mask = Optional(mask.typed_data(), mask.element_count());
    a.valid = Optional(valid.typed_data(), valid.element_count());
    a.reset = Optional(reset.typed_data(), reset.element_count());
    a.d_y = d_y.typed_data();
    a.d_h_n = d_h_n.typed_data();
    a.d_z = Data<float>(d_gx);
    a.d_gh = Data<float>(d_gh);
    a.d_h = Data<float>(d_h_0);
    a.d_reset_h = Data<float>(d_reset_h);
    RunBackward(pool, a);
  });
}

}  // namespace

// Declared first to give the handlers default visibility.
extern "C" {
HK_RNN_EXPORT XLA_FFI_Error* HkRnnCpuLstmForward(XLA_FFI_CallFrame* frame);
HK_RNN_EXPORT XLA_FFI_Error* HkRnnCpuLstmBackward(XLA_FFI_CallFrame* frame);
HK_RNN_EXPORT XLA_FFI_Error* HkRnnCpuGruForward(XLA_FFI_CallFrame* frame);
HK_RNN_EXPORT XLA_FFI_Error* HkRnnCpuGruBackward(XLA_FFI_CallFrame* frame);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HkRnnCpuLstmForward, LstmForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()    // gx
                                  .Arg<In>()    // w_h
                                  .Arg<In>()    // b
                                  .Arg<In>()    // c_0
                                  .Arg<In>()    // h_0
                                  .Arg<In>()    // reset_c
                                  .Arg<In>()    // reset_h
                                  .Arg<Mask>()  // valid
                                  .Arg<Mask>()  // reset
                                  .Arg<In>()    // mask
                                  .Ret<In>()    // y
                                  .Ret<In>()    // c_n
                                  .Ret<In>()    // h_n
                                  .Ret<In>()    // c_steps
                                  .Ret<In>()    // coefficients
                                  .Ret<In>()    // c_from_h
                                  .Ret<In>()    // f
                                  .Ret<In>());  // h_in

XLA_FFI_DEFINE_HANDLER_SYMBOL(HkRnnCpuGruForward, GruForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()    // gx
                                  .Arg<In>()    // w_h
                                  .Arg<In>()    // b_i
                                  .Arg<In>()    // b_h
                                  .Arg<In>()    // h_0
                                  .Arg<In>()    // reset_h
                                  .Arg<Mask>()  // valid
                                  .Arg<Mask>()  // reset
                                  .Arg<In>()    // mask
                                  .Ret<In>()    // y
                                  .Ret<In>()    // h_n
                                  .Ret<In>()    // k_x
                                  .Ret<In>()    // k_h
                                  .Ret<In>()    // z
                                  .Ret<In>());  // h_in

XLA_FFI_DEFINE_HANDLER_SYMBOL(HkRnnCpuLstmBackward, LstmBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()    // coefficients
                                  .Arg<In>()    // c_from_h
                                  .Arg<In>()    // f
                                  .Arg<In>()    // w_h
                                  .Arg<In>()    // mask
                                  .Arg<Mask>()  // valid
                                  .Arg<Mask>()  // reset
                                  .Arg<In>()    // d_y
                                  .Arg<In>()    // d_c_n
                                  .Arg<In>()    // d_h_n
                                  .Arg<In>()    // d_c_steps
                                  .Ret<In>()    // d_z
                                  .Ret<In>()    // d_c_0
                                  .Ret<In>()    // d_h_0
                                  .Ret<In>()    // d_reset_c
                                  .Ret<In>());  // d_reset_h

XLA_FFI_DEFINE_HANDLER_SYMBOL(HkRnnCpuGruBackward, GruBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()    // k_x
                                  .Arg<In>()    // k_h
                                  .Arg<In>()    // z
                                  .Arg<In>()    // w_h
                                  .Arg<In>()    // mask
                                  .Arg<Mask>()  // valid
                                  .Arg<Mask>()  // reset
                                  .Arg<In>()    // d_y
                                  .Arg<In>()    // d_h_n
                                  .Ret<In>()    // d_gx
                                  .Ret<In>()    // d_gh
                                  .Ret<In>()    // d_h_0
                                  .Ret<In>());  // d_reset_h

// 16 (AVX-512), 8 (AVX2 with FMA) or 0 (unsupported CPU): the SIMD width.
extern "C" HK_RNN_EXPORT int hk_rnn_cpu_lanes() {
  return Isa() == 0 ? 0 : Lanes();
}
