// Shared device helpers of the CUDA launchers: element conversions, 16-byte packs, warp and
// block reductions/scans, dtype dispatch. Paddle-free; included only by custom_ops/cuda/*.cu.
//
// Conventions used by every kernel here:
//   * token rows are T (float, __half or __nv_bfloat16); arithmetic is fp32;
//   * a "pack" is VEC consecutive elements moved with one load/store (16 bytes when the row
//     length and every pointer allow it, else one element);
//   * every reduction has a fixed shape (butterfly shuffles, then a fixed-order loop), so the
//     same input always gives bit-identical output; no atomics anywhere.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "semoe/cuda_launchers.h"

namespace semoe {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
// Threads per block of the warp-per-token/row kernels (8 warps).
constexpr int kRowBlock = 256;
constexpr int kWarpsPerRowBlock = kRowBlock / kWarpSize;
// Packs each lane keeps in flight in the row kernels (independent 16-byte loads per lane).
constexpr int kUnroll = 4;

#define SEMOE_CUDA_RETURN_IF_ERROR(expr)   \
  do {                                     \
    const cudaError_t semoe_err_ = (expr); \
    if (semoe_err_ != cudaSuccess) return semoe_err_; \
  } while (0)

// ------------------------------------------------------------------ element conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------ packs
// N consecutive elements, aligned to their total size (16 bytes for the vector path).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

inline bool is_aligned(const void* p, size_t bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// Elements per 16-byte pack of T.
template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

// True when rows of `row_elems` elements of T can be moved in 16-byte packs: the row length
// is a multiple of the pack and every given base pointer is 16-byte aligned (nullptrs ignored).
template <typename T>
inline bool can_vectorize(int64_t row_elems, std::initializer_list<const void*> ptrs) {
  if (row_elems % vec16<T>() != 0) return false;
  for (const void* p : ptrs) {
    if (!is_aligned(p, 16)) return false;
  }
  return true;
}

// ------------------------------------------------------------------ dtype dispatch
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the element type of `dtype`; unknown dtypes are an error.
template <typename Fn>
inline cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(TypeTag<float>{});
    case DType::kFloat16: return fn(TypeTag<__half>{});
    case DType::kBFloat16: return fn(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

inline size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ lane helpers
__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & 31; }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) >> 5; }
// Bit i set for every lane i below the calling lane.
__device__ __forceinline__ unsigned lanemask_lt() { return (1u << lane_id()) - 1u; }

// Sum over the warp by a butterfly: every lane gets the same, order-fixed result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Inclusive prefix sum over the lanes of a warp (lane i gets v_0 + ... + v_i).
__device__ __forceinline__ int64_t warp_inclusive_scan(int64_t v) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t u = __shfl_up_sync(kFullMask, v, o);
    if (lane_id() >= o) v += u;
  }
  return v;
}

// Exclusive prefix sum of one value per thread over the whole block, in thread order.
// Every thread of the block must call it (it synchronizes); *total gets the block sum.
// `scratch` is shared memory of at least 33 int64 values.
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int64_t* scratch,
                                                        int64_t* total) {
  const int lane = lane_id(), warp = warp_id();
  const int n_warps = static_cast<int>(blockDim.x + 31) >> 5;
  const int64_t incl = warp_inclusive_scan(v);
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int64_t w = lane < n_warps ? scratch[lane] : 0;
    const int64_t wincl = warp_inclusive_scan(w);
    scratch[lane] = wincl - w;  // exclusive prefix of the warp totals
    if (lane == 31) scratch[32] = wincl;
  }
  __syncthreads();
  const int64_t result = scratch[warp] + incl - v;
  *total = scratch[32];
  __syncthreads();  // scratch may be reused right after
  return result;
}

}  // namespace detail
}  // namespace cuda
}  // namespace semoe
