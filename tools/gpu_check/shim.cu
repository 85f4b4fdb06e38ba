// gpu_check shim over the CUDA launchers: the C API of shim_api.h for ctypes.
// Built by tools/gpu_check/build.py together with custom_ops/cuda/*.cu into one shared
// library. Pointers are device pointers; everything runs on the default stream, except the
// simulated exchange (a2a_sim.h), whose rank threads each use a stream of their own.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "a2a_sim.h"
#include "semoe/cuda_launchers.h"
#include "semoe/fused_a2a.h"
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

std::string cuda_message(const char* what, cudaError_t e) {
  return e == cudaSuccess ? "" : std::string(what) + ": " + cudaGetErrorString(e);
}

// Device of a2a_sim.h: the CUDA launcher and async copies on a stream of this rank thread.
class CudaDevice {
 public:
  explicit CudaDevice(int device) {
    ok_ = cudaSetDevice(device) == cudaSuccess &&
          cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking) == cudaSuccess;
  }
  ~CudaDevice() {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  std::string permute(const semoe::a2a::BlockPermutation& bp, const void* src, void* dst,
                      int64_t row_bytes) {
    if (!ok_) return "could not create a stream";
    return cuda_message("permute_row_blocks",
                        semoe::cuda::permute_row_blocks(src, dst, row_bytes, bp.src.data(),
                                                        bp.dst.data(), bp.num_blocks(), stream_));
  }
  std::string copy(void* dst, const void* src, size_t bytes) {
    if (bytes == 0) return "";
    return cuda_message("cudaMemcpyAsync",
                        cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  std::string zero(void* dst, size_t bytes) {
    if (bytes == 0) return "";
    return cuda_message("cudaMemsetAsync", cudaMemsetAsync(dst, 0, bytes, stream_));
  }
  std::string sync() {
    if (!ok_) return "could not create a stream";
    return cuda_message("cudaStreamSynchronize", cudaStreamSynchronize(stream_));
  }
  std::string alloc(size_t bytes, void** p) {
    return cuda_message("cudaMalloc", cudaMalloc(p, bytes > 0 ? bytes : 1));
  }
  void release(void* p) { cudaFree(p); }

 private:
  cudaStream_t stream_ = nullptr;
  bool ok_ = false;
};

std::string g_last_message;

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
                            const float* bias, int bias_per_token, int64_t tokens,
                            int64_t hidden, int64_t num_experts, int64_t top_k,
                            int64_t capacity, int normalize, int score_fn, int capacity_rule,
                            int batch_priority, int64_t n_rows, void* rows, float* weights,
                            int32_t* ids, int32_t* pos, int32_t* counts, float* probs,
                            void* workspace, uint64_t workspace_bytes) {
  if (!valid_dtype(dtype)) return code(cudaErrorInvalidValue);
  return launched(semoe::cuda::gate_dispatch(
      x, static_cast<DType>(dtype), logits, noise, bias, bias_per_token != 0, tokens, hidden,
      num_experts, top_k, capacity, normalize != 0, score_fn, capacity_rule,
      batch_priority != 0, n_rows, rows, weights, ids, pos,
      counts, probs, workspace, static_cast<size_t>(workspace_bytes), 0));
}

int semoe_chk_gate_dispatch_grad(const float* probs, const float* weights, const int32_t* ids,
                                 const int32_t* pos, const void* grad_rows, int dtype,
                                 const float* grad_weights, const float* grad_probs,
                                 int64_t tokens, int64_t hidden, int64_t num_experts,
                                 int64_t top_k, int normalize, int score_fn, void* grad_x,
                                 float* grad_logits) {
  if (!valid_dtype(dtype)) return code(cudaErrorInvalidValue);
  return launched(semoe::cuda::gate_dispatch_grad(
      probs, weights, ids, pos, grad_rows, static_cast<DType>(dtype), grad_weights, grad_probs,
      tokens, hidden, num_experts, top_k, normalize != 0, score_fn, grad_x, grad_logits, 0));
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

int semoe_chk_permute_row_blocks(const void* src, void* dst, int64_t row_bytes,
                                 const int64_t* src_start, const int64_t* dst_start,
                                 int64_t num_blocks) {
  return launched(semoe::cuda::permute_row_blocks(src, dst, row_bytes, src_start, dst_start,
                                                  num_blocks, 0));
}

int semoe_chk_a2a_simulate(const int64_t* counts, int64_t P, int64_t El, int64_t node_size,
                           int hierarchical, int inverse, const uint64_t* x, const uint64_t* out,
                           const int64_t* out_rows, int64_t row_bytes) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return code(e);
  e = cudaDeviceSynchronize();  // inputs written on the default stream are complete
  if (e != cudaSuccess) return code(e);
  std::vector<const void*> xs(static_cast<size_t>(P > 0 ? P : 0));
  std::vector<void*> outs(xs.size());
  for (size_t r = 0; r < xs.size(); ++r) {
    xs[r] = reinterpret_cast<const void*>(static_cast<uintptr_t>(x[r]));
    outs[r] = reinterpret_cast<void*>(static_cast<uintptr_t>(out[r]));
  }
  g_last_message = semoe_chk::simulate<CudaDevice>(
      counts, P, El, node_size, hierarchical != 0, inverse != 0, xs.data(), outs.data(), out_rows,
      row_bytes, [device] { return std::make_unique<CudaDevice>(device); });
  if (!g_last_message.empty()) return code(cudaErrorInvalidValue);
  return code(cudaGetLastError());
}

namespace {

// The body of semoe_chk_nccl_smoke: "" on success.
std::string nccl_smoke(int64_t rows, int64_t row_bytes, cudaStream_t s,
                       semoe::nccl::Comm* comm, std::vector<void*>* allocs) {
  namespace nccl = semoe::nccl;
  namespace a2a = semoe::a2a;
  auto dev_alloc = [&](size_t bytes) {
    void* p = nullptr;
    if (cudaMalloc(&p, bytes > 0 ? bytes : 1) != cudaSuccess) return static_cast<void*>(nullptr);
    allocs->push_back(p);
    return p;
  };
  int device = 0;
  std::string err = cuda_message("cudaGetDevice", cudaGetDevice(&device));
  char id[nccl::kUniqueIdBytes];
  if (err.empty()) err = nccl::get_unique_id(id);
  if (err.empty()) err = nccl::comm_init(id, 1, 0, device, comm);
  if (!err.empty()) return err;
  // counts all-gather, both integer widths
  const int32_t c32[5] = {3, 0, 7, 1, 2};
  const int64_t c64[5] = {3, 0, 7, 1, int64_t{1} << 40};
  for (int wide = 0; wide < 2; ++wide) {
    const size_t bytes = wide ? sizeof(c64) : sizeof(c32);
    void* in = dev_alloc(bytes);
    void* out = dev_alloc(bytes);
    if (in == nullptr || out == nullptr) return "cudaMalloc failed";
    err = cuda_message("upload", cudaMemcpy(in, wide ? static_cast<const void*>(c64)
                                                     : static_cast<const void*>(c32),
                                            bytes, cudaMemcpyHostToDevice));
    if (err.empty()) err = cuda_message("poison", cudaMemset(out, 0x7B, bytes));
    if (err.empty()) {
      err = nccl::all_gather(*comm, in, out, 5,
                             wide ? nccl::CountType::kInt64 : nccl::CountType::kInt32, s);
    }
    if (err.empty()) err = nccl::wait(*comm, s, 60000);
    std::vector<char> got(bytes);
    if (err.empty()) err = cuda_message("download", cudaMemcpy(got.data(), out, bytes, cudaMemcpyDeviceToHost));
    if (err.empty() && std::memcmp(got.data(), wide ? static_cast<const void*>(c64)
                                                    : static_cast<const void*>(c32), bytes) != 0) {
      err = std::string("ncclAllGather of ") + (wide ? "int64" : "int32") + " counts: wrong result";
    }
    if (!err.empty()) return err;
  }
  // rows to itself through ncclSend/ncclRecv
  const size_t bytes = static_cast<size_t>(rows * row_bytes);
  std::vector<unsigned char> host(bytes);
  for (size_t i = 0; i < bytes; ++i) host[i] = static_cast<unsigned char>((i * 131 + 7) & 0xff);
  void* x = dev_alloc(bytes);
  void* y = dev_alloc(bytes);
  if (x == nullptr || y == nullptr) return "cudaMalloc failed";
  err = cuda_message("upload", cudaMemcpy(x, host.data(), bytes, cudaMemcpyHostToDevice));
  if (err.empty()) err = cuda_message("poison", cudaMemset(y, 0x7B, bytes));
  a2a::Exchange self;
  self.splits = {rows};
  nccl::RouteBackend via_nccl(*comm, s, /*self_via_nccl=*/true);
  if (err.empty()) err = via_nccl.exchange(self, x, y, row_bytes);
  if (err.empty()) err = nccl::wait(*comm, s, 60000);
  std::vector<unsigned char> got(bytes);
  if (err.empty()) err = cuda_message("download", cudaMemcpy(got.data(), y, bytes, cudaMemcpyDeviceToHost));
  if (err.empty() && got != host) err = "ncclSend/ncclRecv to itself: rows differ";
  if (!err.empty()) return err;
  // a one-rank dispatch and combine (3 local experts, 2 padding rows) through run_route
  const int64_t C[3] = {rows / 2, 0, rows - rows / 2};
  a2a::Plan plan;
  err = a2a::make_plan(C, 1, 3, 0, 1, false, &plan);
  nccl::RouteBackend backend(*comm, s);
  void* back = dev_alloc(bytes + 2 * row_bytes);
  if (back == nullptr) return "cudaMalloc failed";
  if (err.empty()) {
    err = a2a::run_route(backend, plan.dispatch, x, y, rows, row_bytes, nullptr,
                         a2a::route_workspace_bytes(plan.dispatch, row_bytes));
  }
  if (err.empty()) {
    err = a2a::run_route(backend, plan.combine, y, back, rows + 2, row_bytes, nullptr,
                         a2a::route_workspace_bytes(plan.combine, row_bytes));
  }
  if (err.empty()) err = nccl::wait(*comm, s, 60000);
  std::vector<unsigned char> round(bytes + 2 * row_bytes);
  if (err.empty()) err = cuda_message("download", cudaMemcpy(round.data(), back, round.size(), cudaMemcpyDeviceToHost));
  if (err.empty()) {
    const bool same = std::memcmp(round.data(), host.data(), bytes) == 0;
    bool zero_tail = true;
    for (size_t i = bytes; i < round.size(); ++i) zero_tail &= round[i] == 0;
    if (!same || !zero_tail) err = "one-rank dispatch + combine did not return the rows (+ zero padding)";
  }
  return err;
}

}  // namespace

int semoe_chk_nccl_smoke(const char* library, int64_t rows, int64_t row_bytes, int* skipped) {
  *skipped = 0;
  if (rows < 2 || row_bytes < 1) return code(cudaErrorInvalidValue);
  if (semoe::nccl::compiled_version() == 0) {
    *skipped = 1;
    g_last_message = "the shim was built without nccl.h (install an nvidia-nccl-cu* wheel)";
    return 0;
  }
  int runtime = 0;
  std::string err = semoe::nccl::load(library != nullptr ? library : "", &runtime);
  if (!err.empty()) {
    *skipped = 1;
    g_last_message = err;
    return 0;
  }
  cudaStream_t s = nullptr;
  cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (e != cudaSuccess) return code(e);
  semoe::nccl::Comm comm = nullptr;
  std::vector<void*> allocs;
  err = nccl_smoke(rows, row_bytes, s, &comm, &allocs);
  if (comm != nullptr) {
    const std::string destroyed = semoe::nccl::comm_destroy(comm, !err.empty());
    if (err.empty()) err = destroyed;
  }
  cudaStreamSynchronize(s);
  for (void* p : allocs) cudaFree(p);
  cudaStreamDestroy(s);
  g_last_message = err.empty()
                       ? "NCCL " + std::to_string(runtime) + " (header " +
                             std::to_string(semoe::nccl::compiled_version()) +
                             "): one-rank communicator, all-gather int32/int64, grouped "
                             "send/recv to itself, dispatch + combine: ok"
                       : err;
  return err.empty() ? 0 : code(cudaErrorUnknown);
}

const char* semoe_chk_last_message(void) { return g_last_message.c_str(); }

}  // extern "C"
