// Grouped expert FFN on the CPU: for each expert e, over its contiguous block of rows
//   h = x_e @ w1[e] + b1[e];  a = act(h);  y_e = a @ w2[e] + b2[e]
// Rows are expert-major: expert e owns rows [off_e, off_e + counts[e]), off = prefix sum.
// Rows past sum(counts) produce zeros. Paddle-free; GEMMs through a caller-given SgemmFn.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "semoe/activation.h"
#include "semoe/cpu_gemm.h"
#include "semoe/parallel.h"

namespace semoe {

inline std::vector<int64_t> prefix_offsets(const int32_t* counts, int64_t E) {
  std::vector<int64_t> off(static_cast<size_t>(E) + 1, 0);
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

template <Activation A>
inline void bias_act_parallel(float* h, float* a, const float* bias, int64_t rows, int64_t cols) {
  parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
    bias_act_rows<A>(h + r0 * cols, a + r0 * cols, bias, r1 - r0, cols);
  });
}

inline void broadcast_rows(float* y, const float* bias, int64_t rows, int64_t cols) {
  parallel_for(rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(y + r * cols, bias, sizeof(float) * cols);
  });
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

// out[c, r] = a[r, c] for a [rows, cols] block, cache-blocked and parallel over column blocks.
inline void transpose(const float* a, int64_t rows, int64_t cols, float* out) {
  constexpr int64_t kB = 32;
  parallel_for((cols + kB - 1) / kB, 4, [&](int64_t cb0, int64_t cb1) {
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const int64_t c1 = cb * kB + kB < cols ? cb * kB + kB : cols;
      for (int64_t rb = 0; rb < rows; rb += kB) {
        const int64_t r1 = rb + kB < rows ? rb + kB : rows;
        for (int64_t c = cb * kB; c < c1; ++c)
          for (int64_t r = rb; r < r1; ++r) out[c * rows + r] = a[r * cols + c];
      }
    }
  });
}

// How the experts share the threads. With at least two non-empty experts per thread, each
// thread runs whole experts (largest first, taken dynamically) and every GEMM and element-wise
// pass inside runs on that one thread (oneDNN runs single-threaded inside a parallel region):
// no fork/join per GEMM and no small GEMM split in two. Otherwise (one expert: the dense FFN;
// few experts) the experts run in order and each GEMM uses every thread. Deterministic: the
// choice depends only on the counts and the thread count, and experts write disjoint outputs.
inline int expert_threads(const int32_t* counts, int64_t E) {
#ifdef _OPENMP
  const int t = omp_get_max_threads();
  if (t <= 1 || omp_in_parallel()) return 1;
  int64_t busy = 0;
  for (int64_t e = 0; e < E; ++e) busy += counts[e] > 0;
  return busy >= 2 * t ? t : 1;
#else
  (void)counts;
  (void)E;
  return 1;
#endif
}

