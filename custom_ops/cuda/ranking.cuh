// Deterministic, stable ranking of assignments by expert: the counting scheme behind
// expert_count and the positions of gate_dispatch. No atomics: every count is owned by one
// lane at a time and every sum has a fixed order.
//
// Vocabulary. An *assignment* a in [0, A) carries an expert id eid[a] (-1 or out of range:
// not counted). Visit order is a ascending; gate_dispatch lays its assignments out in the
// capacity rule's visit order first (visit_eid), and src maps a visit index back to its
// assignment (routing.cu).
// The assignments are cut into *chunks* of plan.per_chunk consecutive assignments, one
// thread block each; a chunk is cut into one *sub-chunk* of plan.per_warp assignments per
// warp; a warp walks its sub-chunk in *rounds* of 32 consecutive assignments, one per lane.
//
// The stable rank of assignment a (with expert e) is the number of earlier assignments with
// expert e. It is the sum of four terms, each counted in visit order:
//   rank(a) = chunk_base[c][e]            (earlier chunks;  exclusive scan over chunks)
//           + warp_base[w][e]             (earlier warps of the same chunk)
//           + running count of e in the warp's earlier rounds
//           + popc(peers(a) & lanes below) (earlier lanes of the same round)
#pragma once

#include "common.cuh"

namespace semoe {
namespace cuda {
namespace detail {

// Shared memory a ranking block may use without opting in.
constexpr size_t kDefaultSmemBytes = 48 * 1024;
// Upper bound on the number of chunks (keeps the serial scan over chunks short).
constexpr int64_t kMaxChunks = 512;
// Minimum rounds per warp (keeps blocks from being trivially short).
constexpr int64_t kMinRounds = 4;

// Geometry of the ranking kernels for A assignments and E experts. Host-side and a pure
// function of (A, E): the workspace size and the results depend on nothing else.
struct ChunkPlan {
  int warps;           // warps per block (1..8): W*E int32 counters must fit in shared memory
  int64_t per_warp;    // assignments per warp sub-chunk (a multiple of 32)
  int64_t per_chunk;   // warps * per_warp
  int64_t n_chunks;    // ceil(A / per_chunk), >= 1
  size_t smem_bytes;   // warps * E * sizeof(int32)
};

inline ChunkPlan plan_chunks(int64_t A, int64_t E, int max_warps = kWarpsPerRowBlock) {
  ChunkPlan p{};
  p.warps = max_warps;
  while (p.warps > 1 && static_cast<size_t>(p.warps) * E * sizeof(int32_t) > kDefaultSmemBytes) {
    p.warps /= 2;
  }
  const int64_t round = static_cast<int64_t>(p.warps) * kWarpSize;  // assignments per block round
  int64_t rounds = ceil_div(A, kMaxChunks * round);
  if (rounds < kMinRounds) rounds = kMinRounds;
  p.per_warp = rounds * kWarpSize;
  p.per_chunk = p.per_warp * p.warps;
  p.n_chunks = A > 0 ? ceil_div(A, p.per_chunk) : 1;
  p.smem_bytes = static_cast<size_t>(p.warps) * static_cast<size_t>(E) * sizeof(int32_t);
  return p;
}

// Expert of assignment a, or -1 when it is past the end, dropped, or out of [0, E).
__device__ __forceinline__ int expert_or_none(const int32_t* eid, int64_t a, int64_t a_end,
                                              int E) {
  if (a >= a_end) return -1;
  const int e = eid[a];
  return (e >= 0 && e < E) ? e : -1;
}

// Bit l set for every lane l whose `key` equals the calling lane's (the whole warp calls it).
// __match_any_sync needs sm_70+; older targets (nvcc's default arch can be below that when a
// build names none) get an equivalent 32-step shuffle loop.
__device__ __forceinline__ unsigned match_any(int key) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700) || defined(SEMOE_NO_MATCH_ANY)
  unsigned peers = 0;
#pragma unroll
  for (int l = 0; l < kWarpSize; ++l) {
    if (__shfl_sync(kFullMask, key, l) == key) peers |= 1u << l;
  }
  return peers;
#else
  return __match_any_sync(kFullMask, key);
#endif
}

// One warp walks assignments [a_begin, a_end) in rounds of 32 (lane i takes the i-th of the
// round). counter[e] (this warp's row of shared memory) enters as the rank the warp's first
// assignment of expert e will get and leaves increased by the number of e the warp saw.
// on_rank(a, e, r) is called for every in-range assignment with its expert e (-1 = none) and
// its stable rank r (meaningful only for e >= 0). The whole warp must call this.
template <typename OnRank>
__device__ __forceinline__ void rank_subchunk(const int32_t* eid, int64_t a_begin,
                                              int64_t a_end, int E, int* counter,
                                              OnRank&& on_rank) {
  const int lane = lane_id();
  for (int64_t base = a_begin; base < a_end; base += kWarpSize) {
    const int64_t a = base + lane;
    const int e = expert_or_none(eid, a, a_end, E);
    // Lanes of this round holding the same expert (the -1 lanes form a group of their own).
    const unsigned peers = match_any(e);
    const int earlier_rounds = e >= 0 ? counter[e] : 0;
    __syncwarp();  // every peer has read counter[e] before its leader updates it
    const bool leader = (__ffs(peers) - 1) == lane;  // lowest lane of the group
    if (e >= 0 && leader) counter[e] = earlier_rounds + __popc(peers);
    __syncwarp();
    if (a < a_end) on_rank(a, e, earlier_rounds + __popc(peers & lanemask_lt()));
  }
}

// Sub-chunk [begin, end) of warp w in chunk c.
__device__ __forceinline__ void subchunk_range(int64_t A, int64_t per_chunk, int64_t per_warp,
                                               int64_t* begin, int64_t* end) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * per_chunk + warp_id() * per_warp;
  *begin = b < A ? b : A;
  *end = b + per_warp < A ? b + per_warp : A;
}

