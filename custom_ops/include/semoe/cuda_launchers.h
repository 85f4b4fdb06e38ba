// CUDA launchers of the MoE ops: plain pointers, sizes and a stream, no Paddle types, so a
// standalone harness (tools/gpu_check) can build and test them with nvcc alone.
// Semantics are exactly those of the CPU kernels in routing_cpu.h / grouped_ffn_cpu.h.
// Router tensors (logits, probs, weights, noise) are float32; token rows use `dtype`.
// Every launcher returns the first CUDA error it hit (cudaSuccess otherwise); invalid sizes or
// dtypes give cudaErrorInvalidValue. Implementations: custom_ops/cuda/*.cu (routing.cu,
// combine.cu, activation.cu); standalone checks and timings: tools/gpu_check.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace semoe {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// counts[e] = #{a < n : ids[a] == e}; ids outside [0, E) ignored. Deterministic (no atomics:
// one block of warp-private counters in shared memory, so E is bounded by the device's
// shared memory per block, about 58K experts on an H100; larger E returns an error).
cudaError_t expert_count(const int32_t* ids, int64_t n, int64_t num_experts, int32_t* counts,
                         cudaStream_t stream);

// Bytes of device scratch gate_dispatch needs for these sizes (any capacity rule).
size_t gate_dispatch_workspace_bytes(int64_t tokens, int64_t num_experts, int64_t top_k);

// Fused scores + top-k + random routing + capacity + positions + row permutation.
// noise: [T] float32 or nullptr. bias: selection bias added to the scores for the top-k only,
// nullptr, [E] or [T, E] (bias_per_token). capacity: rows per expert, <= 0 for dropless.
// score_fn: a semoe::ScoreFn value (0 softmax, 1 sigmoid).
// capacity_rule: a semoe::CapacityRule value (routing_rules.h: 0 choice-major, 1 token-major,
// 2 probs); batch_priority: tokens in top-probability order for rules 0 and 1.
// rows: [n_rows, D] of `dtype`; rows past the kept ones (sum(counts)) are zeroed.
// workspace: device scratch of at least gate_dispatch_workspace_bytes(T, E, K) bytes.
// Positions come from a stable counting pass over the rule's visit order (no atomics decide a
// slot; the orders of batch_priority and probs come from a stable radix sort): bit-identical
// on every run.
cudaError_t gate_dispatch(const void* x, DType dtype, const float* logits, const float* noise,
                          const float* bias, bool bias_per_token, int64_t tokens, int64_t hidden,
                          int64_t num_experts, int64_t top_k, int64_t capacity, bool normalize,
                          int score_fn, int capacity_rule,
                          bool batch_priority, int64_t n_rows, void* rows,
                          float* weights, int32_t* ids, int32_t* pos, int32_t* counts,
                          float* probs, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream);

// grad_rows / grad_weights / grad_probs may be nullptr (treated as zero).
cudaError_t gate_dispatch_grad(const float* probs, const float* weights, const int32_t* ids,
                               const int32_t* pos, const void* grad_rows, DType dtype,
                               const float* grad_weights, const float* grad_probs,
                               int64_t tokens, int64_t hidden, int64_t num_experts,
                               int64_t top_k, bool normalize, int score_fn, void* grad_x,
                               float* grad_logits,
                               cudaStream_t stream);

// out[t] = sum_j weights[t,j] * rows[pos[t,j]] over pos >= 0 (fp32 accumulation).
// Positions are not range-checked here (the launcher does not know R): callers validate.
cudaError_t combine(const void* rows, DType dtype, const float* weights, const int32_t* pos,
                    int64_t tokens, int64_t top_k, int64_t hidden, void* out,
                    cudaStream_t stream);

// grad_rows[pos[t,j]] = weights[t,j] * grad_out[t] (other rows zero, n_rows rows in all);
// grad_weights[t,j] = <grad_out[t], rows[pos[t,j]]>, 0 where pos < 0 (or pos >= n_rows).
// Positions must be -1 or unique (as for combine). This overload takes its scratch (row marks)
// from the stream-ordered allocator (cudaMallocAsync) and, should that fail, zeroes every row
// of grad_rows first instead; the overload below takes caller-provided workspace.
cudaError_t combine_grad(const void* rows, DType dtype, const float* weights,
                         const int32_t* pos, const void* grad_out, int64_t tokens,
                         int64_t top_k, int64_t hidden, int64_t n_rows, void* grad_rows,
                         float* grad_weights, cudaStream_t stream);

// Bytes of device scratch combine_grad (workspace overload) needs for n_rows rows.
size_t combine_grad_workspace_bytes(int64_t n_rows);

// combine_grad with caller-provided workspace of combine_grad_workspace_bytes(n_rows) bytes;
// workspace == nullptr selects the zero-everything-first path (one more write of grad_rows).
cudaError_t combine_grad(const void* rows, DType dtype, const float* weights,
                         const int32_t* pos, const void* grad_out, int64_t tokens,
                         int64_t top_k, int64_t hidden, int64_t n_rows, void* grad_rows,
                         float* grad_weights, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

// Expert FFN element-wise parts (GEMMs go through cuBLAS in the binding).
// activation: 0 gelu, 1 gelu_tanh, 2 relu, 3 silu (semoe::Activation).
// h[r, c] += bias[expert_of_row(r), c]; a = act(h). Expert of a row from prefix counts
// (counts: device int32[E]); rows past sum(counts) get no bias (h kept, a = act(h)).
// The activation reads h after rounding to `dtype`, as act_bwd will.
cudaError_t bias_act_fwd(void* h, void* a, DType dtype, const void* bias, const int32_t* counts,
                         int64_t num_experts, int64_t rows, int64_t cols, int activation,
                         cudaStream_t stream);

// a = act(h); g = g * act'(h) over n elements.
cudaError_t act_bwd(const void* h, void* a, void* g, DType dtype, int64_t n, int activation,
                    cudaStream_t stream);

}  // namespace cuda
}  // namespace semoe