// fn(e, thread) for every expert e; see expert_threads().
template <typename Fn>
inline void for_each_expert(const int32_t* counts, int64_t E, int threads, Fn&& fn) {
  if (threads <= 1) {
    for (int64_t e = 0; e < E; ++e) fn(e, 0);
    return;
  }
  std::vector<int64_t> order(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  // Work and scratch slots come from atomics, not from OpenMP work-sharing or thread numbers:
  // see parallel.h on the two OpenMP runtimes in a Paddle process.
  std::atomic<int64_t> next{0};
  std::atomic<int> slot{0};
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const int t = slot.fetch_add(1);
    if (t < threads)
      for (int64_t i = next.fetch_add(1); i < E; i = next.fetch_add(1)) fn(order[i], t);
  }
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

// Forward. hidden_pre[R_all, F] receives h (pre-activation) for the backward pass.
template <Activation A>
void grouped_ffn_fwd_cpu(SgemmFn gemm, const float* x, const int32_t* counts, const float* w1,
                         const float* b1, const float* w2, const float* b2, int64_t n_rows,
                         int64_t E, int64_t D, int64_t F, float* out, float* hidden_pre) {
  const std::vector<int64_t> off = prefix_offsets(counts, E);
  const int threads = expert_threads(counts, E);
  ThreadScratch act(threads, static_cast<size_t>(max_rows(counts, E) * F));
  for_each_expert(counts, E, threads, [&](int64_t e, int t) {
    const int64_t n = counts[e];
    if (n == 0) return;
    float* scratch = act.get(t);
    const float* xe = x + off[e] * D;
    float* he = hidden_pre + off[e] * F;
    float* ye = out + off[e] * D;
    gemm(false, false, n, F, D, 1.f, xe, D, w1 + e * D * F, F, 0.f, he, F);
    bias_act_parallel<A>(he, scratch, b1 + e * F, n, F);
    broadcast_rows(ye, b2 + e * D, n, D);
    gemm(false, false, n, D, F, 1.f, scratch, F, w2 + e * F * D, D, 1.f, ye, D);
  });
  const int64_t used = off[E];
  if (n_rows > used) {
    std::memset(out + used * D, 0, sizeof(float) * (n_rows - used) * D);
    std::memset(hidden_pre + used * F, 0, sizeof(float) * (n_rows - used) * F);
  }
}

// Backward. grad_out [R_all, D]. Writes grad_x [R_all, D] (zeros past the used rows) and
// all weight/bias grads (experts with no rows get zero grads). With multi-threaded GEMMs
// dX = dH @ w1^T runs as a plain NN GEMM on a transposed copy of w1[e] (oneDNN runs it ~30%
// faster than the NT form then); single-threaded, the NT form is as fast.
template <Activation A>
void grouped_ffn_bwd_cpu(SgemmFn gemm, const float* x, const int32_t* counts, const float* w1,
                         const float* w2, const float* hidden_pre, const float* grad_out,
                         int64_t n_rows, int64_t E, int64_t D, int64_t F, float* grad_x,
                         float* grad_w1, float* grad_b1, float* grad_w2, float* grad_b2) {
  const std::vector<int64_t> off = prefix_offsets(counts, E);
  const int threads = expert_threads(counts, E);
  const size_t rows_f = static_cast<size_t>(max_rows(counts, E) * F);
  ThreadScratch sa(threads, rows_f), sg(threads, rows_f), st(threads, static_cast<size_t>(D * F));
  for_each_expert(counts, E, threads, [&](int64_t e, int t) {
    const int64_t n = counts[e];
    float* gw1 = grad_w1 + e * D * F;
    float* gw2 = grad_w2 + e * F * D;
    if (n == 0) {
      std::memset(gw1, 0, sizeof(float) * D * F);
      std::memset(gw2, 0, sizeof(float) * F * D);
      std::memset(grad_b1 + e * F, 0, sizeof(float) * F);
      std::memset(grad_b2 + e * D, 0, sizeof(float) * D);
      return;
    }
    float* scratch_a = sa.get(t);
    float* scratch_g = sg.get(t);
    float* scratch_t = st.get(t);
    const float* xe = x + off[e] * D;
    const float* he = hidden_pre + off[e] * F;
    const float* gy = grad_out + off[e] * D;
    // dA = gy @ w2^T  -> scratch_g [n, F]
    gemm(false, true, n, F, D, 1.f, gy, D, w2 + e * F * D, D, 0.f, scratch_g, F);
    // a = act(h) -> scratch_a, dH = dA * act'(h) -> scratch_g (experts one per thread: with
    // db1 = colsum(dH) in the same pass)
    if (threads > 1) {
      std::memset(grad_b1 + e * F, 0, sizeof(float) * F);
      act_bwd_rows_colsum<A>(he, scratch_a, scratch_g, n, F, grad_b1 + e * F);
    } else {
      parallel_for(n, 16, [&](int64_t r0, int64_t r1) {
        act_bwd_rows<A>(he + r0 * F, scratch_a + r0 * F, scratch_g + r0 * F, (r1 - r0) * F);
      });
    }
    // dW2 = a^T @ gy; with F > D as the transpose of gy^T @ a [D, F] (oneDNN runs a tall-thin
    // [F, D] transposed-A product ~1.4x slower, measured single-threaded at D 512, F 2048, n
    // 1024; at F <= D the direct form is as fast); db2 = colsum(gy)
    if (F > D) {
      gemm(true, false, D, F, n, 1.f, gy, D, scratch_a, F, 0.f, scratch_t, F);
      transpose(scratch_t, D, F, gw2);
    } else {
      gemm(true, false, F, D, n, 1.f, scratch_a, F, gy, D, 0.f, gw2, D);
    }
    column_sum(gy, n, D, grad_b2 + e * D);
    // dW1 = x^T @ dH ; db1 = colsum(dH) (done above with experts one per thread) ; dX = dH @ w1^T
    gemm(true, false, D, F, n, 1.f, xe, D, scratch_g, F, 0.f, gw1, F);
    if (threads > 1) {  // single-threaded GEMMs: the NT form is as fast, no transposed copy
      gemm(false, true, n, D, F, 1.f, scratch_g, F, w1 + e * D * F, F, 0.f, grad_x + off[e] * D, D);
    } else {
      column_sum(scratch_g, n, F, grad_b1 + e * F);
      transpose(w1 + e * D * F, D, F, scratch_t);
      gemm(false, false, n, D, F, 1.f, scratch_g, F, scratch_t, D, 0.f, grad_x + off[e] * D, D);
    }
  });
  const int64_t used = off[E];
  if (n_rows > used) std::memset(grad_x + used * D, 0, sizeof(float) * (n_rows - used) * D);
}

}  // namespace semoe
