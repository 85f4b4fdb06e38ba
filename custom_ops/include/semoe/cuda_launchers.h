// CUDA launchers of the MoE ops: plain pointers, sizes and a stream, no Paddle types, so a
// standalone harness (tools/gpu_check) can build and test them with nvcc alone.
// Semantics are exactly those of the CPU kernels in routing_cpu.h / grouped_ffn_cpu.h.
// Router tensors (logits, probs, weights, noise) are float32; token rows use `dtype`.
// Every launcher returns the first CUDA error it hit (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace semoe {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// counts[e] = #{a < n : ids[a] == e}; ids outside [0, E) ignored. Deterministic.
cudaError_t expert_count(const int32_t* ids, int64_t n, int64_t num_experts, int32_t* counts,
                         cudaStream_t stream);

// Bytes of device scratch gate_dispatch needs for these sizes.
size_t gate_dispatch_workspace_bytes(int64_t tokens, int64_t num_experts, int64_t top_k);

// Fused softmax + top-k + random routing + capacity + positions + row permutation.
// noise: [T] float32 or nullptr. rows: [n_rows, D] of `dtype`; rows past the kept ones are
// zeroed. kept_rows (device, 1 int64) receives sum(counts).
cudaError_t gate_dispatch(const void* x, DType dtype, const float* logits, const float* noise,
                          int64_t tokens, int64_t hidden, int64_t num_experts, int64_t top_k,
                          int64_t capacity, bool normalize, int64_t n_rows, void* rows,
                          float* weights, int32_t* ids, int32_t* pos, int32_t* counts,
                          float* probs, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream);

// grad_rows / grad_weights / grad_probs may be nullptr (treated as zero).
cudaError_t gate_dispatch_grad(const float* probs, const float* weights, const int32_t* ids,
                               const int32_t* pos, const void* grad_rows, DType dtype,
                               const float* grad_weights, const float* grad_probs,
                               int64_t tokens, int64_t hidden, int64_t num_experts,
                               int64_t top_k, bool normalize, void* grad_x, float* grad_logits,
                               cudaStream_t stream);

// out[t] = sum_j weights[t,j] * rows[pos[t,j]] over pos >= 0 (fp32 accumulation).
cudaError_t combine(const void* rows, DType dtype, const float* weights, const int32_t* pos,
                    int64_t tokens, int64_t top_k, int64_t hidden, void* out,
                    cudaStream_t stream);

// grad_rows[pos[t,j]] = weights[t,j] * grad_out[t] (other rows zero, n_rows rows in all);
// grad_weights[t,j] = <grad_out[t], rows[pos[t,j]]>, 0 where pos < 0.
cudaError_t combine_grad(const void* rows, DType dtype, const float* weights,
                         const int32_t* pos, const void* grad_out, int64_t tokens,
                         int64_t top_k, int64_t hidden, int64_t n_rows, void* grad_rows,
                         float* grad_weights, cudaStream_t stream);

// Expert FFN element-wise parts (GEMMs go through cuBLAS in the binding).
// activation: 0 gelu, 1 gelu_tanh, 2 relu, 3 silu (semoe::Activation).
// h[r, c] += bias[expert_of_row(r), c]; a = act(h). Expert of a row from prefix counts.
cudaError_t bias_act_fwd(void* h, void* a, DType dtype, const void* bias, const int32_t* counts,
                         int64_t num_experts, int64_t rows, int64_t cols, int activation,
                         cudaStream_t stream);

// a = act(h); g = g * act'(h) over n elements.
cudaError_t act_bwd(const void* h, void* a, void* g, DType dtype, int64_t n, int activation,
                    cudaStream_t stream);

}  // namespace cuda
}  // namespace semoe
