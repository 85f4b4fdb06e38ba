// CUDA launchers of combine (weighted un-permute of expert rows) and its gradient.
// Semantics: custom_ops/README.md and combine_cpu / combine_grad_cpu in semoe/routing_cpu.h.
//
// Both are one warp per token. A lane moves packs of VEC elements (16 bytes when the row
// length and pointers allow it) and keeps kUnroll packs per operand in flight. Accumulation is
// fp32 in a fixed order (j ascending per element; dot products lane-serial then butterfly).
#include <climits>

#include "common.cuh"

namespace semoe {
namespace cuda {
namespace detail {
namespace {

// out[t] = sum_j weights[t, j] * rows[pos[t, j]] over pos >= 0.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowBlock)
    combine_kernel(const T* __restrict__ rows, const float* __restrict__ weights,
                   const int32_t* __restrict__ pos, int64_t tokens, int K, int64_t D,
                   T* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + warp_id();
  if (t >= tokens) return;
  const int lane = lane_id();
  const int64_t np = D / VEC;
  const int32_t* pt = pos + t * K;
  const float* wt = weights + t * K;
  // Picks 0..31 live in lanes 0..31 and are broadcast by shuffles.
  const int my_pos = lane < K ? pt[lane] : -1;
  const float my_w = lane < K ? wt[lane] : 0.f;
  T* dst = out + t * D;
  for (int64_t base = 0; base < np; base += 32 * kUnroll) {  // warp-uniform trip count
    float acc[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[u][k] = 0.f;
    }
    for (int j = 0; j < K; ++j) {
      const int p = j < 32 ? __shfl_sync(kFullMask, my_pos, j) : pt[j];
      const float w = j < 32 ? __shfl_sync(kFullMask, my_w, j) : wt[j];
      if (p < 0) continue;
      const T* src = rows + static_cast<int64_t>(p) * D;
      Pack<T, VEC> r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        if (i < np) r[u] = load_pack<T, VEC>(src + i * VEC);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[u][k] += w * to_float(r[u].v[k]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < np) {
        Pack<T, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = from_float<T>(acc[u][k]);
        store_pack<T, VEC>(dst + i * VEC, o);
      }
    }
  }
}

// For every (t, j) with pos in [0, n_rows):
//   grad_rows[pos] = weights[t, j] * grad_out[t],  grad_weights[t, j] = <grad_out[t], rows[pos]>;
// grad_weights[t, j] = 0 otherwise. Rows no position refers to are written by other kernels.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowBlock)
    combine_grad_kernel(const T* __restrict__ rows, const float* __restrict__ weights,
                        const int32_t* __restrict__ pos, const T* __restrict__ grad_out,
                        int64_t tokens, int K, int64_t D, int64_t n_rows,
                        T* __restrict__ grad_rows, float* __restrict__ grad_weights) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + warp_id();
  if (t >= tokens) return;
  const int lane = lane_id();
  const int64_t np = D / VEC;
  const T* g_row = grad_out + t * D;
  for (int j = 0; j < K; ++j) {  // warp-uniform
    const int64_t a = t * K + j;
    const int p = pos[a];
    if (p < 0 || p >= n_rows) {
      if (lane == 0) grad_weights[a] = 0.f;
      continue;
    }
    const float w = weights[a];
    const T* r_row = rows + static_cast<int64_t>(p) * D;
    T* gr_row = grad_rows + static_cast<int64_t>(p) * D;
    float dot = 0.f;
    for (int64_t base = 0; base < np; base += 32 * kUnroll) {
      Pack<T, VEC> g[kUnroll], r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        if (i < np) {
          g[u] = load_pack<T, VEC>(g_row + i * VEC);
          r[u] = load_pack<T, VEC>(r_row + i * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        if (i < np) {
          Pack<T, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float gv = to_float(g[u].v[k]);
            dot += gv * to_float(r[u].v[k]);
            o.v[k] = from_float<T>(w * gv);
          }
          store_pack<T, VEC>(gr_row + i * VEC, o);
        }
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) grad_weights[a] = dot;
  }
}

// owner[pos[a]] = a for every valid position (owner preset to -1). Positions are unique, so
// each slot is written at most once: no race, no atomics.
__global__ void mark_rows_kernel(const int32_t* __restrict__ pos, int64_t n_assign,
                                 int64_t n_rows, int32_t* __restrict__ owner) {
  const int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= n_assign) return;
  const int p = pos[a];
  if (p >= 0 && p < n_rows) owner[p] = static_cast<int32_t>(a);
}

// grad_rows[r] = 0 for every row r with owner[r] < 0 (one warp per row).
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowBlock)
    zero_unowned_rows_kernel(const int32_t* __restrict__ owner, int64_t n_rows, int64_t D,
                             T* __restrict__ grad_rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + warp_id();
  if (r >= n_rows || owner[r] >= 0) return;
  Pack<T, VEC> z;
#pragma unroll
  for (int k = 0; k < VEC; ++k) z.v[k] = from_float<T>(0.f);
  T* row = grad_rows + r * D;
  for (int64_t i = lane_id(); i < D / VEC; i += 32) store_pack<T, VEC>(row + i * VEC, z);
}

template <typename T>
cudaError_t launch_combine(const void* rows, const float* weights, const int32_t* pos,
                           int64_t tokens, int K, int64_t D, void* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(tokens, kWarpsPerRowBlock)));
  const T* r = static_cast<const T*>(rows);
  T* o = static_cast<T*>(out);
  if (can_vectorize<T>(D, {rows, out})) {
    combine_kernel<T, vec16<T>()><<<grid, kRowBlock, 0, stream>>>(r, weights, pos, tokens, K, D, o);
  } else {
    combine_kernel<T, 1><<<grid, kRowBlock, 0, stream>>>(r, weights, pos, tokens, K, D, o);
  }
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_combine_grad_vec(const T* rows, const float* weights, const int32_t* pos,
                                    const T* grad_out, int64_t tokens, int K, int64_t D,
                                    int64_t n_rows, T* grad_rows, float* grad_weights,
                                    int32_t* owner, cudaStream_t stream) {
  const int64_t n_assign = tokens * K;
  if (owner != nullptr) {
    // Mark the rows some position refers to; zero the others.
    SEMOE_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(owner, 0xff, sizeof(int32_t) * static_cast<size_t>(n_rows), stream));
    if (n_assign > 0) {
      mark_rows_kernel<<<static_cast<unsigned>(ceil_div(n_assign, 256)), 256, 0, stream>>>(
          pos, n_assign, n_rows, owner);
      SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    }
    zero_unowned_rows_kernel<T, VEC>
        <<<static_cast<unsigned>(ceil_div(n_rows, kWarpsPerRowBlock)), kRowBlock, 0, stream>>>(
            owner, n_rows, D, grad_rows);
    SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  } else {
    // No workspace: zero every row first (one extra write of grad_rows).
    SEMOE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
        grad_rows, 0, sizeof(T) * static_cast<size_t>(n_rows) * static_cast<size_t>(D), stream));
  }
  if (tokens > 0) {
    combine_grad_kernel<T, VEC>
        <<<static_cast<unsigned>(ceil_div(tokens, kWarpsPerRowBlock)), kRowBlock, 0, stream>>>(
            rows, weights, pos, grad_out, tokens, K, D, n_rows, grad_rows, grad_weights);
    SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_combine_grad(const void* rows, const float* weights, const int32_t* pos,
                                const void* grad_out, int64_t tokens, int K, int64_t D,
                                int64_t n_rows, void* grad_rows, float* grad_weights,
                                int32_t* owner, cudaStream_t stream) {
  const T* r = static_cast<const T*>(rows);
  const T* g = static_cast<const T*>(grad_out);
  T* gr = static_cast<T*>(grad_rows);
  if (can_vectorize<T>(D, {rows, grad_out, grad_rows})) {
    return launch_combine_grad_vec<T, vec16<T>()>(r, weights, pos, g, tokens, K, D, n_rows, gr,
                                                  grad_weights, owner, stream);
  }
  return launch_combine_grad_vec<T, 1>(r, weights, pos, g, tokens, K, D, n_rows, gr,
                                       grad_weights, owner, stream);
}

}  // namespace
}  // namespace detail

