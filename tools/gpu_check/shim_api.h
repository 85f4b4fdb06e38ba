/* C API of the gpu_check shim library, implemented twice with identical signatures:
 *   shim.cu      - over the CUDA launchers (the .cu files of custom_ops/cuda); device pointers
 *   shim_cpu.cc  - over the CPU kernels (semoe/routing_cpu.h, activation.h); pointers are host
 *                  memory ("--emulate-cpu": the same driver and checks, timings meaningless)
 * Both include this header, so the compiler keeps them in step.
 * Every int-returning function returns 0 on success, else an error code whose text
 * semoe_chk_error_string gives. All work goes to the default stream; dtype: 0 float32,
 * 1 float16, 2 bfloat16; activation: 0 gelu, 1 gelu_tanh, 2 relu, 3 silu. */
#ifndef SEMOE_GPU_CHECK_SHIM_API_H_
#define SEMOE_GPU_CHECK_SHIM_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- backend and memory */
int semoe_chk_backend(void); /* 0 = CUDA launchers, 1 = CPU emulation */
const char* semoe_chk_error_string(int code);
int semoe_chk_device_name(char* buf, int len);
int semoe_chk_malloc(uint64_t bytes, void** ptr);
int semoe_chk_free(void* ptr);
int semoe_chk_h2d(void* dst, const void* src, uint64_t bytes); /* synchronous */
int semoe_chk_d2h(void* dst, const void* src, uint64_t bytes); /* synchronous */
int semoe_chk_memset(void* ptr, int byte_value, uint64_t bytes);
int semoe_chk_d2d(void* dst, const void* src, uint64_t bytes);
int semoe_chk_synchronize(void); /* waits for the device; returns the first pending error */

/* ---- timing helpers */
int semoe_chk_spin(int64_t nanoseconds); /* keeps the device busy (no-op on the CPU) */
int semoe_chk_event_create(void** event);
int semoe_chk_event_record(void* event);
int semoe_chk_event_elapsed_ms(void* start, void* end, float* ms); /* synchronizes on end */
int semoe_chk_event_destroy(void* event);

/* ---- the launchers (see custom_ops/include/semoe/cuda_launchers.h) */
int semoe_chk_expert_count(const int32_t* ids, int64_t n, int64_t num_experts, int32_t* counts);
uint64_t semoe_chk_gate_dispatch_workspace_bytes(int64_t tokens, int64_t num_experts,
                                                 int64_t top_k);
int semoe_chk_gate_dispatch(const void* x, int dtype, const float* logits, const float* noise,
                            const float* bias, int bias_per_token, int64_t tokens,
                            int64_t hidden, int64_t num_experts, int64_t top_k,
                            int64_t capacity, int normalize, int score_fn, int capacity_rule,
                            int batch_priority, int64_t n_rows, void* rows, float* weights,
                            int32_t* ids, int32_t* pos, int32_t* counts, float* probs,
                            void* workspace, uint64_t workspace_bytes);
int semoe_chk_gate_dispatch_grad(const float* probs, const float* weights, const int32_t* ids,
                                 const int32_t* pos, const void* grad_rows, int dtype,
                                 const float* grad_weights, const float* grad_probs,
                                 int64_t tokens, int64_t hidden, int64_t num_experts,
                                 int64_t top_k, int normalize, int score_fn, void* grad_x,
                                 float* grad_logits);
int semoe_chk_combine(const void* rows, int dtype, const float* weights, const int32_t* pos,
                      int64_t tokens, int64_t top_k, int64_t hidden, void* out);
uint64_t semoe_chk_combine_grad_workspace_bytes(int64_t n_rows);
/* mode 0: workspace overload with `workspace` (NULL = zero-all-rows-first path);
 * mode 1: the overload without workspace (stream-ordered scratch). */
int semoe_chk_combine_grad(const void* rows, int dtype, const float* weights, const int32_t* pos,
                           const void* grad_out, int64_t tokens, int64_t top_k, int64_t hidden,
                           int64_t n_rows, void* grad_rows, float* grad_weights, void* workspace,
                           uint64_t workspace_bytes, int mode);
int semoe_chk_bias_act_fwd(void* h, void* a, int dtype, const void* bias, const int32_t* counts,
                           int64_t num_experts, int64_t rows, int64_t cols, int activation);
int semoe_chk_act_bwd(const void* h, void* a, void* g, int dtype, int64_t n, int activation);

/* ---- fused all-to-all (custom_ops/include/semoe/fused_a2a.h, a2a_layout.h)
 * permute_row_blocks: dst rows [dst_start[k], dst_start[k+1]) = src rows from src_start[k];
 *   src_start [num_blocks] and dst_start [num_blocks + 1] are HOST arrays.
 * a2a_simulate: the exchange of a whole EP group of P ranks on this device (a2a_sim.h): host
 *   threads run each rank's route (a2a::run_route), permutations through the launcher,
 *   exchanges as copies between the ranks' buffers. counts: host int64 [P, P*El]; x[r] /
 *   out[r]: rank r's input rows / output buffer of out_rows[r] rows; inverse: 0 dispatch,
 *   1 combine. On failure semoe_chk_last_message() says why. */
int semoe_chk_permute_row_blocks(const void* src, void* dst, int64_t row_bytes,
                                 const int64_t* src_start, const int64_t* dst_start,
                                 int64_t num_blocks);
int semoe_chk_a2a_simulate(const int64_t* counts, int64_t P, int64_t El, int64_t node_size,
                           int hierarchical, int inverse, const uint64_t* x, const uint64_t* out,
                           const int64_t* out_rows, int64_t row_bytes);
/* nccl_smoke: the NCCL layer of the fused all-to-all (fused_a2a_nccl.cu) on this one GPU as a
 *   one-rank group: load NCCL (`library`: a libnccl.so.2 path or ""), unique id,
 *   ncclCommInitRank, ncclAllGather of int32 and int64 counts, `rows` rows of row_bytes sent to
 *   itself through one grouped ncclSend/ncclRecv, a one-rank dispatch + combine through
 *   a2a::run_route, the host wait, ncclCommDestroy; every result compared. *skipped = 1 (and
 *   0 returned) when built without nccl.h or NCCL cannot be loaded. */
int semoe_chk_nccl_smoke(const char* library, int64_t rows, int64_t row_bytes, int* skipped);
const char* semoe_chk_last_message(void); /* text of the last a2a_simulate / nccl_smoke */

#ifdef __cplusplus
}
#endif

#endif /* SEMOE_GPU_CHECK_SHIM_API_H_ */
