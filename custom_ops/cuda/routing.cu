// CUDA launchers of the routing ops: expert_count, gate_dispatch (softmax + top-k + random
// routing + capacity + positions + row permutation) and gate_dispatch_grad.
// Semantics: custom_ops/README.md and the CPU kernels in semoe/routing_cpu.h.
//
// gate_dispatch pipeline (A = T*K assignments a = t*K + j; the capacity rule of
// semoe/routing_rules.h fixes the order v in which they are visited):
//   1. route_kernel             one warp per token: probs, ids, weights, eid[a] (expert, or -1
//                               when random routing drops the assignment)
//   1b. (batch_priority, probs) sort_keys_kernel + cub::DeviceRadixSort::SortPairs: a stable
//                               sort of the tokens by top probability (batch_priority) or of
//                               the assignments by their probability (probs), descending
//   1c. (not token-major)       visit_order_kernel: src[v] = assignment visited v-th,
//                               visit_eid[v] = eid[src[v]]; token-major visits a itself
//   2. chunk_count_kernel       per chunk, per expert counts of visit_eid       (ranking.cuh)
//   3. expert_offsets_kernel    scan over chunks, capacity, counts, offsets     (ranking.cuh)
//   4. assign_positions_kernel  stable rank in visit order -> pos[src[v]]       (ranking.cuh)
//   5. gather_rows_kernel       one warp per token: x[t] read once, stored at each pos >= 0
//      zero_tail_kernel         rows [kept, n_rows) = 0
#include <cub/device/device_radix_sort.cuh>

#include <climits>
#include <cmath>

#include "common.cuh"
#include "ranking.cuh"
#include "semoe/routing_rules.h"

namespace semoe {
namespace cuda {
namespace detail {
namespace {

// ------------------------------------------------------------------ top-k order
// The strict total order of the top-k: higher probability first, ties to the lower index.
__device__ __forceinline__ bool ranks_before(float pa, int ia, float pb, int ib) {
  return pa > pb || (pa == pb && ia < ib);
}

// ------------------------------------------------------------------ 1. route
// Butterfly arg-max over the warp under ranks_before on (key, index), carrying the picked
// probability along; every lane ends with the winner.
__device__ __forceinline__ void warp_argmax_carry(float* k, int* i, float* p) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ok = __shfl_xor_sync(kFullMask, *k, o);
    const int oi = __shfl_xor_sync(kFullMask, *i, o);
    const float op = __shfl_xor_sync(kFullMask, *p, o);
    if (ranks_before(ok, oi, *k, *i)) {
      *k = ok;
      *i = oi;
      *p = op;
    }
  }
}

// One warp per token. Lane l owns experts l, l+32, l+64, ...
// MAXV > 0: each lane keeps its (at most MAXV) values in registers (E <= 32 * MAXV).
// MAXV == 0: any E; values are re-read from logits/probs in global memory (each lane only
// re-reads the entries it wrote itself, so no cross-lane synchronization is needed).
//
// Scores: softmax over the token's experts, or sigmoid per expert (score_fn). The selection
// key of expert e is probs[e] + bias[e] (bias: nullptr, [E], or [T, E] when bias_per_token);
// the weights use probs only.
// Top-k without sorting: pick j is the best expert that ranks strictly after pick j-1 under
// ranks_before on (key, index) (a total order, so K arg-max passes give exactly the CPU's
// partial sort).
template <int MAXV>
__global__ void __launch_bounds__(kRowBlock)
    route_kernel(const float* __restrict__ logits, const float* __restrict__ noise,
                 const float* __restrict__ bias, bool bias_per_token, int64_t T, int E, int K,
                 bool normalize, bool sigmoid, float* __restrict__ probs,
                 int32_t* __restrict__ ids, float* __restrict__ weights,
                 int32_t* __restrict__ eid) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + warp_id();
  if (t >= T) return;  // whole warps leave together
  const int lane = lane_id();
  const float* l = logits + t * E;
  float* p = probs + t * E;
  const float* b = bias == nullptr ? nullptr : bias + (bias_per_token ? t * E : 0);
  constexpr int kSlots = MAXV > 0 ? MAXV : 1;
  float v[kSlots];

