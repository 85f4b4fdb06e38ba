// Mean softmax cross-entropy over rows of logits, without a probability tensor:
//   lse[t]  = log sum_v exp(logits[t, v])
//   loss    = sum over counted rows (label != ignore_index) of (lse[t] - logits[t, label[t]])
//             divided by the number of counted rows (0 when none)
// Only lse [T] is kept; the backward rebuilds softmax from logits and lse:
//   grad_logits[t, v] = g / n * (exp(logits[t, v] - lse[t]) - [v == label[t]])  (0 for ignored rows)
// Deterministic: the loss is summed over fixed row blocks in block order. Paddle-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "semoe/activation.h"
#include "semoe/parallel.h"

namespace semoe {

// Returns the first row whose label is out of range (and not ignore_index), or -1.
inline int64_t softmax_ce_bad_label(const int64_t* labels, int64_t T, int64_t V,
                                    int64_t ignore_index) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t y = labels[t];
    if (y != ignore_index && (y < 0 || y >= V)) return t;
  }
  return -1;
}

// loss_out: one float; count_out: counted rows (as float, for the backward).
inline void softmax_ce_fwd_cpu(const float* logits, const int64_t* labels, int64_t T, int64_t V,
                               int64_t ignore_index, float* lse, float* loss_out,
                               float* count_out) {
  constexpr int64_t kBlock = 64;
  const int64_t nblocks = (T + kBlock - 1) / kBlock;
  std::vector<double> part(static_cast<size_t>(nblocks), 0.0);
  std::vector<int64_t> cnt(static_cast<size_t>(nblocks), 0);
  parallel_for(nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t_end = (blk + 1) * kBlock < T ? (blk + 1) * kBlock : T;
      double acc = 0.0;
      int64_t n = 0;
      for (int64_t t = blk * kBlock; t < t_end; ++t) {
        const float* z = logits + t * V;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t v = 0; v < V; ++v) m = z[v] > m ? z[v] : m;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t v = 0; v < V; ++v) sum += fast_exp(z[v] - m);
        const float l = m + std::log(sum);
        lse[t] = l;
        const int64_t y = labels[t];
        if (y != ignore_index) {
          acc += static_cast<double>(l - z[y]);
          ++n;
        }
      }
      part[blk] = acc;
      cnt[blk] = n;
    }
  });
  double total = 0.0;
  int64_t n = 0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    total += part[blk];
    n += cnt[blk];
  }
  *loss_out = n > 0 ? static_cast<float>(total / static_cast<double>(n)) : 0.f;
  *count_out = static_cast<float>(n);
}

inline void softmax_ce_bwd_cpu(const float* logits, const int64_t* labels, const float* lse,
                               float grad_loss, float count, int64_t T, int64_t V,
                               int64_t ignore_index, float* grad_logits) {
  const float g = count > 0.f ? grad_loss / count : 0.f;
  parallel_for(T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* z = logits + t * V;
      float* gz = grad_logits + t * V;
      const int64_t y = labels[t];
      if (y == ignore_index) {
        for (int64_t v = 0; v < V; ++v) gz[v] = 0.f;
        continue;
      }
      const float l = lse[t];
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) gz[v] = g * fast_exp(z[v] - l);
      gz[y] -= g;
    }
  });
}

}  // namespace semoe
