// gpu_check shim over the CUDA launchers: the C API of shim_api.h for ctypes.
// Built by tools/gpu_check/build.py together with custom_ops/cuda/*.cu into one shared
// library. Pointers are device pointers; everything runs on the default stream.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include "semoe/cuda_launchers.h"
#include "shim_api.h"

namespace {

using semoe::cuda::DType;

int code(cudaError_t e) { return static_cast<int>(e); }

// Launch wrappers report both the launcher's result and any error already pending.
int launched(cudaError_t e) {
  if (e != cudaSuccess) return code(e);
  return code(cudaPeekAtLastError());
}

bool valid_dtype(int d) { return d >= 0 && d <= 2; }

// Busy-waits on the global nanosecond timer (keeps the GPU occupied while the host enqueues).
__global__ void spin_kernel(long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < static_cast<unsigned long long>(ns));
}

}  // namespace

extern "C" {

int semoe_chk_backend(void) { return 0; }

const char* semoe_chk_error_string(int c) {
  return cudaGetErrorString(static_cast<cudaError_t>(c));
}

int semoe_chk_device_name(char* buf, int len) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return code(e);
  cudaDeviceProp prop;
  e = cudaGetDeviceProperties(&prop, dev);
  if (e != cudaSuccess) return code(e);
  std::snprintf(buf, static_cast<size_t>(len), "%s (sm_%d%d, %d SMs, %.0f MiB)", prop.name,
                prop.major, prop.minor, prop.multiProcessorCount,
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0));
  return 0;
}

int semoe_chk_malloc(uint64_t bytes, void** ptr) {
  return code(cudaMalloc(ptr, bytes > 0 ? bytes : 1));
}
int semoe_chk_free(void* ptr) { return code(cudaFree(ptr)); }
int semoe_chk_h2d(void* dst, const void* src, uint64_t bytes) {
  return code(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
int semoe_chk_d2h(void* dst, const void* src, uint64_t bytes) {
  return code(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
int semoe_chk_memset(void* ptr, int byte_value, uint64_t bytes) {
  return code(cudaMemsetAsync(ptr, byte_value, bytes, 0));
}
int semoe_chk_d2d(void* dst, const void* src, uint64_t bytes) {
  return code(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
}
int semoe_chk_synchronize(void) {
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) return code(e);
  return code(cudaGetLastError());
}

int semoe_chk_spin(int64_t nanoseconds) {
  spin_kernel<<<1, 1, 0, 0>>>(static_cast<long long>(nanoseconds));
  return code(cudaGetLastError());
}
int semoe_chk_event_create(void** event) {
  return code(cudaEventCreate(reinterpret_cast<cudaEvent_t*>(event)));
}
int semoe_chk_event_record(void* event) {
  return code(cudaEventRecord(static_cast<cudaEvent_t>(event), 0));
}
int semoe_chk_event_elapsed_ms(void* start, void* end, float* ms) {
  const cudaError_t e = cudaEventSynchronize(static_cast<cudaEvent_t>(end));
  if (e != cudaSuccess) return code(e);
  return code(cudaEventElapsedTime(ms, static_cast<cudaEvent_t>(start),
                                   static_cast<cudaEvent_t>(end)));
}
int semoe_chk_event_destroy(void* event) {
  return code(cudaEventDestroy(static_cast<cudaEvent_t>(event)));
}

int semoe_chk_expert_count(const int32_t* ids, int64_t n, int64_t num_experts, int32_t* counts) {
  return launched(semoe::cuda::expert_count(ids, n, num_experts, counts, 0));
}

uint64_t semoe_chk_gate_dispatch_workspace_bytes(int64_t tokens, int64_t num_experts,
                                                 int64_t top_k) {
  return semoe::cuda::gate_dispatch_workspace_bytes(tokens, num_experts, top_k);
}

int semoe_chk_gate_dispatch(const void* x, int dtype, const float* logits, const float* noise,
                            int64_t tokens, int64_t hidden, int64_t num_experts, int64_t top_k,
                            int64_t capacity, int normalize, int64_t n_rows, void* rows,
                            float* weights, int32_t* ids, int32_t* pos, int32_t* counts,
                            float* probs, void* workspace, uint64_t workspace_bytes) {
  if (!valid_dtype(dtype)) return code(cudaErrorInvalidValue);
  return launched(semoe::cuda::gate_dispatch(
      x, static_cast<DType>(dtype), logits, noise, tokens, hidden, num_experts, top_k, capacity,
      normalize != 0, n_rows, rows, weights, ids, pos, counts, probs, workspace,
      static_cast<size_t>(workspace_bytes), 0));
}

int semoe_chk_gate_dispatch_grad(const float* probs, const float* weights, const int32_t* ids,
                                 const int32_t* pos, const void* grad_rows, int dtype,
                                 const float* grad_weights, const float* grad_probs,
                                 int64_t tokens, int64_t hidden, int64_t num_experts,
                                 int64_t top_k, int normalize, void* grad_x, float* grad_logits) {
  if (!valid_dtype(dtype)) return code(cudaErrorInvalidValue);
  return launched(semoe::cuda::gate_dispatch_grad(
      probs, weights, ids, pos, grad_rows, static_cast<DType>(dtype), grad_weights, grad_probs,
      tokens, hidden, num_experts, top_k, normalize != 0, grad_x, grad_logits, 0));
}

int semoe_chk_combine(const void* rows, int dtype, const float* weights, const int32_t* pos,
                      int64_t tokens, int64_t top_k, int64_t hidden, void* out) {
  if (!valid_dtype(dtype)) return code(cudaErrorInvalidValue);
  return launched(semoe::cuda::combine(rows, static_cast<DType>(dtype), weights, pos, tokens,
                                       top_k, hidden, out, 0));
}

uint64_t semoe_chk_combine_grad_workspace_bytes(int64_t n_rows) {
  return semoe::cuda::combine_grad_workspace_bytes(n_rows);
}

int semoe_chk_combine_grad(const void* rows, int dtype, const float* weights, const int32_t* pos,
                           const void* grad_out, int64_t tokens, int64_t top_k, int64_t hidden,
                           int64_t n_rows, void* grad_rows, float* grad_weights, void* workspace,
                           uint64_t workspace_bytes, int mode) {
  if (!valid_dtype(dtype)) return code(cudaErrorInvalidValue);
  const DType dt = static_cast<DType>(dtype);
  if (mode == 1) {
    return launched(semoe::cuda::combine_grad(rows, dt, weights, pos, grad_out, tokens, top_k,
                                              hidden, n_rows, grad_rows, grad_weights, 0));
  }
  return launched(semoe::cuda::combine_grad(rows, dt, weights, pos, grad_out, tokens, top_k,
                                            hidden, n_rows, grad_rows, grad_weights, workspace,
                                            static_cast<size_t>(workspace_bytes), 0));
}

int semoe_chk_bias_act_fwd(void* h, void* a, int dtype, const void* bias, const int32_t* counts,
                           int64_t num_experts, int64_t rows, int64_t cols, int activation) {
  if (!valid_dtype(dtype)) return code(cudaErrorInvalidValue);
  return launched(semoe::cuda::bias_act_fwd(h, a, static_cast<DType>(dtype), bias, counts,
                                            num_experts, rows, cols, activation, 0));
}

int semoe_chk_act_bwd(const void* h, void* a, void* g, int dtype, int64_t n, int activation) {
  if (!valid_dtype(dtype)) return code(cudaErrorInvalidValue);
  return launched(
      semoe::cuda::act_bwd(h, a, g, static_cast<DType>(dtype), n, activation, 0));
}

}  // extern "C"