  if (sigmoid) {
    if constexpr (MAXV > 0) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        const int e = lane + 32 * i;
        v[i] = e < E ? 1.0f / (1.0f + expf(-l[e])) : 0.f;
        if (e < E) p[e] = v[i];
      }
    } else {
      for (int e = lane; e < E; e += 32) p[e] = 1.0f / (1.0f + expf(-l[e]));
    }
  } else {
    // softmax: max, exp, sum (lane-serial then butterfly: a fixed order), scale by 1/sum.
    float mx = -INFINITY;
    if constexpr (MAXV > 0) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        const int e = lane + 32 * i;
        v[i] = e < E ? l[e] : -INFINITY;
        mx = fmaxf(mx, v[i]);
      }
    } else {
      for (int e = lane; e < E; e += 32) mx = fmaxf(mx, l[e]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
    if constexpr (MAXV > 0) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        v[i] = (lane + 32 * i) < E ? expf(v[i] - mx) : 0.f;
        sum += v[i];
      }
    } else {
      for (int e = lane; e < E; e += 32) {
        const float ex = expf(l[e] - mx);
        p[e] = ex;
        sum += ex;
      }
    }
    sum = warp_sum(sum);
    const float inv = 1.0f / sum;
    if constexpr (MAXV > 0) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        const int e = lane + 32 * i;
        v[i] *= inv;
        if (e < E) p[e] = v[i];
      }
    } else {
      for (int e = lane; e < E; e += 32) p[e] *= inv;
    }
  }

  // top-k, weights, random routing.
  const bool random_routing = noise != nullptr && K >= 2;
  const float nz = random_routing ? noise[t] : 0.f;
  float prev_k = INFINITY;  // every key ranks after (inf, -1)
  int prev_i = -1;
  float p0 = 0.f, sel = 0.f;
  for (int j = 0; j < K; ++j) {
    float bk = -INFINITY;  // sentinel (-inf, INT_MAX): ranks after every (key, expert)
    int bi = INT_MAX;
    float bp = 0.f;
    if constexpr (MAXV > 0) {
#pragma unroll
      for (int i = 0; i < MAXV; ++i) {
        const int e = lane + 32 * i;
        if (e < E) {
          const float key = b != nullptr ? v[i] + b[e] : v[i];
          if (ranks_before(prev_k, prev_i, key, e) && ranks_before(key, e, bk, bi)) {
            bk = key;
            bi = e;
            bp = v[i];
          }
        }
      }
    } else {
      for (int e = lane; e < E; e += 32) {
        const float pe = p[e];
        const float key = b != nullptr ? pe + b[e] : pe;
        if (ranks_before(prev_k, prev_i, key, e) && ranks_before(key, e, bk, bi)) {
          bk = key;
          bi = e;
          bp = pe;
        }
      }
    }
    warp_argmax_carry(&bk, &bi, &bp);
    prev_k = bk;
    prev_i = bi;
    if (j == 0) p0 = bp;
    sel += bp;  // same order as the CPU kernel: j ascending
    // GShard random routing: (t, j >= 1) dropped when noise >= 2 p_j / (p_0 + p_j).
    const bool keep = !(random_routing && j >= 1 && nz >= 2.0f * bp / (p0 + bp));
    if (lane == (j & 31)) {  // lane j%32 owns pick j (it rescales its own writes below)
      const int64_t a = t * K + j;
      ids[a] = bi;
      weights[a] = bp;
      eid[a] = keep ? bi : -1;
    }
  }
  if (normalize) {
    const float scale = 1.0f / sel;
    for (int j = lane; j < K; j += 32) weights[t * K + j] *= scale;
  }
}

