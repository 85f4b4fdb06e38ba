// CPU kernels of the routing ops: expert count, fused gate-dispatch, combine, and their
// gradients. Paddle-free (plain pointers and sizes), so the same code is the semantic
// reference for the CUDA launchers and can be built into the GPU harness.
//
// Semantics (see custom_ops/README.md for the full contract):
//   probs[t, :]   = softmax(logits[t, :])  (ScoreFn::kSigmoid: sigmoid(logits[t, e]) each)
//   ids[t, j]     = j-th largest selection score probs[t, e] + bias[t, e] of token t (ties:
//                   lower expert index first); bias is optional ([E] shared by all tokens,
//                   or [T, E]) and only selects: it never enters the weights
//   weights[t, j] = probs[t, ids[t, j]], divided by sum_j probs[t, ids[t, j]] when normalize
//   an assignment (t, j) is dropped by random routing when j >= 1 and
//   noise[t] >= 2 * p_j / (p_0 + p_j). The others are visited in the capacity rule's priority
//   order (CapacityRule, routing_rules.h); an assignment keeps its slot when its rank r (number of earlier
//   visited, not randomly dropped assignments of the same expert) is < capacity (capacity <= 0:
//   always), else pos = -1.
//   counts[e] = kept assignments of expert e; offsets = exclusive prefix sum of counts;
//   pos[t, j] = offsets[e] + r; rows[pos[t, j], :] = x[t, :]; rows past sum(counts) are zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "semoe/parallel.h"
#include "semoe/routing_rules.h"

