// Multi-tensor AdamW on the CPU: one call updates every parameter of a list (float32), with a
// gradient scale (the clipping coefficient) folded in. Paddle-free. Same update as Paddle's
// adamw kernel (decoupled weight decay on the old parameter, bias correction folded into the
// learning rate and epsilon):
//   g   = grad * grad_scale
//   p'  = p - lr * wd * p                          (wd = 0 for parameters without decay)
//   m1  = b1 * m1 + (1 - b1) * g ;  m2 = b2 * m2 + (1 - b2) * g^2
//   p   = p' - lr_t * m1 / (sqrt(m2) + eps_t),  lr_t = lr sqrt(1 - b2^t) / (1 - b1^t),
//                                               eps_t = eps sqrt(1 - b2^t)
// where b1^t, b2^t are the tensor's running beta powers *before* this step (updated after).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace semoe {

struct AdamwTensor {
  float* param;
  const float* grad;
  float* m1;
  float* m2;
  int64_t n;
  float lr_t, eps_t, decay;  // per tensor: bias-corrected lr, epsilon, lr * weight decay
};

struct AdamwHyper {
  float beta1, beta2, grad_scale;
};

// Updates [begin, end) of one tensor.
inline void adamw_span(const AdamwTensor& t, const AdamwHyper& h, int64_t begin, int64_t end) {
  const float b1 = h.beta1, b2 = h.beta2, c1 = 1.0f - h.beta1, c2 = 1.0f - h.beta2;
  const float s = h.grad_scale, lr_t = t.lr_t, eps_t = t.eps_t, decay = t.decay;
  float* p = t.param;
  const float* g = t.grad;
  float* m1 = t.m1;
  float* m2 = t.m2;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i] * s;
    const float pt = p[i] - decay * p[i];
    const float a = b1 * m1[i] + c1 * gi;
    const float v = b2 * m2[i] + c2 * gi * gi;
    m1[i] = a;
    m2[i] = v;
    p[i] = pt - lr_t * (a / (std::sqrt(v) + eps_t));
  }
}

// Every tensor, split into chunks of at most `chunk` elements spread over the threads.
inline void adamw_multi_tensor(const std::vector<AdamwTensor>& ts, const AdamwHyper& h,
                               int64_t chunk = 1 << 14) {
  std::vector<std::pair<int64_t, int64_t>> work;  // (tensor, chunk start)
  for (size_t k = 0; k < ts.size(); ++k)
    for (int64_t b = 0; b < ts[k].n; b += chunk) work.emplace_back(static_cast<int64_t>(k), b);
  const int64_t nw = static_cast<int64_t>(work.size());
#pragma omp parallel for schedule(static) if (nw > 1)
  for (int64_t w = 0; w < nw; ++w) {
    const AdamwTensor& t = ts[static_cast<size_t>(work[w].first)];
    const int64_t b = work[w].second;
    adamw_span(t, h, b, b + chunk < t.n ? b + chunk : t.n);
  }
}

// out[k] = sum of squares of tensor k (float accumulation per 1024-element block, double over
// blocks: deterministic, independent of the thread count).
inline void squared_norms(const std::vector<const float*>& xs, const std::vector<int64_t>& ns,
                          double* out) {
  constexpr int64_t kBlock = 1024;
  std::vector<std::pair<int64_t, int64_t>> work;
  for (size_t k = 0; k < xs.size(); ++k)
    for (int64_t b = 0; b < ns[k]; b += kBlock) work.emplace_back(static_cast<int64_t>(k), b);
  const int64_t nw = static_cast<int64_t>(work.size());
  std::vector<double> part(static_cast<size_t>(nw));
#pragma omp parallel for schedule(static) if (nw > 64)
  for (int64_t w = 0; w < nw; ++w) {
    const int64_t k = work[w].first, b = work[w].second;
    const int64_t e = b + kBlock < ns[k] ? b + kBlock : ns[k];
    const float* x = xs[static_cast<size_t>(k)];
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) acc += x[i] * x[i];
    part[w] = acc;
  }
  for (size_t k = 0; k < xs.size(); ++k) out[k] = 0.0;
  for (int64_t w = 0; w < nw; ++w) out[work[w].first] += part[w];
}

}  // namespace semoe
