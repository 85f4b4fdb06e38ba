// Row layout of the expert exchange: split sizes, block permutations and routes, in C++.
//
// A line-for-line counterpart of paddle_semoe/comm/layout.py (same notation, same steps, same
// omission of identity permutations); tests/ops/test_a2a_layout.py compares the two through
// the CPU op semoe_a2a_plan. Paddle-free and CUDA-free: the CPU op library, the fused NCCL op
// (custom_ops/cuda/fused_a2a_*) and the GPU harness (tools/gpu_check) all compile this file.
//
// Notation: P EP ranks, El local experts per rank, E = P * El experts; expert x lives on EP
// rank x / El. The count matrix C (int64 [P, E], row-major) holds C[s, x] = rows EP rank s
// sends to expert x. A sender's rows are expert-major over global experts, so the rows for
// EP rank d form one contiguous block. S[s, d] = sum_e C[s, d*El + e] (rank split matrix).
//
// Flat route of EP rank `me` (dispatch direction):
//   Exchange(ep group, S)            -> blocks (source s, local expert e), s-major
//   Permute(receive permutation)     -> target layout: local expert e, then source s
// Hierarchical route (L = node_size EP ranks per node, N = P / L nodes, me = n*L + j):
//   Permute(perm1)  send blocks from destination order d = m*L + j' to [j'][m]
//   Exchange(intra-node group, splits1 [L, L]), members n*L + g
//   Permute(perm2)  received blocks [j_src][m] to [m][j_src]
//   Exchange(inter-node group, splits2 [N, N]), members g*L + j
//   Permute(receive permutation)
// A permutation step that is the identity is left out. The combine direction (and the
// backward of dispatch) is invert_route(route): inverse steps in reverse order.
//
// Block permutations are kept as block tables rather than row indices: output block k copies
// input rows [src[k], src[k] + len_k) to output rows [dst[k], dst[k+1]). Tables are
// coalesced (empty blocks dropped, blocks that continue each other merged), so a table is the
// identity exactly when it has no block or one block starting at input row 0.
//
// run_route() is the one step driver used by every executor (the NCCL op, the simulated
// multi-rank harness): it assigns buffers and calls a Backend for each step.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

namespace semoe {
namespace a2a {

// ------------------------------------------------------------------------ count matrix
// "" when C (int64 [P, P*El]) is a valid count matrix, else the reason (same wording as
// layout.validate_count_matrix: the first negative entry in row-major order is named).
inline std::string check_count_matrix(const int64_t* C, int64_t P, int64_t El) {
  if (P < 1) return "EP group size must be >= 1, got " + std::to_string(P);
  if (El < 1) return "num_local_experts must be >= 1, got " + std::to_string(El);
  const int64_t E = P * El;
  for (int64_t s = 0; s < P; ++s) {
    for (int64_t x = 0; x < E; ++x) {
      if (C[s * E + x] < 0) {
        return "count matrix has a negative count " + std::to_string(C[s * E + x]) +
               " (source " + std::to_string(s) + ", expert " + std::to_string(x) + ")";
      }
    }
  }
  return "";
}

// S[s, d] = rows EP rank s sends to EP rank d (int64 [P, P], row-major).
inline std::vector<int64_t> rank_split_matrix(const int64_t* C, int64_t P, int64_t El) {
  std::vector<int64_t> S(static_cast<size_t>(P * P), 0);
  const int64_t E = P * El;
  for (int64_t s = 0; s < P; ++s) {
    for (int64_t x = 0; x < E; ++x) S[s * P + x / El] += C[s * E + x];
  }
  return S;
}

// local_counts[e] = sum_s C[s, me*El + e]: rows of local expert e after dispatch.
inline std::vector<int64_t> local_counts(const int64_t* C, int64_t P, int64_t El, int64_t me) {
  std::vector<int64_t> out(static_cast<size_t>(El), 0);
  for (int64_t s = 0; s < P; ++s) {
    for (int64_t e = 0; e < El; ++e) out[e] += C[s * P * El + me * El + e];
  }
  return out;
}

// Rows EP rank `me` sends (sum of its row of C).
inline int64_t send_rows(const int64_t* C, int64_t P, int64_t El, int64_t me) {
  int64_t n = 0;
  for (int64_t x = 0; x < P * El; ++x) n += C[me * P * El + x];
  return n;
}

// ------------------------------------------------------------------ block permutations
// out = x[index] where index (expand()) moves whole blocks; see the file comment.
struct BlockPermutation {
  std::vector<int64_t> src;        // [B] first input row of output block k
  std::vector<int64_t> dst{0};     // [B + 1] first output row of block k; dst[B] = rows()
  int64_t rows_in = 0;             // rows of the input (== rows() for a permutation)

