// Grouped expert FFN on the CPU: for each expert e, over its contiguous block of rows
//   h = x_e @ w1[e] + b1[e];  a = act(h);  y_e = a @ w2[e] + b2[e]
// Rows are expert-major: expert e owns rows [off_e, off_e + counts[e]), off = prefix sum.
// Rows past sum(counts) produce zeros. Paddle-free; GEMMs through a caller-given SgemmFn.
//
// Threading (FfnPlan below): every thread runs its tasks through the whole FFN, forward or
// backward, with single-threaded GEMMs (oneDNN runs single-threaded inside a parallel region):
// one fork/join per call instead of one per GEMM, and no small GEMM split in two.
//   many experts (>= 2 per thread): a task is a whole expert, largest first;
//   few experts (the dense FFN: one): a task is one of `threads` row slices of an expert; in
//     the backward each slice writes partial weight/bias gradients, summed in slice order.
// Tasks are taken from an atomic counter. Small inputs (few rows per thread) run the experts in
// order with every GEMM multi-threaded instead. Deterministic: the tasks and the order of every
// sum depend only on the counts, the shapes and the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "semoe/activation.h"
#include "semoe/cpu_gemm.h"
#include "semoe/parallel.h"

// GCC's -march=native on AVX-512 CPUs prefers 256-bit vectors; the element-wise passes below
// (bias + activation, activation gradient) run ~1.4x faster with 512-bit vectors (measured on
// Sapphire Rapids), computing the same values.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#define SEMOE_WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define SEMOE_WIDE_VECTORS
#endif

namespace semoe {

template <Activation A, typename T>
SEMOE_WIDE_VECTORS inline void wide_bias_act_rows(float* h, T* a, const float* bias,
                                                   int64_t rows, int64_t cols) {
  bias_act_rows<A>(h, a, bias, rows, cols);
}

template <Activation A, typename T>
SEMOE_WIDE_VECTORS inline void wide_act_bwd_rows_colsum(const float* h, T* a, const float* g,
                                                         T* gout, int64_t rows, int64_t cols,
                                                         float* colsum) {
  act_bwd_rows_colsum<A>(h, a, g, gout, rows, cols, colsum);
}

SEMOE_WIDE_VECTORS inline void wide_rows_to_bf16(const float* src, int64_t rows, int64_t cols,
                                                 int64_t ld, uint16_t* dst) {
  rows_to_bf16(src, rows, cols, ld, dst);
}

template <Activation A>
SEMOE_WIDE_VECTORS inline void wide_act_bwd_rows(const float* h, float* a, float* g, int64_t n) {
  act_bwd_rows<A>(h, a, g, n);
}

inline std::vector<int64_t> prefix_offsets(const int32_t* counts, int64_t E) {
  std::vector<int64_t> off(static_cast<size_t>(E) + 1, 0);
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

template <Activation A>
inline void bias_act_parallel(float* h, float* a, const float* bias, int64_t rows, int64_t cols) {
  parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
    wide_bias_act_rows<A>(h + r0 * cols, a + r0 * cols, bias, r1 - r0, cols);
  });
}

inline void broadcast_rows(float* y, const float* bias, int64_t rows, int64_t cols) {
  parallel_for(rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(y + r * cols, bias, sizeof(float) * cols);
  });
}

// y[r, c] += bias[c] over a [rows, cols] block, on the calling thread (inside a task).
inline void add_bias_rows(float* y, const float* bias, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) yr[c] += bias[c];
  }
}

// out[c] = sum_r g[r, c] for a [rows, cols] block (deterministic: fixed order per column).
inline void column_sum(const float* g, int64_t rows, int64_t cols, float* out) {
  parallel_for(cols, 64, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<float> acc(static_cast<size_t>(w), 0.f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* gr = g + r * cols + c0;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) acc[c] += gr[c];
    }
    std::memcpy(out + c0, acc.data(), sizeof(float) * w);
  });
}

