// LayerNorm over the last dimension, optionally fused with the residual add before it:
//   s = x + r            (r optional; s is the new residual stream)
//   out = (s - mean(s)) * rstd * gamma + beta,   rstd = 1 / sqrt(var(s) + eps)
// Rows [T, D] row-major float32; mean/rstd [T] are kept for the backward. Paddle-free.
// Deterministic: gamma/beta gradients are summed over fixed row blocks in block order.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "semoe/parallel.h"

namespace semoe {

// r and s may be null (no residual: s = x is not written).
inline void layernorm_fwd_cpu(const float* x, const float* r, const float* gamma,
                              const float* beta, int64_t T, int64_t D, float eps, float* out,
                              float* s, float* mean, float* rstd) {
  parallel_for(T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = x + t * D;
      const float* src = xr;
      if (r != nullptr) {
        const float* rr = r + t * D;
        float* sr = s + t * D;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) sr[c] = xr[c] + rr[c];
        src = sr;
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < D; ++c) sum += src[c];
      const float mu = sum / static_cast<float>(D);
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < D; ++c) sq += (src[c] - mu) * (src[c] - mu);
      const float rs = 1.0f / std::sqrt(sq / static_cast<float>(D) + eps);
      float* o = out + t * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) o[c] = (src[c] - mu) * rs * gamma[c] + beta[c];
      mean[t] = mu;
      rstd[t] = rs;
    }
  });
}

// Backward. s: the normalized input (x, or x + r). grad_s: optional upstream gradient of the
// residual output s (null: none). Writes grad_in [T, D] (the gradient of s, = of x and of r),
// grad_gamma [D], grad_beta [D], and the same gradient to grad_in2 [T, D] when not null (the
// residual's gradient of the fused add: written in the same pass, no second pass to copy it).
inline void layernorm_bwd_cpu(const float* s, const float* gamma, const float* mean,
                              const float* rstd, const float* grad_out, const float* grad_s,
                              int64_t T, int64_t D, float* grad_in, float* grad_gamma,
                              float* grad_beta, float* grad_in2 = nullptr) {
  constexpr int64_t kBlock = 64;
  const int64_t nblocks = (T + kBlock - 1) / kBlock;
  std::vector<float> pg(static_cast<size_t>(nblocks * D), 0.f), pb(static_cast<size_t>(nblocks * D), 0.f);
  parallel_for(nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> xhat(static_cast<size_t>(D)), dxhat(static_cast<size_t>(D));
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* g_acc = pg.data() + blk * D;
      float* b_acc = pb.data() + blk * D;
      const int64_t t_end = (blk + 1) * kBlock < T ? (blk + 1) * kBlock : T;
      for (int64_t t = blk * kBlock; t < t_end; ++t) {
        const float* sr = s + t * D;
        const float* gy = grad_out + t * D;
        const float mu = mean[t], rs = rstd[t];
        float m1 = 0.f, m2 = 0.f;
#pragma omp simd reduction(+ : m1, m2)
        for (int64_t c = 0; c < D; ++c) {
          const float xh = (sr[c] - mu) * rs;
          xhat[c] = xh;
          const float dxh = gy[c] * gamma[c];
          dxhat[c] = dxh;  // reused below: recomputing it could round differently (FMA)
          m1 += dxh;
          m2 += dxh * xh;
          g_acc[c] += gy[c] * xh;
          b_acc[c] += gy[c];
        }
        m1 /= static_cast<float>(D);
        m2 /= static_cast<float>(D);
        float* gi = grad_in + t * D;
        const float* gs = grad_s != nullptr ? grad_s + t * D : nullptr;
        if (gs != nullptr) {
#pragma omp simd
          for (int64_t c = 0; c < D; ++c)
            gi[c] = rs * (dxhat[c] - m1 - xhat[c] * m2) + gs[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) gi[c] = rs * (dxhat[c] - m1 - xhat[c] * m2);
        }
        if (grad_in2 != nullptr) std::memcpy(grad_in2 + t * D, gi, sizeof(float) * D);
      }
    }
  });
  for (int64_t c = 0; c < D; ++c) {
    grad_gamma[c] = 0.f;
    grad_beta[c] = 0.f;
  }
  for (int64_t blk = 0; blk < nblocks; ++blk)
    for (int64_t c = 0; c < D; ++c) {
      grad_gamma[c] += pg[blk * D + c];
      grad_beta[c] += pb[blk * D + c];
    }
}

}  // namespace semoe