// ------------------------------------------------------------------ 1b/1c. visit order
// Sort keys: descending probability as an ascending uint32 key (probabilities are >= 0, whose
// float bits order like unsigned integers; ~bits reverses that). A stable ascending sort of
// (key, index) pairs then ties to the lower index.
//   n == T (batch_priority): key[t] = ~bits(probs[t, ids[t, 0]]), val[t] = t;
//   n == A (probs rule):     key[a] = ~bits(probs[a / K, ids[a]]), val[a] = a.
__global__ void sort_keys_kernel(const float* __restrict__ probs, const int32_t* __restrict__ ids,
                                 int64_t n, int E, int K, bool per_token,
                                 uint32_t* __restrict__ keys, int32_t* __restrict__ vals) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t t = per_token ? i : i / K;
    const int32_t e = ids[per_token ? i * K : i];
    keys[i] = ~__float_as_uint(probs[t * E + e]);
    vals[i] = static_cast<int32_t>(i);
  }
}

// src[v] = the assignment visited v-th; visit_eid[v] = eid[src[v]].
//   sorted != nullptr, !per_token: probs rule, src = sorted (the sorted assignments);
//   otherwise tok(i) = sorted ? sorted[i] : i (batch_priority order or token order) and
//   choice_major: v = j*T + i -> tok(i)*K + j;  token-major: v = i*K + j -> tok(i)*K + j.
__global__ void visit_order_kernel(const int32_t* __restrict__ eid,
                                   const int32_t* __restrict__ sorted, bool sorted_tokens,
                                   bool choice_major, int64_t T, int K,
                                   int32_t* __restrict__ visit_eid, int32_t* __restrict__ src) {
  const int64_t A = T * K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < A;
       v += stride) {
    int64_t a;
    if (sorted != nullptr && !sorted_tokens) {
      a = sorted[v];
    } else {
      const int64_t i = choice_major ? v % T : v / K;
      const int64_t j = choice_major ? v / T : v % K;
      const int64_t tok = sorted != nullptr ? sorted[i] : i;
      a = tok * K + j;
    }
    src[v] = static_cast<int32_t>(a);
    visit_eid[v] = eid[a];
  }
}

// Bytes of cub's scratch for a stable (uint32 key, int32 value) radix sort of n pairs.
size_t radix_sort_temp_bytes(int64_t n) {
  size_t bytes = 0;
  if (n <= 0) return 0;
  if (cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint32_t*>(nullptr),
                                      static_cast<uint32_t*>(nullptr),
                                      static_cast<const int32_t*>(nullptr),
                                      static_cast<int32_t*>(nullptr), static_cast<int>(n)) !=
      cudaSuccess) {
    return 0;
  }
  return bytes;
}

// ------------------------------------------------------------------ 5. rows
// One warp per token: each 16-byte (or element-sized) vector V of x[t] is loaded once and
// stored to rows[pos[t, j]] for every kept j. Type-agnostic (a byte copy).
template <typename V>
__global__ void __launch_bounds__(kRowBlock)
    gather_rows_kernel(const V* __restrict__ x, const int32_t* __restrict__ pos, int64_t T,
                       int K, int64_t nv, int64_t n_rows, V* __restrict__ rows) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + warp_id();
  if (t >= T) return;
  const int lane = lane_id();
  const int32_t* pt = pos + t * K;
  const int my_pos = lane < K ? pt[lane] : -1;  // positions of picks 0..31 live in lanes
  const V* src = x + t * nv;
  for (int64_t base = 0; base < nv; base += 32 * kUnroll) {  // warp-uniform trip count
    V buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 + lane;
      if (i < nv) buf[u] = src[i];
    }
    for (int j = 0; j < K; ++j) {
      const int p = j < 32 ? __shfl_sync(kFullMask, my_pos, j) : pt[j];
      if (p < 0 || p >= n_rows) continue;
      V* dst = rows + static_cast<int64_t>(p) * nv;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * 32 + lane;
        if (i < nv) dst[i] = buf[u];
      }
    }
  }
}

// rows [*kept, n_rows) = 0, as vectors V (grid-stride over the tail).
template <typename V>
__global__ void zero_tail_kernel(const int32_t* __restrict__ kept, int64_t nv, int64_t n_rows,
                                 V* __restrict__ rows) {
  const int64_t begin = static_cast<int64_t>(*kept) * nv;
  const int64_t end = n_rows * nv;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end;
       i += stride) {
    rows[i] = V{};
  }
}