#ifdef __AVX512F__
// out[c, r] = a[r, c] for one 16 x 16 tile in registers: 32-bit and 64-bit interleaves build
// each 4 x 4 sub-block, two 128-bit lane shuffles put the sub-blocks in place. Every store is
// a whole 64-byte row of the output (the 8 x 8 form stores half lines).
inline void transpose16x16(const float* a, int64_t lda, float* out, int64_t ldo) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(a + i * lda);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + j]: column 4L + j of rows i..i+3 in 128-bit lane L
    const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]),
                  t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    _mm512_storeu_ps(out + j * ldo, _mm512_shuffle_f32x4(v0, v2, 0x88));
    _mm512_storeu_ps(out + (4 + j) * ldo, _mm512_shuffle_f32x4(v1, v3, 0x88));
    _mm512_storeu_ps(out + (8 + j) * ldo, _mm512_shuffle_f32x4(v0, v2, 0xDD));
    _mm512_storeu_ps(out + (12 + j) * ldo, _mm512_shuffle_f32x4(v1, v3, 0xDD));
  }
}
#endif

// out[c, r] = a[r, c] for a [rows, cols] block (row strides: lda for a, ldo for out) on the
// calling thread: 16 x 16 tiles (AVX-512), then 8 x 8 tiles (AVX), scalar edges.
inline void transpose_serial(const float* a, int64_t rows, int64_t cols, int64_t lda, float* out,
                             int64_t ldo) {
  int64_t r = 0;
#ifdef __AVX512F__
  for (; r + 16 <= rows; r += 16) {
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) transpose16x16(a + r * lda + c, lda, out + c * ldo + r, ldo);
    for (; c < cols; ++c)
      for (int64_t i = r; i < r + 16; ++i) out[c * ldo + i] = a[i * lda + c];
  }
#endif
#ifdef __AVX__
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      const float* s = a + r * lda + c;
      __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lda),
             r2 = _mm256_loadu_ps(s + 2 * lda), r3 = _mm256_loadu_ps(s + 3 * lda),
             r4 = _mm256_loadu_ps(s + 4 * lda), r5 = _mm256_loadu_ps(s + 5 * lda),
             r6 = _mm256_loadu_ps(s + 6 * lda), r7 = _mm256_loadu_ps(s + 7 * lda);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                   t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                   t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                   u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                   u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                   u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
      r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
      r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
      r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
      r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
      r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
      r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
      r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
      float* o = out + c * ldo + r;
      _mm256_storeu_ps(o, r0);
      _mm256_storeu_ps(o + ldo, r1);
      _mm256_storeu_ps(o + 2 * ldo, r2);
      _mm256_storeu_ps(o + 3 * ldo, r3);
      _mm256_storeu_ps(o + 4 * ldo, r4);
      _mm256_storeu_ps(o + 5 * ldo, r5);
      _mm256_storeu_ps(o + 6 * ldo, r6);
      _mm256_storeu_ps(o + 7 * ldo, r7);
    }
    for (; c < cols; ++c)
      for (int64_t i = r; i < r + 8; ++i) out[c * ldo + i] = a[i * lda + c];
  }
#endif
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c * ldo + r] = a[r * lda + c];
}

// out[c, r] = a[r, c] for a dense [rows, cols] block, parallel over 64-column strips.
inline void transpose(const float* a, int64_t rows, int64_t cols, float* out) {
  constexpr int64_t kB = 64;
  parallel_for((cols + kB - 1) / kB, 2, [&](int64_t cb0, int64_t cb1) {
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const int64_t c0 = cb * kB, w = cols - c0 < kB ? cols - c0 : kB;
      for (int64_t r0 = 0; r0 < rows; r0 += kB)
        transpose_serial(a + r0 * cols + c0, rows - r0 < kB ? rows - r0 : kB, w, cols,
                         out + c0 * rows + r0, rows);
    }
  });
}

inline int64_t max_rows(const int32_t* counts, int64_t E) {
  int64_t m = 0;
  for (int64_t e = 0; e < E; ++e) m = counts[e] > m ? counts[e] : m;
  return m;
}

// Uninitialized float buffers, `per` floats for each of `threads` threads.
struct ThreadScratch {
  ThreadScratch(int threads, size_t per) : per_(per), buf_(new float[per * threads]) {}
  float* get(int thread) { return buf_.get() + per_ * thread; }

 private:
  size_t per_;
  std::unique_ptr<float[]> buf_;
};

// Threads this call may use: 1 inside a parallel region (the caller already split the work)
// or without OpenMP.
inline int ffn_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

// Below this many rows per thread the work is not split by rows: each thread would read every
// weight for little work (decode-sized batches, memory-bound), so the GEMMs are split instead.
constexpr int64_t kMinRowsPerThread = 64;

