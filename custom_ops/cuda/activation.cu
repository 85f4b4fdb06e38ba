// CUDA launchers of the expert FFN's element-wise parts: bias + activation (forward) and the
// fused activation backward. Semantics: semoe/activation.h (bias_act_rows, act_bwd_rows).
// Values are stored in the token dtype; arithmetic is fp32 with the CUDA math library
// (erff, tanhf, expf), so results match the CPU's fast approximations to ~1e-6 relative.
#include <climits>

#include "common.cuh"

namespace semoe {
namespace cuda {
namespace detail {
namespace {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhC = 0.044715f;
// Most rows one bias_act block handles (its row -> expert table lives in shared memory).
constexpr int kMaxRowsPerBlock = 64;

// act: 0 gelu (erf), 1 gelu_tanh, 2 relu, 3 silu (semoe::Activation).
__device__ __forceinline__ float act_forward(int act, float h) {
  switch (act) {
    case 0: return 0.5f * h * (1.0f + erff(h * kInvSqrt2));
    case 1: return 0.5f * h * (1.0f + tanhf(kSqrt2OverPi * (h + kGeluTanhC * h * h * h)));
    case 2: return h > 0.0f ? h : 0.0f;
    default: return h / (1.0f + expf(-h));
  }
}

// a = act(h), d = act'(h).
__device__ __forceinline__ void act_forward_grad(int act, float h, float* a, float* d) {
  switch (act) {
    case 0: {
      const float cdf = 0.5f * (1.0f + erff(h * kInvSqrt2));
      const float pdf = kInvSqrt2Pi * expf(-0.5f * h * h);
      *a = h * cdf;
      *d = cdf + h * pdf;
      break;
    }
    case 1: {
      const float th = tanhf(kSqrt2OverPi * (h + kGeluTanhC * h * h * h));
      const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhC * h * h);
      *a = 0.5f * h * (1.0f + th);
      *d = 0.5f * (1.0f + th) + 0.5f * h * (1.0f - th * th) * du;
      break;
    }
    case 2:
      *a = h > 0.0f ? h : 0.0f;
      *d = h > 0.0f ? 1.0f : 0.0f;
      break;
    default: {
      const float s = 1.0f / (1.0f + expf(-h));
      *a = h * s;
      *d = s * (1.0f + h * (1.0f - s));
    }
  }
}

// Fills row_expert[i] with the expert owning row r0 + i (rows [r0, r1)), or -1 for rows past
// sum(counts). Expert e owns rows [off_e, off_e + counts[e]), off = exclusive prefix sum of
// counts (negative counts count as 0). Walks the experts in tiles of blockDim.x with a
// block-wide scan per tile; every thread of the block must call it.
__device__ void find_row_experts(const int32_t* __restrict__ counts, int E, int64_t r0,
                                 int64_t r1, int* row_expert, int64_t* scratch) {
  for (int i = threadIdx.x; i < r1 - r0; i += blockDim.x) row_expert[i] = -1;
  __syncthreads();
  int64_t running = 0;  // rows owned by the experts of earlier tiles (same in every thread)
  for (int e0 = 0; e0 < E && running < r1; e0 += blockDim.x) {
    const int e = e0 + static_cast<int>(threadIdx.x);
    const int64_t c = e < E && counts[e] > 0 ? counts[e] : 0;
    int64_t tile_total = 0;
    const int64_t start = running + block_exclusive_scan(c, scratch, &tile_total);
    const int64_t lo = start > r0 ? start : r0;
    const int64_t hi = start + c < r1 ? start + c : r1;
    for (int64_t r = lo; r < hi; ++r) row_expert[r - r0] = e;
    running += tile_total;
  }
  __syncthreads();
}

// h[r, :] += bias[expert(r), :] (rows with no expert: no bias); a[r, :] = act(h[r, :]) where
// the activation reads the stored (dtype-rounded) h, as the backward pass will.
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
    bias_act_kernel(T* __restrict__ h, T* __restrict__ a, const T* __restrict__ bias,
                    const int32_t* __restrict__ counts, int E, int64_t rows, int64_t cols,
                    int rows_per_block, int act) {
  __shared__ int64_t scratch[33];
  __shared__ int row_expert[kMaxRowsPerBlock];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  find_row_experts(counts, E, r0, r1, row_expert, scratch);
  const int64_t np = cols / VEC;
  for (int64_t r = r0; r < r1; ++r) {
    const int e = row_expert[r - r0];
    const T* b = e >= 0 ? bias + static_cast<int64_t>(e) * cols : nullptr;
    T* hr = h + r * cols;
    T* ar = a + r * cols;
    for (int64_t i = threadIdx.x; i < np; i += blockDim.x) {
      Pack<T, VEC> hv = load_pack<T, VEC>(hr + i * VEC);
      Pack<T, VEC> av;
      if (b != nullptr) {
        const Pack<T, VEC> bv = load_pack<T, VEC>(b + i * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) hv.v[k] = from_float<T>(to_float(hv.v[k]) + to_float(bv.v[k]));
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) av.v[k] = from_float<T>(act_forward(act, to_float(hv.v[k])));
      if (b != nullptr) store_pack<T, VEC>(hr + i * VEC, hv);
      store_pack<T, VEC>(ar + i * VEC, av);
    }
  }
}

// a = act(h); g = g * act'(h), over n elements in packs of VEC (n % VEC == 0).
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
    act_bwd_kernel(const T* __restrict__ h, T* __restrict__ a, T* __restrict__ g, int64_t n,
                   int act) {
  const int64_t np = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < np;
       i += stride) {
    const Pack<T, VEC> hv = load_pack<T, VEC>(h + i * VEC);
    Pack<T, VEC> gv = load_pack<T, VEC>(g + i * VEC);
    Pack<T, VEC> av;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float av_k, d_k;
      act_forward_grad(act, to_float(hv.v[k]), &av_k, &d_k);
      av.v[k] = from_float<T>(av_k);
      gv.v[k] = from_float<T>(to_float(gv.v[k]) * d_k);
    }
    store_pack<T, VEC>(a + i * VEC, av);
    store_pack<T, VEC>(g + i * VEC, gv);
  }
}

template <typename T>
cudaError_t launch_bias_act(void* h, void* a, const void* bias, const int32_t* counts, int E,
                            int64_t rows, int64_t cols, int act, cudaStream_t stream) {
  // About 16K elements per block, at most kMaxRowsPerBlock rows.
  int64_t rpb = 16384 / (cols > 0 ? cols : 1);
  rpb = rpb < 1 ? 1 : (rpb > kMaxRowsPerBlock ? kMaxRowsPerBlock : rpb);
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, rpb)));
  T* hp = static_cast<T*>(h);
  T* ap = static_cast<T*>(a);
  const T* bp = static_cast<const T*>(bias);
  if (can_vectorize<T>(cols, {h, a, bias})) {
    bias_act_kernel<T, vec16<T>()><<<grid, 256, 0, stream>>>(hp, ap, bp, counts, E, rows, cols,
                                                             static_cast<int>(rpb), act);
  } else {
    bias_act_kernel<T, 1><<<grid, 256, 0, stream>>>(hp, ap, bp, counts, E, rows, cols,
                                                    static_cast<int>(rpb), act);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_act_bwd(const void* h, void* a, void* g, int64_t n, int act,
                           cudaStream_t stream) {
  const T* hp = static_cast<const T*>(h);
  T* ap = static_cast<T*>(a);
  T* gp = static_cast<T*>(g);
  if (can_vectorize<T>(n, {h, a, g})) {
    constexpr int kVec = vec16<T>();
    const int64_t blocks = std::min<int64_t>(ceil_div(n / kVec, 256), int64_t{1} << 20);
    act_bwd_kernel<T, kVec><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(hp, ap, gp, n, act);
  } else {
    const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), int64_t{1} << 20);
    act_bwd_kernel<T, 1><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(hp, ap, gp, n, act);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

// ================================================================== launchers
cudaError_t bias_act_fwd(void* h, void* a, DType dtype, const void* bias, const int32_t* counts,
                         int64_t num_experts, int64_t rows, int64_t cols, int activation,
                         cudaStream_t stream) {
  using namespace detail;
  if (num_experts < 0 || num_experts > INT_MAX || rows < 0 || cols < 0 || activation < 0 ||
      activation > 3) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || cols == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    return launch_bias_act<Elem>(h, a, bias, counts, static_cast<int>(num_experts), rows, cols,
                                 activation, stream);
  });
}

cudaError_t act_bwd(const void* h, void* a, void* g, DType dtype, int64_t n, int activation,
                    cudaStream_t stream) {
  using namespace detail;
  if (n < 0 || activation < 0 || activation > 3) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    return launch_act_bwd<Elem>(h, a, g, n, activation, stream);
  });
}

}  // namespace cuda
}  // namespace semoe