template <typename V>
cudaError_t launch_row_copy(const void* x, const int32_t* pos, const int32_t* kept, int64_t T,
                            int K, int64_t row_bytes, int64_t n_rows, void* rows,
                            cudaStream_t stream) {
  const int64_t nv = row_bytes / static_cast<int64_t>(sizeof(V));
  if (T > 0) {
    gather_rows_kernel<V><<<ceil_div(T, kWarpsPerRowBlock), kRowBlock, 0, stream>>>(
        static_cast<const V*>(x), pos, T, K, nv, n_rows, static_cast<V*>(rows));
    SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (n_rows > 0) {
    // Enough threads for a modest tail; blocks past the real tail exit at once.
    const int64_t blocks = std::min<int64_t>(ceil_div(n_rows * nv, 4 * 256), 1024);
    zero_tail_kernel<V><<<std::max<int64_t>(blocks, 1), 256, 0, stream>>>(
        kept, nv, n_rows, static_cast<V*>(rows));
    SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

// Widest vector (16, 4 or 2 bytes) that divides the row and both base pointers.
cudaError_t copy_rows(const void* x, const int32_t* pos, const int32_t* kept, int64_t T, int K,
                      int64_t row_bytes, int64_t n_rows, void* rows, cudaStream_t stream) {
  auto fits = [&](size_t w) {
    return row_bytes % static_cast<int64_t>(w) == 0 && is_aligned(x, w) && is_aligned(rows, w);
  };
  if (fits(16)) return launch_row_copy<uint4>(x, pos, kept, T, K, row_bytes, n_rows, rows, stream);
  if (fits(4)) {
    return launch_row_copy<uint32_t>(x, pos, kept, T, K, row_bytes, n_rows, rows, stream);
  }
  // Rows of 2-byte elements: always a whole number of uint16.
  return launch_row_copy<uint16_t>(x, pos, kept, T, K, row_bytes, n_rows, rows, stream);
}

// ------------------------------------------------------------------ workspace
// Layout of gate_dispatch's workspace, each part 256-byte aligned (A = T*K):
//   eid [A] int32 | visit_eid [A] int32 | src [A] int32 | sort keys in/out [A] uint32 x 2 |
//   sort values in/out [A] int32 x 2 | cub scratch | chunk counts/bases [n_chunks * E] int32 |
//   offsets [E] int32 | kept int32
// The size depends only on (T, K, E), never on the capacity rule.
struct DispatchWorkspace {
  int32_t* eid;
  int32_t* visit_eid;
  int32_t* src;
  uint32_t* keys_in;
  uint32_t* keys_out;
  int32_t* vals_in;
  int32_t* vals_out;
  void* sort_temp;
  size_t sort_temp_bytes;
  int32_t* chunks;
  int32_t* offsets;
  int32_t* kept;
  size_t bytes;
};

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Byte offsets of the parts (a pure function of T, K, E and the plan).
struct WorkspaceLayout {
  size_t eid, visit_eid, src, keys_in, keys_out, vals_in, vals_out, sort_temp, sort_temp_bytes,
      chunks, offsets, kept, bytes;
};

WorkspaceLayout workspace_layout(int64_t T, int64_t K, int64_t E, const ChunkPlan& plan) {
  const int64_t A = T * K;
  const size_t a4 = align256(static_cast<size_t>(A) * sizeof(int32_t));
  WorkspaceLayout l{};
  l.eid = 0;
  l.visit_eid = l.eid + a4;
  l.src = l.visit_eid + a4;
  l.keys_in = l.src + a4;
  l.keys_out = l.keys_in + a4;
  l.vals_in = l.keys_out + a4;
  l.vals_out = l.vals_in + a4;
  l.sort_temp = l.vals_out + a4;
  l.sort_temp_bytes = std::max(radix_sort_temp_bytes(A), radix_sort_temp_bytes(T));
  l.chunks = l.sort_temp + align256(l.sort_temp_bytes);
  l.offsets = l.chunks + align256(static_cast<size_t>(plan.n_chunks * E) * sizeof(int32_t));
  l.kept = l.offsets + align256(static_cast<size_t>(E) * sizeof(int32_t));
  l.bytes = l.kept + align256(sizeof(int32_t));
  return l;
}

DispatchWorkspace carve_workspace(void* base, const WorkspaceLayout& l) {
  char* p = static_cast<char*>(base);
  DispatchWorkspace w{};
  w.eid = reinterpret_cast<int32_t*>(p + l.eid);
  w.visit_eid = reinterpret_cast<int32_t*>(p + l.visit_eid);
  w.src = reinterpret_cast<int32_t*>(p + l.src);
  w.keys_in = reinterpret_cast<uint32_t*>(p + l.keys_in);
  w.keys_out = reinterpret_cast<uint32_t*>(p + l.keys_out);
  w.vals_in = reinterpret_cast<int32_t*>(p + l.vals_in);
  w.vals_out = reinterpret_cast<int32_t*>(p + l.vals_out);
  w.sort_temp = p + l.sort_temp;
  w.sort_temp_bytes = l.sort_temp_bytes;
  w.chunks = reinterpret_cast<int32_t*>(p + l.chunks);
  w.offsets = reinterpret_cast<int32_t*>(p + l.offsets);
  w.kept = reinterpret_cast<int32_t*>(p + l.kept);
  w.bytes = l.bytes;
  return w;
}

// Fills ws.visit_eid / ws.src with the rule's visit order; returns the arrays the ranking
// kernels read (eid itself and no src for plain token-major).
cudaError_t build_visit_order(const float* probs, const int32_t* ids, int64_t T, int E, int K,
                              int capacity_rule, bool batch_priority, const DispatchWorkspace& ws,
                              const int32_t** visit_eid, const int32_t** src,
                              cudaStream_t stream) {
  const int64_t A = T * K;
  const bool probs_rule = capacity_rule == static_cast<int>(CapacityRule::kProbs);
  const bool choice_major = capacity_rule == static_cast<int>(CapacityRule::kChoiceMajor);
  if (!probs_rule && !choice_major && !batch_priority) {
    *visit_eid = ws.eid;
    *src = nullptr;
    return cudaSuccess;
  }
  const int32_t* sorted = nullptr;
  const bool sort_tokens = !probs_rule;
  if (probs_rule || batch_priority) {
    const int64_t n = probs_rule ? A : T;
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 4096));
    sort_keys_kernel<<<grid, 256, 0, stream>>>(probs, ids, n, E, K, sort_tokens, ws.keys_in,
                                               ws.vals_in);
    SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    size_t temp_bytes = ws.sort_temp_bytes;
    SEMOE_CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
        ws.sort_temp, temp_bytes, ws.keys_in, ws.keys_out, ws.vals_in, ws.vals_out,
        static_cast<int>(n), 0, 32, stream));
    sorted = ws.vals_out;
  }
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(A, 256), 4096));
  visit_order_kernel<<<grid, 256, 0, stream>>>(ws.eid, sorted, sort_tokens, choice_major, T, K,
                                               ws.visit_eid, ws.src);
  SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  *visit_eid = ws.visit_eid;
  *src = ws.src;
  return cudaSuccess;
}