// Most memory the backward's per-slice partial weight gradients may take.
constexpr double kMaxPartialBytes = 512.0 * 1024 * 1024;

// fn(task, slot) for task in [0, tasks) on `threads` threads; each task runs once, on one
// thread, taken from an atomic counter; slot < threads is the worker's scratch index. Work and
// slots come from atomics, not from OpenMP work-sharing or thread numbers: see parallel.h on
// the two OpenMP runtimes in a Paddle process.
template <typename Fn>
inline void run_tasks(int64_t tasks, int threads, Fn&& fn) {
  if (threads <= 1 || tasks <= 1) {
    for (int64_t i = 0; i < tasks; ++i) fn(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<int> slot{0};
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const int t = slot.fetch_add(1);
    if (t < threads)
      for (int64_t i = next.fetch_add(1); i < tasks; i = next.fetch_add(1)) fn(i, t);
  }
}

// How one call splits its work (see the top of this file).
struct FfnPlan {
  enum Mode { kSerialTasks, kParallelTasks, kSerialExperts } mode;
  int threads;                 // threads of the parallel region (1 for kSerialTasks)
  std::vector<int64_t> busy;   // non-empty experts, most rows first (ties: lower index)
  int64_t slices;              // row slices per busy expert; task i -> (busy[i / slices], i % slices)
  std::vector<int64_t> off;    // row offsets, off[e] = sum(counts[:e])

  int64_t tasks() const { return static_cast<int64_t>(busy.size()) * slices; }
  // rows [r0, r1) of task i, absolute (expert-major) row indices; e receives its expert
  void rows(const int32_t* counts, int64_t i, int64_t* e, int64_t* r0, int64_t* r1) const {
    *e = busy[i / slices];
    const int64_t n = counts[*e], q = (n + slices - 1) / slices, s = i % slices;
    const int64_t b = std::min(n, s * q);
    *r0 = off[*e] + b;
    *r1 = off[*e] + std::min(n, b + q);
  }
};

// partial_floats: per-slice partial-gradient floats (0 in the forward); slices stay 1 when
// their partials would pass kMaxPartialBytes.
inline FfnPlan plan_ffn(const int32_t* counts, int64_t E, int64_t partial_floats) {
  FfnPlan p;
  p.off = prefix_offsets(counts, E);
  for (int64_t e = 0; e < E; ++e)
    if (counts[e] > 0) p.busy.push_back(e);
  std::stable_sort(p.busy.begin(), p.busy.end(),
                   [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  const int threads = ffn_threads();
  const int64_t nb = static_cast<int64_t>(p.busy.size());
  p.threads = threads;
  p.slices = 1;
  if (threads <= 1) {
    p.mode = FfnPlan::kSerialTasks;
    p.threads = 1;
  } else if (p.off[E] < threads * kMinRowsPerThread) {
    p.mode = FfnPlan::kSerialExperts;
  } else if (nb >= 2 * threads) {
    p.mode = FfnPlan::kParallelTasks;
  } else if (4.0 * partial_floats * nb * threads <= kMaxPartialBytes) {
    p.mode = FfnPlan::kParallelTasks;
    p.slices = threads;
  } else {
    p.mode = nb >= threads ? FfnPlan::kParallelTasks : FfnPlan::kSerialExperts;
  }
  return p;
}

// One thread's forward over n rows of one expert, GEMMs single-threaded: h = x @ w1 (beta 0),
// a = act(h + b1) (h keeps the bias), y = a @ w2 (beta 0), y += b2. Whole-n GEMMs: running
// them on row blocks (to keep each block of a in cache for GEMM2) measured no faster at
// these shapes. scratch: n * F floats.
template <Activation A>
inline void ffn_fwd_rows(SgemmFn gemm, const float* x, const float* w1, const float* b1,
                         const float* w2, const float* b2, int64_t n, int64_t D, int64_t F,
                         float* y, float* h, float* scratch) {
  gemm(false, false, n, F, D, 1.f, x, D, w1, F, 0.f, h, F);
  wide_bias_act_rows<A>(h, scratch, b1, n, F);
  gemm(false, false, n, D, F, 1.f, scratch, F, w2, D, 0.f, y, D);
  add_bias_rows(y, b2, n, D);
}

// Where dW2 = a^T @ gy goes: with F > D and D <= 512 it is computed as its transpose gy^T @ a
// [D, F], then transposed (oneDNN runs the tall-thin [F, D] transposed-A product ~1.3x slower,
// measured single-threaded at D 512, F 2048, n 1024; at F <= D the direct form is as fast). From
// D 768 on the direct form wins, transpose included: 0.68-0.80x the time at D 768 / 1024 / 2048
// with F = 4D, n 512 / 1024.
inline bool dw2_transposed(int64_t D, int64_t F) { return F > D && D <= 512; }

// One thread's backward over n rows of one expert, all GEMMs single-threaded:
// dA = gy @ w2^T; a = act(h), dH = dA * act'(h) and db1 = colsum(dH) in one pass;
// dX = dH @ w1^T; dW2 (layout of dw2_transposed: [D, F] or [F, D]); dW1 = x^T @ dH;
// db2 = colsum(gy). Whole-n GEMMs: splitting them in row blocks measured slower. sa, sg: n * F.
template <Activation A>
inline void ffn_bwd_rows(SgemmFn gemm, const float* x, const float* w1, const float* w2,
                         const float* h, const float* gy, int64_t n, int64_t D, int64_t F,
                         float* gx, float* gw1, float* gw2_layout, float* gb1, float* gb2,
                         float* sa, float* sg) {
  std::memset(gb1, 0, sizeof(float) * F);
  gemm(false, true, n, F, D, 1.f, gy, D, w2, D, 0.f, sg, F);
  wide_act_bwd_rows_colsum<A>(h, sa, sg, sg, n, F, gb1);
  gemm(false, true, n, D, F, 1.f, sg, F, w1, F, 0.f, gx, D);
  if (dw2_transposed(D, F))
    gemm(true, false, D, F, n, 1.f, gy, D, sa, F, 0.f, gw2_layout, F);
  else
    gemm(true, false, F, D, n, 1.f, sa, F, gy, D, 0.f, gw2_layout, D);
  gemm(true, false, D, F, n, 1.f, x, D, sg, F, 0.f, gw1, F);
  column_sum(gy, n, D, gb2);
}

// The bf16 operand mode (bf16_operand_gemm(gemm) set): each task converts an operand to bf16
// once and hands bf16 to oneDNN's bf16 GEMM, instead of `gemm` converting both operands inside
// every call (which converted dY, dH and x twice per expert and the activation in a pass of
// its own). The activation passes write their GEMM operands (act(h), dL/dh) as bf16 directly;
// h, the GEMM outputs and every gradient stay float32. Same rounding (to_bf16) of the same
// float32 values as the per-call conversion, so the same results.
struct Bf16Task {
  std::vector<uint16_t> x, w, a, g, gy;  // grown on demand, reused across a thread's tasks
  static uint16_t* fit(std::vector<uint16_t>& v, int64_t n) {
    if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
    return v.data();
  }
};

// ffn_fwd_rows with bf16 GEMM operands; bg = bf16_operand_gemm(gemm).
template <Activation A>
inline void ffn_fwd_rows_bf16(detail::DnnlGemmBf16 bg, const float* x, const float* w1,
                              const float* b1, const float* w2, const float* b2, int64_t n,
                              int64_t D, int64_t F, float* y, float* h, Bf16Task& s) {
  uint16_t* xb = Bf16Task::fit(s.x, n * D);
  uint16_t* wb = Bf16Task::fit(s.w, D * F);
  uint16_t* ab = Bf16Task::fit(s.a, n * F);
  wide_rows_to_bf16(x, n, D, D, xb);
  wide_rows_to_bf16(w1, D, F, F, wb);
  bg('N', 'N', n, F, D, 1.f, xb, D, wb, F, 0.f, h, F);
  wide_bias_act_rows<A>(h, ab, b1, n, F);
  wide_rows_to_bf16(w2, F, D, D, wb);
  bg('N', 'N', n, D, F, 1.f, ab, F, wb, D, 0.f, y, D);
  add_bias_rows(y, b2, n, D);
}

// ffn_bwd_rows with bf16 GEMM operands: dY, x, w1 and w2 converted once each; the activation
// pass reads dA (float32, sg) and writes act(h) and dL/dh as bf16. sg: n * F floats. dW2 is
// always computed directly as act^T dY into gw2 [F, D]: in bf16 that form takes 4.5 ms
// against 4.2 ms + a 0.8 ms transpose for dY^T act (D 512, F 2048, 1024 rows, one thread).
template <Activation A>
inline void ffn_bwd_rows_bf16(detail::DnnlGemmBf16 bg, const float* x, const float* w1,
                              const float* w2, const float* h, const float* gy, int64_t n,
                              int64_t D, int64_t F, float* gx, float* gw1, float* gw2,
                              float* gb1, float* gb2, float* sg, Bf16Task& s) {
  uint16_t* gyb = Bf16Task::fit(s.gy, n * D);
  uint16_t* wb = Bf16Task::fit(s.w, D * F);
  uint16_t* ab = Bf16Task::fit(s.a, n * F);
  uint16_t* gb = Bf16Task::fit(s.g, n * F);
  uint16_t* xb = Bf16Task::fit(s.x, n * D);
  std::memset(gb1, 0, sizeof(float) * F);
  wide_rows_to_bf16(gy, n, D, D, gyb);
  wide_rows_to_bf16(w2, F, D, D, wb);
  bg('N', 'T', n, F, D, 1.f, gyb, D, wb, D, 0.f, sg, F);
  wide_act_bwd_rows_colsum<A>(h, ab, sg, gb, n, F, gb1);
  wide_rows_to_bf16(w1, D, F, F, wb);
  bg('N', 'T', n, D, F, 1.f, gb, F, wb, F, 0.f, gx, D);
  bg('T', 'N', F, D, n, 1.f, ab, F, gyb, D, 0.f, gw2, D);
  wide_rows_to_bf16(x, n, D, D, xb);
  bg('T', 'N', D, F, n, 1.f, xb, D, gb, F, 0.f, gw1, F);
  column_sum(gy, n, D, gb2);
}

// Forward. hidden_pre[R_all, F] receives h (pre-activation) for the backward pass.
template <Activation A>
void grouped_ffn_fwd_cpu(SgemmFn gemm, const float* x, const int32_t* counts, const float* w1,
                         const float* b1, const float* w2, const float* b2, int64_t n_rows,
                         int64_t E, int64_t D, int64_t F, float* out, float* hidden_pre) {
  const FfnPlan plan = plan_ffn(counts, E, 0);
  const std::vector<int64_t>& off = plan.off;
  const int64_t used = off[E];
  if (plan.mode != FfnPlan::kSerialExperts) {
    const int64_t rows = (max_rows(counts, E) + plan.slices - 1) / plan.slices;
    const detail::DnnlGemmBf16 bg = bf16_operand_gemm(gemm);
    ThreadScratch act(bg != nullptr ? 0 : plan.threads, static_cast<size_t>(rows * F));
    std::vector<Bf16Task> bf(bg != nullptr ? static_cast<size_t>(plan.threads) : 0);
    run_tasks(plan.tasks(), plan.threads, [&](int64_t i, int t) {
      int64_t e, r0, r1;
      plan.rows(counts, i, &e, &r0, &r1);
      if (r1 <= r0) return;
      if (bg != nullptr)
        ffn_fwd_rows_bf16<A>(bg, x + r0 * D, w1 + e * D * F, b1 + e * F, w2 + e * F * D,
                             b2 + e * D, r1 - r0, D, F, out + r0 * D, hidden_pre + r0 * F, bf[t]);
      else
        ffn_fwd_rows<A>(gemm, x + r0 * D, w1 + e * D * F, b1 + e * F, w2 + e * F * D, b2 + e * D,
                        r1 - r0, D, F, out + r0 * D, hidden_pre + r0 * F, act.get(t));
    });
  } else {
    // serial experts; GEMMs and element-wise passes use every thread
    ThreadScratch act(1, static_cast<size_t>(max_rows(counts, E) * F));
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = counts[e];
      if (n == 0) continue;
      const float* xe = x + off[e] * D;
      float* he = hidden_pre + off[e] * F;
      float* ye = out + off[e] * D;
      gemm(false, false, n, F, D, 1.f, xe, D, w1 + e * D * F, F, 0.f, he, F);
      bias_act_parallel<A>(he, act.get(0), b1 + e * F, n, F);
      broadcast_rows(ye, b2 + e * D, n, D);
      gemm(false, false, n, D, F, 1.f, act.get(0), F, w2 + e * F * D, D, 1.f, ye, D);
    }
  }
  if (n_rows > used) {
    std::memset(out + used * D, 0, sizeof(float) * (n_rows - used) * D);
    std::memset(hidden_pre + used * F, 0, sizeof(float) * (n_rows - used) * F);
  }
}

// Backward. grad_out [R_all, D]. Writes grad_x [R_all, D] (zeros past the used rows) and
// all weight/bias grads (experts with no rows get zero grads).
template <Activation A>
void grouped_ffn_bwd_cpu(SgemmFn gemm, const float* x, const int32_t* counts, const float* w1,
                         const float* w2, const float* hidden_pre, const float* grad_out,
                         int64_t n_rows, int64_t E, int64_t D, int64_t F, float* grad_x,
                         float* grad_w1, float* grad_b1, float* grad_w2, float* grad_b2) {
  const size_t per_part = static_cast<size_t>(2 * D * F + F + D);  // dW1, dW2, db1, db2
  const FfnPlan plan = plan_ffn(counts, E, static_cast<int64_t>(per_part));
  const std::vector<int64_t>& off = plan.off;
  const std::vector<int64_t>& busy = plan.busy;
  const int64_t used = off[E], nb = static_cast<int64_t>(busy.size()), slices = plan.slices;
  const detail::DnnlGemmBf16 bg =
      plan.mode == FfnPlan::kSerialExperts ? nullptr : bf16_operand_gemm(gemm);
  std::vector<Bf16Task> bf(bg != nullptr ? static_cast<size_t>(plan.threads) : 0);
  const bool tr = bg == nullptr && dw2_transposed(D, F);  // dW2's layout (ffn_bwd_rows*)
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] == 0) {
      std::memset(grad_w1 + e * D * F, 0, sizeof(float) * D * F);
      std::memset(grad_w2 + e * F * D, 0, sizeof(float) * F * D);
      std::memset(grad_b1 + e * F, 0, sizeof(float) * F);
      std::memset(grad_b2 + e * D, 0, sizeof(float) * D);
    }
  }
  if (plan.mode != FfnPlan::kSerialExperts && slices == 1) {
    // whole experts: gradients straight into the outputs
    const size_t rows_f = static_cast<size_t>(max_rows(counts, E) * F);
    ThreadScratch sa(bg != nullptr ? 0 : plan.threads, rows_f), sg(plan.threads, rows_f);
    ThreadScratch st(plan.threads, tr ? static_cast<size_t>(D * F) : 0);
    run_tasks(plan.tasks(), plan.threads, [&](int64_t i, int t) {
      const int64_t e = busy[i], n = counts[e];
      float* gw2 = grad_w2 + e * F * D;
      if (bg != nullptr)
        ffn_bwd_rows_bf16<A>(bg, x + off[e] * D, w1 + e * D * F, w2 + e * F * D,
                             hidden_pre + off[e] * F, grad_out + off[e] * D, n, D, F,
                             grad_x + off[e] * D, grad_w1 + e * D * F, gw2, grad_b1 + e * F,
                             grad_b2 + e * D, sg.get(t), bf[t]);
      else
        ffn_bwd_rows<A>(gemm, x + off[e] * D, w1 + e * D * F, w2 + e * F * D,
                        hidden_pre + off[e] * F, grad_out + off[e] * D, n, D, F,
                        grad_x + off[e] * D, grad_w1 + e * D * F, tr ? st.get(t) : gw2,
                        grad_b1 + e * F, grad_b2 + e * D, sa.get(t), sg.get(t));
      if (tr) transpose(st.get(t), D, F, gw2);
    });
  } else if (plan.mode != FfnPlan::kSerialExperts) {
    // row slices: task i writes partial gradients [dW1 | dW2 (layout of tr) | db1 | db2] to
    // part[i]; an expert's slices are the consecutive tasks busy-index * slices + s. The thread
    // that finishes an expert's last slice sums its slices, in slice order, into the outputs.
    std::unique_ptr<float[]> part(new float[per_part * plan.tasks()]);
    std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[nb]);
    for (int64_t i = 0; i < nb; ++i) done[i].store(0);
    const size_t rows_f = static_cast<size_t>((max_rows(counts, E) + slices - 1) / slices * F);
    ThreadScratch sa(bg != nullptr ? 0 : plan.threads, rows_f), sg(plan.threads, rows_f);
    run_tasks(plan.tasks(), plan.threads, [&](int64_t i, int t) {
      int64_t e, r0, r1;
      plan.rows(counts, i, &e, &r0, &r1);
      float* p = part.get() + per_part * i;
      if (r1 <= r0) {
        std::memset(p, 0, sizeof(float) * per_part);
      } else if (bg != nullptr) {
        ffn_bwd_rows_bf16<A>(bg, x + r0 * D, w1 + e * D * F, w2 + e * F * D,
                             hidden_pre + r0 * F, grad_out + r0 * D, r1 - r0, D, F,
                             grad_x + r0 * D, p, p + D * F, p + 2 * D * F, p + 2 * D * F + F,
                             sg.get(t), bf[t]);
      } else {
        ffn_bwd_rows<A>(gemm, x + r0 * D, w1 + e * D * F, w2 + e * F * D, hidden_pre + r0 * F,
                        grad_out + r0 * D, r1 - r0, D, F, grad_x + r0 * D, p, p + D * F,
                        p + 2 * D * F, p + 2 * D * F + F, sa.get(t), sg.get(t));
      }
      const int64_t b = i / slices;
      if (done[b].fetch_add(1, std::memory_order_acq_rel) != slices - 1) return;
      float* p0 = part.get() + per_part * (b * slices);
      for (int64_t s = 1; s < slices; ++s) {
        const float* ps = p0 + per_part * s;
#pragma omp simd
        for (size_t j = 0; j < per_part; ++j) p0[j] += ps[j];
      }
      std::memcpy(grad_w1 + e * D * F, p0, sizeof(float) * D * F);
      if (tr)
        transpose_serial(p0 + D * F, D, F, F, grad_w2 + e * F * D, D);
      else
        std::memcpy(grad_w2 + e * F * D, p0 + D * F, sizeof(float) * F * D);
      std::memcpy(grad_b1 + e * F, p0 + 2 * D * F, sizeof(float) * F);
      std::memcpy(grad_b2 + e * D, p0 + 2 * D * F + F, sizeof(float) * D);
    });
  } else {
    // serial experts; every GEMM and element-wise pass uses every thread (small inputs, or
    // already inside a parallel region)
    const size_t rows_f = static_cast<size_t>(max_rows(counts, E) * F);
    ThreadScratch sa(1, rows_f), sg(1, rows_f), st(1, static_cast<size_t>(D * F));
    for (int64_t e : busy) {
      const int64_t n = counts[e];
      float* scratch_a = sa.get(0);
      float* scratch_g = sg.get(0);
      float* scratch_t = st.get(0);
      const float* xe = x + off[e] * D;
      const float* he = hidden_pre + off[e] * F;
      const float* gy = grad_out + off[e] * D;
      float* gw1 = grad_w1 + e * D * F;
      float* gw2 = grad_w2 + e * F * D;
      gemm(false, true, n, F, D, 1.f, gy, D, w2 + e * F * D, D, 0.f, scratch_g, F);
      parallel_for(n, 16, [&](int64_t r0, int64_t r1) {
        wide_act_bwd_rows<A>(he + r0 * F, scratch_a + r0 * F, scratch_g + r0 * F, (r1 - r0) * F);
      });
      if (tr) {
        gemm(true, false, D, F, n, 1.f, gy, D, scratch_a, F, 0.f, scratch_t, F);
        transpose(scratch_t, D, F, gw2);
      } else {
        gemm(true, false, F, D, n, 1.f, scratch_a, F, gy, D, 0.f, gw2, D);
      }
      column_sum(gy, n, D, grad_b2 + e * D);
      gemm(true, false, D, F, n, 1.f, xe, D, scratch_g, F, 0.f, gw1, F);
      column_sum(scratch_g, n, F, grad_b1 + e * F);
      // dX = dH @ w1^T as a plain NN GEMM on a transposed copy of w1[e]: with multi-threaded
      // GEMMs oneDNN runs it ~30% faster than the NT form
      transpose(w1 + e * D * F, D, F, scratch_t);
      gemm(false, false, n, D, F, 1.f, scratch_g, F, scratch_t, D, 0.f, grad_x + off[e] * D, D);
    }
  }
  if (n_rows > used) std::memset(grad_x + used * D, 0, sizeof(float) * (n_rows - used) * D);
}

}  // namespace semoe
