// Dense linear layer on the CPU with the bias and activation in the GEMM epilogue:
//   pre = x @ W + b        (W [K, N]; or x @ W^T with W [N, K] when trans_w)
//   out = act(pre)         (no activation: out = pre, and pre is not kept)
// x [T, K] row-major, T = every leading dimension flattened. GEMMs through a caller-given
// SgemmFn (oneDNN's dnnl_sgemm when Paddle loaded it, see cpu_gemm.h). Paddle-free.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "semoe/activation.h"
#include "semoe/cpu_gemm.h"
#include "semoe/grouped_ffn_cpu.h"
#include "semoe/parallel.h"

namespace semoe {

// Activation or none: the linear op also runs without one.
enum class LinearAct : int { kNone = -1, kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3 };

inline bool parse_linear_activation(const std::string& name, LinearAct* out) {
  if (name == "none" || name.empty()) { *out = LinearAct::kNone; return true; }
  Activation a;
  if (!parse_activation(name, &a)) return false;
  *out = static_cast<LinearAct>(static_cast<int>(a));
  return true;
}

// out[r, :] = act(pre[r, :]) over rows*cols elements (pre already holds the bias).
template <Activation A>
inline void act_rows_parallel(const float* pre, float* out, int64_t n) {
  parallel_for(n, 4096, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) out[i] = act_fwd<A>(pre[i]);
  });
}

// g[i] = grad_out[i] * act'(pre[i]).
template <Activation A>
inline void act_grad_parallel(const float* pre, const float* grad_out, float* g, int64_t n) {
  parallel_for(n, 4096, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) g[i] = grad_out[i] * act_fwd_grad<A>(pre[i]).d;
  });
}

// Forward. bias may be null. pre must hold T*N floats when A != none (it may alias out
// when A == none: then only out is written).
template <typename ActTag>
void linear_fwd_cpu(SgemmFn gemm, const float* x, const float* w, const float* bias, int64_t T,
                    int64_t K, int64_t N, bool trans_w, float* out, float* pre) {
  if (T == 0 || N == 0) return;
  constexpr LinearAct LA = ActTag::value;
  float* dst = LA == LinearAct::kNone ? out : pre;
  if (K == 0) {  // empty reduction: x @ W is zero
    if (bias != nullptr) broadcast_rows(dst, bias, T, N);
    else std::memset(dst, 0, sizeof(float) * T * N);
  } else {
    if (bias != nullptr) broadcast_rows(dst, bias, T, N);
    gemm(false, trans_w, T, N, K, 1.f, x, K, w, trans_w ? K : N, bias != nullptr ? 1.f : 0.f,
         dst, N);
  }
  if constexpr (LA != LinearAct::kNone) {
    act_rows_parallel<static_cast<Activation>(static_cast<int>(LA))>(pre, out, T * N);
  }
}

// Backward. grad_out [T, N]; pre [T, N] (only read when A != none). Writes grad_x [T, K],
// grad_w (W's shape) and grad_b [N] when not null. scratch_g: T*N floats when A != none;
// scratch_t: K*N floats when !trans_w (W transposed so dX is a plain NN GEMM).
template <typename ActTag>
void linear_bwd_cpu(SgemmFn gemm, const float* x, const float* w, const float* pre,
                    const float* grad_out, int64_t T, int64_t K, int64_t N, bool trans_w,
                    float* grad_x, float* grad_w, float* grad_b, float* scratch_g,
                    float* scratch_t) {
  constexpr LinearAct LA = ActTag::value;
  const float* g = grad_out;
  if constexpr (LA != LinearAct::kNone) {
    act_grad_parallel<static_cast<Activation>(static_cast<int>(LA))>(pre, grad_out, scratch_g,
                                                                      T * N);
    g = scratch_g;
  }
  if (T == 0 || N == 0 || K == 0) {
    if (grad_x != nullptr && T * K > 0) std::memset(grad_x, 0, sizeof(float) * T * K);
    if (K * N > 0) std::memset(grad_w, 0, sizeof(float) * K * N);
    if (grad_b != nullptr) {
      if (K == 0 && T > 0 && N > 0) column_sum(g, T, N, grad_b);
      else if (N > 0) std::memset(grad_b, 0, sizeof(float) * N);
    }
    return;
  }
#ifdef _OPENMP
  // Two threads: dX (T x K x N) and dW (K x N x T) have the same FLOPs, so each runs as a
  // single-threaded GEMM on its own thread, concurrently (oneDNN runs single-threaded inside a
  // parallel region), dX as the NT product straight on W (single-threaded, NT is as fast as NN
  // on a transposed copy) and db with dW. Deterministic: each product runs on one thread.
  if (grad_x != nullptr && omp_get_max_threads() == 2 && !omp_in_parallel()) {
#pragma omp parallel num_threads(2)
    {
      if (omp_get_thread_num() == 0) {
        gemm(false, !trans_w, T, K, N, 1.f, g, N, w, trans_w ? K : N, 0.f, grad_x, K);
      } else {
        if (trans_w) gemm(true, false, N, K, T, 1.f, g, N, x, K, 0.f, grad_w, K);
        else gemm(true, false, K, N, T, 1.f, x, K, g, N, 0.f, grad_w, N);
        if (grad_b != nullptr) column_sum(g, T, N, grad_b);
      }
    }
    return;
  }
#endif
  if (grad_x != nullptr) {
    if (trans_w) {  // W [N, K]: dX = g @ W
      gemm(false, false, T, K, N, 1.f, g, N, w, K, 0.f, grad_x, K);
    } else {        // W [K, N]: dX = g @ W^T, as NN against a transposed copy
      transpose(w, K, N, scratch_t);
      gemm(false, false, T, K, N, 1.f, g, N, scratch_t, K, 0.f, grad_x, K);
    }
  }
  if (trans_w) {  // dW [N, K] = g^T @ x
    gemm(true, false, N, K, T, 1.f, g, N, x, K, 0.f, grad_w, K);
  } else {        // dW [K, N] = x^T @ g
    gemm(true, false, K, N, T, 1.f, x, K, g, N, 0.f, grad_w, N);
  }
  if (grad_b != nullptr) column_sum(g, T, N, grad_b);
}

}  // namespace semoe