cudaError_t launch_route(const float* logits, const float* noise, const float* bias,
                         bool bias_per_token, int64_t T, int E, int K, bool normalize,
                         bool sigmoid, float* probs, int32_t* ids, float* weights, int32_t* eid,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(T, kWarpsPerRowBlock)));
  auto launch = [&](auto kernel) {
    kernel<<<grid, kRowBlock, 0, stream>>>(logits, noise, bias, bias_per_token, T, E, K,
                                           normalize, sigmoid, probs, ids, weights, eid);
  };
  if (E <= 32) {
    launch(route_kernel<1>);
  } else if (E <= 64) {
    launch(route_kernel<2>);
  } else if (E <= 128) {
    launch(route_kernel<4>);
  } else if (E <= 256) {
    launch(route_kernel<8>);
  } else {
    launch(route_kernel<0>);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------ gate_dispatch_grad
// grad_x[t] = sum over j with pos >= 0 of grad_rows[pos[t, j]] (fp32, j ascending), or 0
// when grad_rows is null. One warp per token, packs of VEC elements.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowBlock)
    dispatch_grad_x_kernel(const T* __restrict__ grad_rows, const int32_t* __restrict__ pos,
                           int64_t tokens, int K, int64_t D, T* __restrict__ grad_x) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + warp_id();
  if (t >= tokens) return;
  const int lane = lane_id();
  const int64_t np = D / VEC;
  const int32_t* pt = pos + t * K;
  const int my_pos = (grad_rows != nullptr && lane < K) ? pt[lane] : -1;
  T* dst = grad_x + t * D;
  for (int64_t base = 0; base < np; base += 32 * kUnroll) {
    float acc[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[u][k] = 0.f;
    }
    if (grad_rows != nullptr) {
      for (int j = 0; j < K; ++j) {
        const int p = j < 32 ? __shfl_sync(kFullMask, my_pos, j) : pt[j];
        if (p < 0) continue;
        const T* src = grad_rows + static_cast<int64_t>(p) * D;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + u * 32 + lane;
          if (i < np) {
            const Pack<T, VEC> r = load_pack<T, VEC>(src + i * VEC);
#pragma unroll
            for (int k = 0; k < VEC; ++k) acc[u][k] += to_float(r.v[k]);
          }
        }
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

// grad_logits[t] = softmax backward of gp, one warp per token:
//   gp[e] = grad_probs[t, e] + sum_j [ids[t, j] == e] * c_j, with
//   c_j = (gw_j - sum_i gw_i w_i) / sum_i p[ids_i]  (normalize) or gw_j (not),
//   grad_logits[t, e] = p[e] * (gp[e] - sum_e' gp[e'] p[e']).
struct TokenGradCoef {
  const float* gw;  // grad_weights[t] (K) or nullptr
  float dot;        // sum_i gw_i w_i   (normalize only)
  float sel;        // sum_i p[ids_i]   (normalize only)
  bool normalize;
  __device__ __forceinline__ float operator()(int j) const {
    return normalize ? (gw[j] - dot) / sel : gw[j];
  }
};

__device__ __forceinline__ float grad_prob_of(int e, const float* gpr, const int32_t* id, int K,
                                              const TokenGradCoef& coef) {
  float g = gpr != nullptr ? gpr[e] : 0.f;
  if (coef.gw != nullptr) {
    for (int j = 0; j < K; ++j) {
      if (id[j] == e) g += coef(j);  // ids of a token are distinct: at most one match
    }
  }
  return g;
}

__global__ void __launch_bounds__(kRowBlock)
    dispatch_grad_logits_kernel(const float* __restrict__ probs, const float* __restrict__ weights,
                                const int32_t* __restrict__ ids,
                                const float* __restrict__ grad_weights,
                                const float* __restrict__ grad_probs, int64_t tokens, int E,
                                int K, bool normalize, bool sigmoid,
                                float* __restrict__ grad_logits) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + warp_id();
  if (t >= tokens) return;
  const int lane = lane_id();
  const float* pt = probs + t * E;
  const int32_t* id = ids + t * K;
  const float* gpr = grad_probs != nullptr ? grad_probs + t * E : nullptr;
  TokenGradCoef coef{nullptr, 0.f, 1.f, normalize};
  if (grad_weights != nullptr) {
    coef.gw = grad_weights + t * K;
    if (normalize) {
      const float* w = weights + t * K;
      float sel = 0.f, dot = 0.f;
      for (int j = 0; j < K; ++j) {  // serial, j ascending, as the CPU kernel
        sel += pt[id[j]];
        dot += coef.gw[j] * w[j];
      }
      coef.sel = sel;
      coef.dot = dot;
    }
  }
  float* gl = grad_logits + t * E;
  if (sigmoid) {  // d sigmoid = p (1 - p), per expert
    for (int e = lane; e < E; e += 32) {
      gl[e] = grad_prob_of(e, gpr, id, K, coef) * pt[e] * (1.0f - pt[e]);
    }
    return;
  }
  float s = 0.f;
  for (int e = lane; e < E; e += 32) s += grad_prob_of(e, gpr, id, K, coef) * pt[e];
  s = warp_sum(s);
  for (int e = lane; e < E; e += 32) gl[e] = pt[e] * (grad_prob_of(e, gpr, id, K, coef) - s);
}

template <typename T>
cudaError_t launch_grad_x(const void* grad_rows, const int32_t* pos, int64_t tokens, int K,
                          int64_t D, void* grad_x, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(tokens, kWarpsPerRowBlock)));
  if (can_vectorize<T>(D, {grad_rows, grad_x})) {
    dispatch_grad_x_kernel<T, vec16<T>()><<<grid, kRowBlock, 0, stream>>>(
        static_cast<const T*>(grad_rows), pos, tokens, K, D, static_cast<T*>(grad_x));
  } else {
    dispatch_grad_x_kernel<T, 1><<<grid, kRowBlock, 0, stream>>>(
        static_cast<const T*>(grad_rows), pos, tokens, K, D, static_cast<T*>(grad_x));
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

// ================================================================== launchers
cudaError_t expert_count(const int32_t* ids, int64_t n, int64_t num_experts, int32_t* counts,
                         cudaStream_t stream) {
  using namespace detail;
  if (num_experts <= 0 || n < 0 || num_experts > INT_MAX) return cudaErrorInvalidValue;
  if (n == 0) {
    return cudaMemsetAsync(counts, 0, sizeof(int32_t) * static_cast<size_t>(num_experts), stream);
  }
  // One block (up to 32 warps) covering all n ids: the chunk counts of a single chunk.
  const ChunkPlan plan = plan_chunks(n, num_experts, /*max_warps=*/32);
  const int64_t per_warp = ceil_div(ceil_div(n, plan.warps), kWarpSize) * kWarpSize;
  SEMOE_CUDA_RETURN_IF_ERROR(
      allow_smem(reinterpret_cast<const void*>(&chunk_count_kernel), plan.smem_bytes));
  chunk_count_kernel<<<1, plan.warps * kWarpSize, plan.smem_bytes, stream>>>(
      ids, n, static_cast<int>(num_experts), per_warp * plan.warps, per_warp, counts);
  return cudaGetLastError();
}

size_t gate_dispatch_workspace_bytes(int64_t tokens, int64_t num_experts, int64_t top_k) {
  using namespace detail;
  const int64_t A = tokens * top_k;
  if (A <= 0 || num_experts <= 0) return 0;
  return workspace_layout(tokens, top_k, num_experts, plan_chunks(A, num_experts)).bytes;
}

cudaError_t gate_dispatch(const void* x, DType dtype, const float* logits, const float* noise,
                          const float* bias, bool bias_per_token, int64_t tokens, int64_t hidden,
                          int64_t num_experts, int64_t top_k, int64_t capacity, bool normalize,
                          int score_fn, int capacity_rule,
                          bool batch_priority, int64_t n_rows, void* rows, float* weights,
                          int32_t* ids, int32_t* pos, int32_t* counts, float* probs,
                          void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using namespace detail;
  const int64_t T = tokens, D = hidden, E = num_experts, K = top_k;
  if (T < 0 || D < 0 || E <= 0 || E > INT_MAX || K < 1 || K > E || n_rows < 0 ||
      T * K > INT_MAX || !valid_capacity_rule(capacity_rule) || !valid_score_fn(score_fn) ||
      (batch_priority && capacity_rule == static_cast<int>(CapacityRule::kProbs)) ||
      (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16)) {
    return cudaErrorInvalidValue;
  }
  const int64_t row_bytes = D * static_cast<int64_t>(dtype_size(dtype));
  if (T == 0) {
    SEMOE_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(counts, 0, sizeof(int32_t) * static_cast<size_t>(E), stream));
    if (n_rows > 0 && row_bytes > 0) {
      return cudaMemsetAsync(rows, 0, static_cast<size_t>(n_rows * row_bytes), stream);
    }
    return cudaSuccess;
  }
  const int64_t A = T * K;
  const ChunkPlan plan = plan_chunks(A, E);
  const WorkspaceLayout layout = workspace_layout(T, K, E, plan);
  if (workspace == nullptr || workspace_bytes < layout.bytes) return cudaErrorInvalidValue;
  const DispatchWorkspace ws = carve_workspace(workspace, layout);
  const int e32 = static_cast<int>(E), k32 = static_cast<int>(K);

  SEMOE_CUDA_RETURN_IF_ERROR(
      launch_route(logits, noise, bias, bias_per_token, T, e32, k32, normalize,
                   score_fn == static_cast<int>(ScoreFn::kSigmoid), probs, ids, weights, ws.eid,
                   stream));
  const int32_t* visit_eid = nullptr;
  const int32_t* src = nullptr;
  SEMOE_CUDA_RETURN_IF_ERROR(build_visit_order(probs, ids, T, e32, k32, capacity_rule,
                                               batch_priority, ws, &visit_eid, &src, stream));

  const dim3 chunk_grid(static_cast<unsigned>(plan.n_chunks));
  const int chunk_threads = plan.warps * kWarpSize;
  SEMOE_CUDA_RETURN_IF_ERROR(
      allow_smem(reinterpret_cast<const void*>(&chunk_count_kernel), plan.smem_bytes));
  chunk_count_kernel<<<chunk_grid, chunk_threads, plan.smem_bytes, stream>>>(
      visit_eid, A, e32, plan.per_chunk, plan.per_warp, ws.chunks);
  SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());

  expert_offsets_kernel<<<1, 256, 0, stream>>>(ws.chunks, plan.n_chunks, e32, capacity, counts,
                                               ws.offsets, ws.kept);
  SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());

  SEMOE_CUDA_RETURN_IF_ERROR(
      allow_smem(reinterpret_cast<const void*>(&assign_positions_kernel), plan.smem_bytes));
  assign_positions_kernel<<<chunk_grid, chunk_threads, plan.smem_bytes, stream>>>(
      visit_eid, src, A, e32, plan.per_chunk, plan.per_warp, ws.chunks, ws.offsets, capacity,
      pos);
  SEMOE_CUDA_RETURN_IF_ERROR(cudaGetLastError());

  if (row_bytes == 0) return cudaSuccess;
  return copy_rows(x, pos, ws.kept, T, k32, row_bytes, n_rows, rows, stream);
}