  int64_t num_blocks() const { return static_cast<int64_t>(src.size()); }
  int64_t rows() const { return dst.back(); }
  int64_t length(int64_t k) const { return dst[k + 1] - dst[k]; }
  bool identity() const { return src.empty() || (src.size() == 1 && src[0] == 0); }

  // Appends input rows [start, start + len) as the next output block (coalescing).
  void append(int64_t start, int64_t len) {
    if (len <= 0) return;
    if (!src.empty() && src.back() + length(num_blocks() - 1) == start) {
      dst.back() += len;
      return;
    }
    src.push_back(start);
    dst.push_back(dst.back() + len);
  }
};

// layout.block_permutation: input blocks b of `sizes[b]` rows (consecutive), output = blocks
// order[0], order[1], ... . `order` must be a permutation of [0, B).
inline BlockPermutation block_permutation(const int64_t* sizes, const int64_t* order, int64_t B) {
  std::vector<int64_t> starts(static_cast<size_t>(B) + 1, 0);
  for (int64_t b = 0; b < B; ++b) starts[b + 1] = starts[b] + sizes[b];
  BlockPermutation bp;
  bp.rows_in = starts[B];
  for (int64_t k = 0; k < B; ++k) bp.append(starts[order[k]], sizes[order[k]]);
  return bp;
}

// The row index of layout.py: out[r] = x[index[r]], int64 [rows()].
inline std::vector<int64_t> expand(const BlockPermutation& bp) {
  std::vector<int64_t> index(static_cast<size_t>(bp.rows()));
  for (int64_t k = 0; k < bp.num_blocks(); ++k) {
    for (int64_t i = 0; i < bp.length(k); ++i) index[bp.dst[k] + i] = bp.src[k] + i;
  }
  return index;
}

// The permutation that undoes bp: out'[src[k] + i] = out[dst[k] + i].
inline BlockPermutation invert(const BlockPermutation& bp) {
  std::vector<int64_t> by_src(static_cast<size_t>(bp.num_blocks()));
  std::iota(by_src.begin(), by_src.end(), int64_t{0});
  std::sort(by_src.begin(), by_src.end(),
            [&](int64_t a, int64_t b) { return bp.src[a] < bp.src[b]; });
  BlockPermutation inv;
  inv.rows_in = bp.rows();
  for (int64_t k : by_src) inv.append(bp.dst[k], bp.length(k));
  return inv;
}

// Host reference of the permutation kernel: out rows = input blocks per bp.
inline void permute_rows_host(const BlockPermutation& bp, const void* x, void* out,
                              int64_t row_bytes) {
  const char* in = static_cast<const char*>(x);
  char* o = static_cast<char*>(out);
  for (int64_t k = 0; k < bp.num_blocks(); ++k) {
    std::memcpy(o + bp.dst[k] * row_bytes, in + bp.src[k] * row_bytes,
                static_cast<size_t>(bp.length(k) * row_bytes));
  }
}

// ------------------------------------------------------------------------- routes
enum class Group : int { kEp = 0, kIntraNode = 1, kInterNode = 2 };

inline const char* group_name(Group g) {
  switch (g) {
    case Group::kEp: return "ep_group";
    case Group::kIntraNode: return "intra_node_group";
    case Group::kInterNode: return "inter_node_group";
  }
  return "?";
}

// Uneven all-to-all inside one group of `size` members (layout.Exchange). splits[a*G + b] =
// rows member a sends to member b; a member's input rows are ordered by destination member,
// its output rows by source member. members[g] = EP rank of member g; `me` = my index.
struct Exchange {
  Group group = Group::kEp;
  int64_t size = 1;
  int64_t me = 0;
  std::vector<int64_t> splits{0};
  std::vector<int64_t> members{0};