// ================================================================== launchers
cudaError_t combine(const void* rows, DType dtype, const float* weights, const int32_t* pos,
                    int64_t tokens, int64_t top_k, int64_t hidden, void* out,
                    cudaStream_t stream) {
  using namespace detail;
  if (tokens < 0 || top_k < 0 || top_k > INT_MAX || hidden < 0) return cudaErrorInvalidValue;
  if (tokens == 0 || hidden == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    return launch_combine<Elem>(rows, weights, pos, tokens, static_cast<int>(top_k), hidden, out,
                                stream);
  });
}

size_t combine_grad_workspace_bytes(int64_t n_rows) {
  return n_rows > 0 ? sizeof(int32_t) * static_cast<size_t>(n_rows) : 0;
}

cudaError_t combine_grad(const void* rows, DType dtype, const float* weights,
                         const int32_t* pos, const void* grad_out, int64_t tokens,
                         int64_t top_k, int64_t hidden, int64_t n_rows, void* grad_rows,
                         float* grad_weights, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  using namespace detail;
  if (tokens < 0 || top_k < 0 || top_k > INT_MAX || hidden < 0 || n_rows < 0) {
    return cudaErrorInvalidValue;
  }
  if (workspace != nullptr && workspace_bytes < combine_grad_workspace_bytes(n_rows)) {
    return cudaErrorInvalidValue;
  }
  if (hidden == 0) {
    // Rows are empty; the dot products are all zero.
    if (tokens * top_k == 0) return cudaSuccess;
    return cudaMemsetAsync(grad_weights, 0, sizeof(float) * static_cast<size_t>(tokens * top_k),
                           stream);
  }
  int32_t* owner = n_rows > 0 ? static_cast<int32_t*>(workspace) : nullptr;
  return dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    return launch_combine_grad<Elem>(rows, weights, pos, grad_out, tokens,
                                     static_cast<int>(top_k), hidden, n_rows, grad_rows,
                                     grad_weights, owner, stream);
  });
}

cudaError_t combine_grad(const void* rows, DType dtype, const float* weights,
                         const int32_t* pos, const void* grad_out, int64_t tokens,
                         int64_t top_k, int64_t hidden, int64_t n_rows, void* grad_rows,
                         float* grad_weights, cudaStream_t stream) {
  // Stream-ordered scratch for the row marks; if the pool cannot serve it, fall back to
  // zeroing every row first (same result, one more write of grad_rows).
  const size_t bytes = combine_grad_workspace_bytes(n_rows);
  void* ws = nullptr;
  if (bytes > 0 && hidden > 0 && cudaMallocAsync(&ws, bytes, stream) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the allocation failure; use the fallback path
    ws = nullptr;
  }
  cudaError_t err = combine_grad(rows, dtype, weights, pos, grad_out, tokens, top_k, hidden,
                                 n_rows, grad_rows, grad_weights, ws, ws != nullptr ? bytes : 0,
                                 stream);
  if (ws != nullptr) {
    const cudaError_t free_err = cudaFreeAsync(ws, stream);
    if (err == cudaSuccess) err = free_err;
  }
  return err;
}

}  // namespace cuda
}  // namespace semoe