namespace semoe {

// Rows of the dispatch buffer for T tokens: T*K without capacity, else min(T*K, E*capacity).
inline int64_t dispatch_rows(int64_t tokens, int64_t num_experts, int64_t top_k,
                             int64_t capacity) {
  const int64_t all = tokens * top_k;
  if (capacity <= 0) return all;
  const int64_t cap_rows = num_experts * capacity;
  return cap_rows < all ? cap_rows : all;
}

// Capacity factors travel as integers in millionths (cf_micro = round(cf * 1e6)) so the
// capacity ceil(cf * T * K / E) is computed exactly, identically in C++, CUDA and Python:
// C = ceil(cf_micro * T * K / (E * 1e6)). cf_micro <= 0 means dropless (returns 0).
constexpr int64_t kCapacityScale = 1000000;

// min_capacity (>= 0) floors a limited capacity: C = max(C, min_capacity); dropless stays 0.
inline int64_t expert_capacity(int64_t tokens, int64_t num_experts, int64_t top_k,
                               int64_t capacity_factor_micro, int64_t min_capacity = 0) {
  if (capacity_factor_micro <= 0 || tokens <= 0) return 0;
  const int64_t num = capacity_factor_micro * tokens * top_k;
  const int64_t den = num_experts * kCapacityScale;
  const int64_t cap = (num + den - 1) / den;
  return cap > min_capacity ? cap : min_capacity;
}

// counts[e] = #{a : ids[a] == e}; ids outside [0, E) are ignored.
inline void expert_count_cpu(const int32_t* ids, int64_t n, int64_t num_experts,
                             int32_t* counts) {
  std::fill(counts, counts + num_experts, 0);
  for (int64_t a = 0; a < n; ++a) {
    const int32_t e = ids[a];
    if (e >= 0 && e < num_experts) ++counts[e];
  }
}

// Scores + top-k for tokens [t0, t1). Writes probs, ids, weights; keep[t*K+j] = 0 when
// random routing rejects the assignment. bias: nullptr, [E] (bias_per_token false) or [T, E].
inline void topk_score_rows(const float* logits, const float* noise, const float* bias,
                            bool bias_per_token, int64_t t0, int64_t t1, int64_t E, int64_t K,
                            bool normalize, ScoreFn score_fn, float* probs, int32_t* ids,
                            float* weights, uint8_t* keep) {
  std::vector<int32_t> order(static_cast<size_t>(E));
  std::vector<float> key(static_cast<size_t>(E));
  for (int64_t t = t0; t < t1; ++t) {
    const float* l = logits + t * E;
    float* p = probs + t * E;
    if (score_fn == ScoreFn::kSigmoid) {
      for (int64_t e = 0; e < E; ++e) p[e] = 1.0f / (1.0f + std::exp(-l[e]));
    } else {
      float mx = l[0];
      for (int64_t e = 1; e < E; ++e) mx = l[e] > mx ? l[e] : mx;
      float sum = 0.0f;
      for (int64_t e = 0; e < E; ++e) {
        p[e] = std::exp(l[e] - mx);
        sum += p[e];
      }
      const float inv = 1.0f / sum;
      for (int64_t e = 0; e < E; ++e) p[e] *= inv;
    }
    const float* b = bias == nullptr ? nullptr : bias + (bias_per_token ? t * E : 0);
    for (int64_t e = 0; e < E; ++e) key[e] = b != nullptr ? p[e] + b[e] : p[e];
    // Top-k by (score desc, index asc): a strict weak order, so the result is unique.
    for (int64_t e = 0; e < E; ++e) order[e] = static_cast<int32_t>(e);
    const float* k = key.data();
    auto better = [k](int32_t a, int32_t b) { return k[a] > k[b] || (k[a] == k[b] && a < b); };
    if (K < E) {
      std::partial_sort(order.begin(), order.begin() + K, order.end(), better);
    } else {
      std::sort(order.begin(), order.end(), better);
    }
    float sel = 0.0f;
    for (int64_t j = 0; j < K; ++j) sel += p[order[j]];
    const float scale = normalize ? 1.0f / sel : 1.0f;
    for (int64_t j = 0; j < K; ++j) {
      ids[t * K + j] = order[j];
      weights[t * K + j] = p[order[j]] * scale;
      keep[t * K + j] = 1;
    }
    if (noise != nullptr && K >= 2) {
      // GShard: the j-th (j >= 1) expert is used with probability min(1, 2 * p_j / (p_0 + p_j)).
      for (int64_t j = 1; j < K; ++j) {
        const float p0 = p[order[0]], pj = p[order[j]];
        if (noise[t] >= 2.0f * pj / (p0 + pj)) keep[t * K + j] = 0;
      }
    }
  }
}

// The priority (visit) order of the T*K assignments under `rule` (see routing_rules.h):
// order[v] = the assignment index a = t*K + j visited v-th. Deterministic: every order is a
// stable sort, ties always go to the lower token index.
//   kChoiceMajor: (j, tok) ascending;  kTokenMajor: (tok, j) ascending, where tok is the token's
//   place in token order: t itself, or with batch_priority its rank by top probability
//   (probs[t, ids[t, 0]] descending, ties by t);
//   kProbs: probs[t, ids[t, j]] descending, ties by a (= by token, as a token picks an expert
//   at most once), so each expert keeps its highest-probability assignments.
inline void capacity_visit_order(const float* probs, const int32_t* ids, int64_t T, int64_t E,
                                 int64_t K, CapacityRule rule, bool batch_priority,
                                 int32_t* order) {
  const int64_t A = T * K;
  if (rule == CapacityRule::kProbs) {
    for (int64_t a = 0; a < A; ++a) order[a] = static_cast<int32_t>(a);
    auto sel = [&](int32_t a) { return probs[(a / K) * E + ids[a]]; };
    std::stable_sort(order, order + A, [&](int32_t a, int32_t b) { return sel(a) > sel(b); });
    return;
  }
  std::vector<int32_t> tok(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) tok[t] = static_cast<int32_t>(t);
  if (batch_priority) {
    auto top = [&](int32_t t) { return probs[t * E + ids[t * K]]; };
    std::stable_sort(tok.begin(), tok.end(), [&](int32_t a, int32_t b) { return top(a) > top(b); });
  }
  int64_t v = 0;
  if (rule == CapacityRule::kChoiceMajor) {
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t i = 0; i < T; ++i) order[v++] = static_cast<int32_t>(tok[i] * K + j);
    }
  } else {
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t j = 0; j < K; ++j) order[v++] = static_cast<int32_t>(tok[i] * K + j);
    }
  }
}

