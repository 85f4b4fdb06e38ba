// Capacity priority rules of gate_dispatch, shared by the CPU kernels, the CUDA launchers and
// the Paddle bindings (no Paddle, no CUDA). The op attribute `capacity_rule` carries the value.
//
// When an expert receives more assignments than its capacity, the rule decides which keep a
// slot: assignments are visited in the rule's priority order and each expert keeps the first
// `capacity` it sees (its rows are laid out in that same order).
//   kChoiceMajor (default; GShard, DeepSpeed, Tutel, Megatron-Core): every token's j-th choice
//       before any token's (j+1)-th choice; within one choice, token order.
//   kTokenMajor: (token, choice) order, the rule of versions before choice-major (a token's
//       second choice can take the slot of a later token's first choice). Kept as a baseline.
//   kProbs: each expert keeps its highest-probability assignments (router probability
//       probs[t, e], descending); ties by token index.
// batch_priority (V-MoE batch prioritized routing) replaces "token order" in the first two rules
// by the order of the tokens' top probability (descending, ties by token index).
#pragma once

#include <cstdint>

namespace semoe {

enum class CapacityRule : int32_t { kChoiceMajor = 0, kTokenMajor = 1, kProbs = 2 };

inline bool valid_capacity_rule(int64_t r) { return r >= 0 && r <= 2; }

// Router score function (op attribute `score_fn`): softmax over the experts of a token
// (GShard, Switch, DeepSeek-V2) or an independent sigmoid per expert (DeepSeek-V3, usually
// with top-k renormalization).
enum class ScoreFn : int32_t { kSoftmax = 0, kSigmoid = 1 };

inline bool valid_score_fn(int64_t f) { return f == 0 || f == 1; }

}  // namespace semoe