cudaError_t gate_dispatch_grad(const float* probs, const float* weights, const int32_t* ids,
                               const int32_t* pos, const void* grad_rows, DType dtype,
                               const float* grad_weights, const float* grad_probs,
                               int64_t tokens, int64_t hidden, int64_t num_experts,
                               int64_t top_k, bool normalize, int score_fn, void* grad_x,
                               float* grad_logits, cudaStream_t stream) {
  using namespace detail;
  const int64_t T = tokens, D = hidden, E = num_experts, K = top_k;
  if (T < 0 || D < 0 || E <= 0 || E > INT_MAX || K < 1 || K > E || !valid_score_fn(score_fn)) {
    return cudaErrorInvalidValue;
  }
  if (T == 0) return cudaSuccess;
  const int k32 = static_cast<int>(K);
  if (D > 0) {
    SEMOE_CUDA_RETURN_IF_ERROR(dispatch_dtype(dtype, [&](auto tag) {
      using Elem = typename decltype(tag)::type;
      return launch_grad_x<Elem>(grad_rows, pos, T, k32, D, grad_x, stream);
    }));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(T, kWarpsPerRowBlock)));
  dispatch_grad_logits_kernel<<<grid, kRowBlock, 0, stream>>>(
      probs, weights, ids, grad_weights, grad_probs, T, static_cast<int>(E), k32, normalize,
      score_fn == static_cast<int>(ScoreFn::kSigmoid), grad_logits);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace semoe