// Positions by a stable counting pass over the visit order (serial over T*K: cheap, and
// deterministic). In: ids, keep, order (nullptr = a ascending). Out: pos (-1 for dropped),
// counts. Returns the number of kept rows.
inline int64_t assign_positions(const int32_t* ids, const uint8_t* keep, const int32_t* order,
                                int64_t n_assign, int64_t E, int64_t capacity, int32_t* pos,
                                int32_t* counts) {
  std::vector<int64_t> fill(static_cast<size_t>(E), 0);
  for (int64_t v = 0; v < n_assign; ++v) {
    const int64_t a = order != nullptr ? order[v] : v;
    if (!keep[a]) { pos[a] = -1; continue; }
    const int32_t e = ids[a];
    const int64_t r = fill[e]++;
    pos[a] = (capacity <= 0 || r < capacity) ? static_cast<int32_t>(r) : -1;
  }
  int64_t off = 0;
  std::vector<int64_t> offsets(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = capacity > 0 ? std::min(fill[e], capacity) : fill[e];
    counts[e] = static_cast<int32_t>(c);
    offsets[e] = off;
    off += c;
  }
  for (int64_t a = 0; a < n_assign; ++a) {
    if (pos[a] >= 0) pos[a] = static_cast<int32_t>(offsets[ids[a]] + pos[a]);
  }
  return off;
}

// rows[pos[t,j]] = x[t] for kept assignments; rows [kept, n_rows) zeroed.
inline void gather_rows(const float* x, const int32_t* pos, int64_t T, int64_t K, int64_t D,
                        int64_t kept, int64_t n_rows, float* rows) {
  parallel_for(T, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < K; ++j) {
        const int32_t p = pos[t * K + j];
        if (p >= 0) std::memcpy(rows + p * D, x + t * D, sizeof(float) * D);
      }
    }
  });
  if (n_rows > kept) std::memset(rows + kept * D, 0, sizeof(float) * (n_rows - kept) * D);
}

// Full forward of the fused gate-dispatch. Returns kept rows.
// bias: selection bias, nullptr, [E] or [T, E] (bias_per_token).
inline int64_t gate_dispatch_cpu(const float* x, const float* logits, const float* noise,
                                 const float* bias, bool bias_per_token, int64_t T, int64_t D,
                                 int64_t E, int64_t K, int64_t capacity, bool normalize,
                                 ScoreFn score_fn, CapacityRule rule, bool batch_priority,
                                 int64_t n_rows, float* rows, float* weights, int32_t* ids,
                                 int32_t* pos, int32_t* counts, float* probs) {
  std::vector<uint8_t> keep(static_cast<size_t>(T * K));
  parallel_for(T, 512, [&](int64_t t0, int64_t t1) {
    topk_score_rows(logits, noise, bias, bias_per_token, t0, t1, E, K, normalize, score_fn,
                    probs, ids, weights, keep.data());
  });
  std::vector<int32_t> order;
  if (rule != CapacityRule::kTokenMajor || batch_priority) {
    order.resize(static_cast<size_t>(T * K));
    capacity_visit_order(probs, ids, T, E, K, rule, batch_priority, order.data());
  }
  const int64_t kept = assign_positions(ids, keep.data(), order.empty() ? nullptr : order.data(),
                                        T * K, E, capacity, pos, counts);
  gather_rows(x, pos, T, K, D, kept, n_rows, rows);
  return kept;
}