  int64_t send(int64_t g) const { return splits[me * size + g]; }
  int64_t recv(int64_t g) const { return splits[g * size + me]; }
  int64_t rows_in() const {
    int64_t n = 0;
    for (int64_t g = 0; g < size; ++g) n += send(g);
    return n;
  }
  int64_t rows_out() const {
    int64_t n = 0;
    for (int64_t g = 0; g < size; ++g) n += recv(g);
    return n;
  }
  // Only this rank in the group: the output is the input (nothing moves).
  bool self_only() const { return size == 1; }

  Exchange inverse() const {
    Exchange t = *this;
    for (int64_t a = 0; a < size; ++a) {
      for (int64_t b = 0; b < size; ++b) t.splits[a * size + b] = splits[b * size + a];
    }
    return t;
  }
};

struct Step {
  bool is_exchange = false;
  BlockPermutation permute;  // when !is_exchange
  Exchange exchange;         // when is_exchange

  int64_t rows_in() const { return is_exchange ? exchange.rows_in() : permute.rows_in; }
  int64_t rows_out() const { return is_exchange ? exchange.rows_out() : permute.rows(); }
  // A step whose output is its input (no data moves, no buffer needed).
  bool passthrough() const { return is_exchange ? exchange.self_only() : permute.identity(); }
};

struct Route {
  std::vector<Step> steps;
  int64_t rows_in = 0;   // rows the route consumes (the first rows of its input)
  int64_t rows_out = 0;  // rows it produces
};

inline void add_permute(Route* r, BlockPermutation bp) {
  if (bp.identity()) return;  // layout._permute_step
  Step s;
  s.permute = std::move(bp);
  r->steps.push_back(std::move(s));
}

inline void add_exchange(Route* r, Exchange ex) {
  Step s;
  s.is_exchange = true;
  s.exchange = std::move(ex);
  r->steps.push_back(std::move(s));
}

// layout.receive_permutation: source-major buffer (s, e) -> local-expert-major (e, s).
inline BlockPermutation receive_permutation(const int64_t* C, int64_t P, int64_t El,
                                            int64_t me) {
  std::vector<int64_t> sizes(static_cast<size_t>(P * El)), order(static_cast<size_t>(P * El));
  for (int64_t s = 0; s < P; ++s) {
    for (int64_t e = 0; e < El; ++e) sizes[s * El + e] = C[s * P * El + me * El + e];
  }
  for (int64_t e = 0; e < El; ++e) {
    for (int64_t s = 0; s < P; ++s) order[e * P + s] = s * El + e;
  }
  return block_permutation(sizes.data(), order.data(), P * El);
}

// layout.flat_route (C already checked).
inline Route flat_route(const int64_t* C, int64_t P, int64_t El, int64_t me) {
  Route r;
  Exchange ex;
  ex.group = Group::kEp;
  ex.size = P;
  ex.me = me;
  ex.splits = rank_split_matrix(C, P, El);
  ex.members.resize(static_cast<size_t>(P));
  std::iota(ex.members.begin(), ex.members.end(), int64_t{0});
  add_exchange(&r, std::move(ex));
  add_permute(&r, receive_permutation(C, P, El, me));
  r.rows_in = send_rows(C, P, El, me);
  r.rows_out = r.steps.back().rows_out();
  return r;
}

// layout.hierarchical_route (C checked, node_size divides P).
inline Route hierarchical_route(const int64_t* C, int64_t P, int64_t El, int64_t me,
                                int64_t node_size) {
  const int64_t L = node_size, N = P / L, n = me / L, j = me % L;
  const std::vector<int64_t> S = rank_split_matrix(C, P, El);
  auto s4 = [&](int64_t n_, int64_t j_, int64_t m_, int64_t jj_) {
    return S[(n_ * L + j_) * P + m_ * L + jj_];
  };
  Route r;
  // step 1: my send blocks from destination order d = m*L + j' to [j'][m]
  std::vector<int64_t> order1(static_cast<size_t>(P));
  for (int64_t jj = 0; jj < L; ++jj) {
    for (int64_t m = 0; m < N; ++m) order1[jj * N + m] = m * L + jj;
  }
  add_permute(&r, block_permutation(&S[me * P], order1.data(), P));
  Exchange intra;
  intra.group = Group::kIntraNode;
  intra.size = L;
  intra.me = j;
  intra.splits.assign(static_cast<size_t>(L * L), 0);
  intra.members.resize(static_cast<size_t>(L));
  for (int64_t a = 0; a < L; ++a) {
    intra.members[a] = n * L + a;
    for (int64_t b = 0; b < L; ++b) {
      for (int64_t m = 0; m < N; ++m) intra.splits[a * L + b] += s4(n, a, m, b);
    }
  }
  add_exchange(&r, std::move(intra));
  // step 2: received blocks [j_src][m] -> [m][j_src]
  std::vector<int64_t> sizes2(static_cast<size_t>(P)), order2(static_cast<size_t>(P));
  for (int64_t js = 0; js < L; ++js) {
    for (int64_t m = 0; m < N; ++m) sizes2[js * N + m] = s4(n, js, m, j);
  }
  for (int64_t m = 0; m < N; ++m) {
    for (int64_t js = 0; js < L; ++js) order2[m * L + js] = js * N + m;
  }
  add_permute(&r, block_permutation(sizes2.data(), order2.data(), P));
  Exchange inter;
  inter.group = Group::kInterNode;
  inter.size = N;
  inter.me = n;
  inter.splits.assign(static_cast<size_t>(N * N), 0);
  inter.members.resize(static_cast<size_t>(N));
  for (int64_t a = 0; a < N; ++a) {
    inter.members[a] = a * L + j;
    for (int64_t b = 0; b < N; ++b) {
      for (int64_t js = 0; js < L; ++js) inter.splits[a * N + b] += s4(a, js, b, j);
    }
  }
  add_exchange(&r, std::move(inter));
  add_permute(&r, receive_permutation(C, P, El, me));
  r.rows_in = send_rows(C, P, El, me);
  r.rows_out = r.steps.back().rows_out();
  return r;
}

// layout.invert_route: inverse steps in reverse order.
inline Route invert_route(const Route& route) {
  Route inv;
  inv.rows_in = route.rows_out;
  inv.rows_out = route.rows_in;
  for (auto it = route.steps.rbegin(); it != route.steps.rend(); ++it) {
    Step s;
    s.is_exchange = it->is_exchange;
    if (it->is_exchange) {
      s.exchange = it->exchange.inverse();
    } else {
      s.permute = invert(it->permute);
    }
    inv.steps.push_back(std::move(s));
  }
  return inv;
}

// ------------------------------------------------------------------------- plan
// Everything one EP rank needs for one batch (ExchangePlan of alltoall.py, in C++).
struct Plan {
  int64_t P = 1, El = 1, me = 0, node_size = 1;
  bool hierarchical = false;
  std::vector<int64_t> local_counts;  // [El]
  int64_t send_rows = 0;              // rows this rank sends (dispatch input rows used)
  int64_t local_rows = 0;             // rows it receives (dispatch output rows)
  Route dispatch;                     // dispatch direction
  Route combine;                      // invert_route(dispatch)
};

// Validates the arguments and builds the plan. "" on success, else the reason.
inline std::string make_plan(const int64_t* C, int64_t P, int64_t El, int64_t me,
                             int64_t node_size, bool hierarchical, Plan* plan) {
  std::string err = check_count_matrix(C, P, El);
  if (!err.empty()) return err;
  if (me < 0 || me >= P) {
    return "ep_rank=" + std::to_string(me) + " outside the EP group [0, " + std::to_string(P) +
           ")";
  }
  if (hierarchical && (node_size < 1 || P % node_size != 0)) {
    return "node_size=" + std::to_string(node_size) + " must divide the EP group size " +
           std::to_string(P);
  }
  plan->P = P;
  plan->El = El;
  plan->me = me;
  plan->node_size = hierarchical ? node_size : P;
  plan->hierarchical = hierarchical;
  plan->local_counts = local_counts(C, P, El, me);
  plan->send_rows = send_rows(C, P, El, me);
  plan->local_rows = std::accumulate(plan->local_counts.begin(), plan->local_counts.end(),
                                     int64_t{0});
  plan->dispatch = hierarchical ? hierarchical_route(C, P, El, me, node_size)
                                : flat_route(C, P, El, me);
  plan->combine = invert_route(plan->dispatch);
  return "";
}

// ------------------------------------------------------------------------- execution
constexpr size_t kWorkspaceAlign = 256;

inline size_t align_up(size_t n) {
  return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

// Index of the last step that moves data (its output goes straight into `out`); -1 if none.
inline int64_t last_moving_step(const Route& route) {
  int64_t last = -1;
  for (size_t i = 0; i < route.steps.size(); ++i) {
    if (!route.steps[i].passthrough()) last = static_cast<int64_t>(i);
  }
  return last;
}

// Size of one ping-pong buffer of run_route (bytes, aligned) and how many it uses (0..2).
inline size_t route_buffer_bytes(const Route& route, int64_t row_bytes, int* n_buffers) {
  const int64_t last = last_moving_step(route);
  int64_t max_rows = 0, n_intermediate = 0;
  for (int64_t i = 0; i < last; ++i) {
    if (route.steps[i].passthrough()) continue;
    max_rows = std::max(max_rows, route.steps[i].rows_out());
    ++n_intermediate;
  }
  *n_buffers = static_cast<int>(std::min<int64_t>(n_intermediate, 2));
  return align_up(static_cast<size_t>(max_rows * row_bytes));
}

// Bytes of scratch run_route needs: up to two ping-pong buffers for intermediate results.
inline size_t route_workspace_bytes(const Route& route, int64_t row_bytes) {
  int n = 0;
  const size_t one = route_buffer_bytes(route, row_bytes, &n);
  return one * static_cast<size_t>(n);
}

// Runs `route` on the first route.rows_in rows of x (rows of row_bytes bytes) and writes its
// route.rows_out rows to out, then zeroes out rows [route.rows_out, out_rows).
// `Backend` provides (each returns "" or an error message):
//   permute(const BlockPermutation&, const void* src, void* dst, int64_t row_bytes)
//   exchange(const Exchange&, const void* src, void* dst, int64_t row_bytes)
//   copy(void* dst, const void* src, size_t bytes)
//   zero(void* dst, size_t bytes)
// x, out and workspace (route_workspace_bytes) must not overlap. Steps that move nothing
// (one-member exchanges) are skipped; the last moving step writes into out directly.
template <class Backend>
std::string run_route(Backend& backend, const Route& route, const void* x, void* out,
                      int64_t out_rows, int64_t row_bytes, void* workspace,
                      size_t workspace_bytes) {
  if (out_rows < route.rows_out) {
    return "output has " + std::to_string(out_rows) + " rows, the route produces " +
           std::to_string(route.rows_out);
  }
  if (workspace_bytes < route_workspace_bytes(route, row_bytes)) {
    return "workspace of " + std::to_string(workspace_bytes) + " bytes, need " +
           std::to_string(route_workspace_bytes(route, row_bytes));
  }
  const int64_t last = last_moving_step(route);
  char* ws = static_cast<char*>(workspace);
  int n_buffers = 0;
  const size_t half = route_buffer_bytes(route, row_bytes, &n_buffers);
  const void* cur = x;
  int which = 0;
  for (int64_t i = 0; i <= last; ++i) {
    const Step& step = route.steps[i];
    if (step.passthrough()) continue;
    void* dst = out;
    if (i != last) {
      dst = ws + (which ? half : 0);
      which ^= 1;
    }
    const std::string err = step.is_exchange
                                ? backend.exchange(step.exchange, cur, dst, row_bytes)
                                : backend.permute(step.permute, cur, dst, row_bytes);
    if (!err.empty()) {
      return "step " + std::to_string(i) + " (" +
             (step.is_exchange ? std::string("exchange in ") + group_name(step.exchange.group)
                               : std::string("permutation")) +
             "): " + err;
    }
    cur = dst;
  }
  if (last < 0 && route.rows_out > 0) {
    const std::string err =
        backend.copy(out, x, static_cast<size_t>(route.rows_out * row_bytes));
    if (!err.empty()) return "copy: " + err;
  }
  if (out_rows > route.rows_out) {
    const std::string err =
        backend.zero(static_cast<char*>(out) + route.rows_out * row_bytes,
                     static_cast<size_t>((out_rows - route.rows_out) * row_bytes));
    if (!err.empty()) return "zero padding: " + err;
  }
  return "";
}

}  // namespace a2a
}  // namespace semoe
