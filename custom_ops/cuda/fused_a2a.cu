// Row permutation launcher of the fused expert all-to-all (semoe/fused_a2a.h): a block
// gather of whole rows, the Permute steps of the routes in semoe/a2a_layout.h.
//
// The block table travels by value as a __grid_constant__ kernel parameter (no upload, no
// host synchronization, nothing to keep alive after the launch); a table of more than
// kPermuteBlocksPerLaunch blocks is split over several launches, each covering a contiguous
// range of output rows. One warp per output row: lanes find the row's block by a binary
// search over the table (every lane reads the same entries: broadcast), then move the row in
// packs, kUnroll packs in flight per lane. Pure copies: bit-exact, deterministic.
#include <cstring>

#include "common.cuh"
#include "semoe/fused_a2a.h"

namespace semoe {
namespace cuda {
namespace detail {
namespace {

struct PermuteTable {
  int64_t src[kPermuteBlocksPerLaunch];      // first source row of block k
  int64_t dst[kPermuteBlocksPerLaunch + 1];  // first output row of block k; dst[n] = end
  int n;                                     // blocks in this launch
};
static_assert(sizeof(PermuteTable) + 64 <= 4096, "kernel parameters must stay under 4 KB");

// V: the pack type (uint4, uint2, uint32_t or unsigned char); row_packs = row_bytes / sizeof(V).
template <typename V>
__global__ void __launch_bounds__(kRowBlock)
    permute_rows_kernel(const V* __restrict__ src, V* __restrict__ dst, int64_t row_packs,
                        const __grid_constant__ PermuteTable table) {
  const int64_t r = table.dst[0] + static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + warp_id();
  if (r >= table.dst[table.n]) return;
  // Largest k with dst[k] <= r; r < dst[n], so block k is non-empty and holds r.
  int lo = 0, hi = table.n;  // invariant: dst[lo] <= r < dst[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (table.dst[mid] <= r) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t s = table.src[lo] + (r - table.dst[lo]);
  const V* in = src + s * row_packs;
  V* out = dst + r * row_packs;
  const int lane = lane_id();
  for (int64_t base = 0; base < row_packs; base += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < row_packs) v[u] = in[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < row_packs) out[i] = v[u];
    }
  }
}

template <typename V>
cudaError_t launch_permute(const void* src, void* dst, int64_t row_bytes,
                           const int64_t* src_start, const int64_t* dst_start,
                           int64_t num_blocks, cudaStream_t stream) {
  const int64_t row_packs = row_bytes / static_cast<int64_t>(sizeof(V));
  for (int64_t first = 0; first < num_blocks; first += kPermuteBlocksPerLaunch) {
    const int n = static_cast<int>(
        std::min<int64_t>(kPermuteBlocksPerLaunch, num_blocks - first));
    const int64_t rows = dst_start[first + n] - dst_start[first];
    if (rows <= 0) continue;
    PermuteTable table;
    std::memcpy(table.src, src_start + first, sizeof(int64_t) * n);
    std::memcpy(table.dst, dst_start + first, sizeof(int64_t) * (n + 1));
    table.n = n;
    const int64_t grid = ceil_div(rows, kWarpsPerRowBlock);
    if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
    permute_rows_kernel<V><<<static_cast<unsigned>(grid), kRowBlock, 0, stream>>>(
        static_cast<const V*>(src), static_cast<V*>(dst), row_packs, table);
    SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace detail

cudaError_t permute_row_blocks(const void* src, void* dst, int64_t row_bytes,
                               const int64_t* src_start, const int64_t* dst_start,
                               int64_t num_blocks, cudaStream_t stream) {
  if (row_bytes < 0 || num_blocks < 0) return cudaErrorInvalidValue;
  if (row_bytes == 0 || num_blocks == 0) return cudaSuccess;
  if (src_start == nullptr || dst_start == nullptr || src == nullptr || dst == nullptr) {
    return cudaErrorInvalidValue;
  }
  for (int64_t k = 0; k < num_blocks; ++k) {
    if (dst_start[k + 1] < dst_start[k] || src_start[k] < 0 || dst_start[k] < 0) {
      return cudaErrorInvalidValue;
    }
  }
  using detail::is_aligned;
  auto fits = [&](size_t bytes) {
    return row_bytes % static_cast<int64_t>(bytes) == 0 && is_aligned(src, bytes) &&
           is_aligned(dst, bytes);
  };
  if (fits(16)) {
    return detail::launch_permute<uint4>(src, dst, row_bytes, src_start, dst_start, num_blocks,
                                         stream);
  }
  if (fits(8)) {
    return detail::launch_permute<uint2>(src, dst, row_bytes, src_start, dst_start, num_blocks,
                                         stream);
  }
  if (fits(4)) {
    return detail::launch_permute<uint32_t>(src, dst, row_bytes, src_start, dst_start,
                                            num_blocks, stream);
  }
  return detail::launch_permute<unsigned char>(src, dst, row_bytes, src_start, dst_start,
                                               num_blocks, stream);
}

}  // namespace cuda
}  // namespace semoe