// chunk_counts[c * E + e] = number of assignments of expert e in chunk c (grid = chunks,
// blockDim = 32 * plan.warps, dynamic shared memory = plan.smem_bytes).
// With one chunk covering everything, this is expert_count.
__global__ void chunk_count_kernel(const int32_t* __restrict__ eid, int64_t A, int E,
                                   int64_t per_chunk, int64_t per_warp,
                                   int32_t* __restrict__ chunk_counts) {
  extern __shared__ int counters[];  // [warps][E]
  const int warps = static_cast<int>(blockDim.x) >> 5;
  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) counters[i] = 0;
  __syncthreads();
  int64_t begin, end;
  subchunk_range(A, per_chunk, per_warp, &begin, &end);
  rank_subchunk(eid, begin, end, E, counters + warp_id() * E, [](int64_t, int, int) {});
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int total = 0;
    for (int w = 0; w < warps; ++w) total += counters[w * E + e];  // fixed order
    chunk_counts[static_cast<int64_t>(blockIdx.x) * E + e] = total;
  }
}

// One block. Turns chunk_counts into chunk_base (in place): chunk_base[c][e] = sum of
// chunk_counts[c'][e] over c' < c. Then counts[e] = min(total_e, capacity) (capacity <= 0:
// no limit), offsets[e] = exclusive prefix sum of counts over experts, *kept = sum(counts).
__global__ void expert_offsets_kernel(int32_t* __restrict__ chunk_counts, int64_t n_chunks,
                                      int E, int64_t capacity, int32_t* __restrict__ counts,
                                      int32_t* __restrict__ offsets, int32_t* __restrict__ kept) {
  __shared__ int64_t scratch[33];
  // 1) per expert, a serial exclusive scan over the chunks (loads issued 8 at a time).
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t running = 0;
    int64_t c = 0;
    for (; c + 8 <= n_chunks; c += 8) {
      int32_t v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = chunk_counts[(c + k) * E + e];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        chunk_counts[(c + k) * E + e] = static_cast<int32_t>(running);
        running += v[k];
      }
    }
    for (; c < n_chunks; ++c) {
      const int32_t v = chunk_counts[c * E + e];
      chunk_counts[c * E + e] = static_cast<int32_t>(running);
      running += v;
    }
    counts[e] = static_cast<int32_t>(capacity > 0 && running > capacity ? capacity : running);
  }
  __syncthreads();  // counts[] written by other threads of this block is visible below
  // 2) offsets = exclusive scan of counts over experts: thread i owns a contiguous slice.
  const int per = (E + blockDim.x - 1) / blockDim.x;
  const int e0 = threadIdx.x * per;
  const int e1 = e0 + per < E ? e0 + per : E;
  int64_t local = 0;
  for (int e = e0; e < e1; ++e) local += counts[e];
  int64_t total = 0;
  int64_t run = block_exclusive_scan(local, scratch, &total);
  for (int e = e0; e < e1; ++e) {
    offsets[e] = static_cast<int32_t>(run);
    run += counts[e];
  }
  if (threadIdx.x == 0) *kept = static_cast<int32_t>(total);
}

// pos[src[a]] (src == nullptr: pos[a]) for every visited assignment a of chunk c (grid =
// chunks, as chunk_count_kernel): kept when capacity <= 0 or rank < capacity, then
// pos = offsets[e] + rank; else -1. Assignments with no expert (dropped by random routing)
// get -1.
__global__ void assign_positions_kernel(const int32_t* __restrict__ eid,
                                        const int32_t* __restrict__ src, int64_t A, int E,
                                        int64_t per_chunk, int64_t per_warp,
                                        const int32_t* __restrict__ chunk_base,
                                        const int32_t* __restrict__ offsets, int64_t capacity,
                                        int32_t* __restrict__ pos) {
  extern __shared__ int counters[];  // [warps][E]
  const int warps = static_cast<int>(blockDim.x) >> 5;
  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) counters[i] = 0;
  __syncthreads();
  int64_t begin, end;
  subchunk_range(A, per_chunk, per_warp, &begin, &end);
  int* mine = counters + warp_id() * E;
  // Pass 1: how many of each expert every warp of this chunk holds.
  rank_subchunk(eid, begin, end, E, mine, [](int64_t, int, int) {});
  __syncthreads();
  // Each warp's starting rank: chunk base + counts of the earlier warps (fixed order).
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = chunk_base[static_cast<int64_t>(blockIdx.x) * E + e];
    for (int w = 0; w < warps; ++w) {
      const int v = counters[w * E + e];
      counters[w * E + e] = run;
      run += v;
    }
  }
  __syncthreads();
  // Pass 2: the same walk, now starting from the global ranks.
  rank_subchunk(eid, begin, end, E, mine, [&](int64_t a, int e, int rank) {
    const bool keep = e >= 0 && (capacity <= 0 || rank < capacity);
    pos[src != nullptr ? src[a] : a] = keep ? offsets[e] + rank : -1;
  });
}

// Opt a ranking kernel into more than 48 KB of dynamic shared memory when the plan needs it.
inline cudaError_t allow_smem(const void* kernel, size_t bytes) {
  if (bytes <= kDefaultSmemBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

}  // namespace detail
}  // namespace cuda
}  // namespace semoe