// Backward of gate-dispatch (the selection bias has no gradient: it only selects).
//   grad_x[t]      = sum_j grad_rows[pos[t,j]] over kept j (zero if grad_rows is null)
//   grad_logits[t] = score backward of gp, where gp = grad_probs (if given) plus the
//                    gradient of the weights w.r.t. probs (normalized or not); softmax:
//                    p * (gp - <gp, p>), sigmoid: gp * p * (1 - p).
inline void gate_dispatch_grad_cpu(const float* probs, const float* weights, const int32_t* ids,
                                   const int32_t* pos, const float* grad_rows,
                                   const float* grad_weights, const float* grad_probs, int64_t T,
                                   int64_t D, int64_t E, int64_t K, bool normalize,
                                   ScoreFn score_fn, float* grad_x, float* grad_logits) {
  parallel_for(T, 256, [&](int64_t t0, int64_t t1) {
    std::vector<float> gp(static_cast<size_t>(E));
    for (int64_t t = t0; t < t1; ++t) {
      float* gx = grad_x + t * D;
      std::memset(gx, 0, sizeof(float) * D);
      if (grad_rows != nullptr) {
        for (int64_t j = 0; j < K; ++j) {
          const int32_t p = pos[t * K + j];
          if (p < 0) continue;
          const float* gr = grad_rows + static_cast<int64_t>(p) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) gx[d] += gr[d];
        }
      }
      const float* pt = probs + t * E;
      for (int64_t e = 0; e < E; ++e) gp[e] = grad_probs != nullptr ? grad_probs[t * E + e] : 0.f;
      if (grad_weights != nullptr) {
        const float* gw = grad_weights + t * K;
        const float* w = weights + t * K;
        if (normalize) {
          // w_j = p_j / S, S = sum_j p_j  =>  dL/dp_i = (gw_i - sum_j gw_j w_j) / S.
          float sel = 0.f, dot = 0.f;
          for (int64_t j = 0; j < K; ++j) {
            sel += pt[ids[t * K + j]];
            dot += gw[j] * w[j];
          }
          for (int64_t j = 0; j < K; ++j) gp[ids[t * K + j]] += (gw[j] - dot) / sel;
        } else {
          for (int64_t j = 0; j < K; ++j) gp[ids[t * K + j]] += gw[j];
        }
      }
      float* gl = grad_logits + t * E;
      if (score_fn == ScoreFn::kSigmoid) {
        for (int64_t e = 0; e < E; ++e) gl[e] = gp[e] * pt[e] * (1.0f - pt[e]);
        continue;
      }
      float s = 0.f;
      for (int64_t e = 0; e < E; ++e) s += gp[e] * pt[e];
      for (int64_t e = 0; e < E; ++e) gl[e] = pt[e] * (gp[e] - s);
    }
  });
}

// out[t] = sum_j weights[t,j] * rows[pos[t,j]] over pos >= 0.
inline void combine_cpu(const float* rows, const float* weights, const int32_t* pos, int64_t T,
                        int64_t K, int64_t D, float* out) {
  parallel_for(T, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + t * D;
      std::memset(o, 0, sizeof(float) * D);
      for (int64_t j = 0; j < K; ++j) {
        const int32_t p = pos[t * K + j];
        if (p < 0) continue;
        const float w = weights[t * K + j];
        const float* r = rows + static_cast<int64_t>(p) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += w * r[d];
      }
    }
  });
}

// Checks that positions are in [-1, n_rows) and unique. Returns the index of the first
// offending assignment, or -1 when all are valid. `referenced` gets 1 for used rows.
inline int64_t check_positions(const int32_t* pos, int64_t n_assign, int64_t n_rows,
                               uint8_t* referenced) {
  std::memset(referenced, 0, static_cast<size_t>(n_rows));
  for (int64_t a = 0; a < n_assign; ++a) {
    const int32_t p = pos[a];
    if (p < 0) {
      if (p != -1) return a;
      continue;
    }
    if (p >= n_rows || referenced[p]) return a;
    referenced[p] = 1;
  }
  return -1;
}

// grad_rows[pos[t,j]] = weights[t,j] * grad_out[t]; unreferenced rows zero.
// grad_weights[t,j] = <grad_out[t], rows[pos[t,j]]> (0 for dropped).
inline void combine_grad_cpu(const float* rows, const float* weights, const int32_t* pos,
                             const float* grad_out, const uint8_t* referenced, int64_t T,
                             int64_t K, int64_t D, int64_t n_rows, float* grad_rows,
                             float* grad_weights) {
  parallel_for(n_rows, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (!referenced[r]) std::memset(grad_rows + r * D, 0, sizeof(float) * D);
    }
  });
  parallel_for(T, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = grad_out + t * D;
      for (int64_t j = 0; j < K; ++j) {
        const int32_t p = pos[t * K + j];
        if (p < 0) {
          grad_weights[t * K + j] = 0.f;
          continue;
        }
        const float w = weights[t * K + j];
        const float* r = rows + static_cast<int64_t>(p) * D;
        float* gr = grad_rows + static_cast<int64_t>(p) * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) {
          gr[d] = w * g[d];
          dot += g[d] * r[d];
        }
        grad_weights[t * K + j] = dot;
      }
    }
  });
}

}  // namespace semoe
