// GPU path of semoe_grouped_ffn (declared in custom_ops/cpu/grouped_ffn_gpu.h).
// Per expert e with n_e = counts[e] > 0 rows at offset off_e (exclusive prefix sum):
//   forward:  h_e = x_e W1[e]            (Paddle matmul -> cuBLAS), copied into hidden_pre
//             h += b1[expert], a = act(h) (bias_act_fwd launcher, all used rows at once)
//             y_e = a_e W2[e] + b2[e]     (Paddle matmul + add), copied into out
//   backward: dA = gy W2^T; a = act(h), dH = dA * act'(h) (act_bwd launcher);
//             dW2 = a^T gy, db2 = colsum(gy), dW1 = x^T dH, db1 = colsum(dH), dx = dH W1^T
// Rows past sum(counts) get zeros; experts with no rows get zero weight gradients.
// Copies and memsets run on the tensors' stream, the one Paddle's own ops use.
#ifdef PADDLE_WITH_CUDA

#include "grouped_ffn_gpu.h"

#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "semoe/activation.h"
#include "semoe/cuda_launchers.h"

namespace semoe {
namespace {

using paddle::DataType;
using paddle::Tensor;

constexpr const char* kOp = "semoe_grouped_ffn";
constexpr const char* kGradOp = "semoe_grouped_ffn_grad";

#define SEMOE_GPU_OK(expr, op, what)                                                    \
  do {                                                                                  \
    const cudaError_t err_ = (expr);                                                    \
    PD_CHECK(err_ == cudaSuccess, op, ": ", what, " failed: ", cudaGetErrorString(err_)); \
  } while (0)

cuda::DType launcher_dtype(const char* op, DataType d) {
  if (d == DataType::FLOAT32) return cuda::DType::kFloat32;
  if (d == DataType::FLOAT16) return cuda::DType::kFloat16;
  if (d == DataType::BFLOAT16) return cuda::DType::kBFloat16;
  PD_THROW(op, ": argument 'x' must be float32, float16 or bfloat16 on GPU, got ", d);
}

int activation_code(const char* op, const std::string& name) {
  Activation a;
  PD_CHECK(parse_activation(name, &a), op, ": unknown activation '", name,
           "' (expected gelu, gelu_tanh, relu or silu)");
  return static_cast<int>(a);
}

// counts copied to the host (blocking) and validated: non-negative, sum <= R.
std::vector<int32_t> counts_on_host(const char* op, const Tensor& counts, int64_t R) {
  const Tensor c = counts.is_cpu() ? counts : counts.copy_to(paddle::CPUPlace(), true);
  std::vector<int32_t> out(c.data<int32_t>(), c.data<int32_t>() + c.numel());
  int64_t total = 0;
  for (size_t e = 0; e < out.size(); ++e) {
    PD_CHECK(out[e] >= 0, op, ": counts[", e, "] = ", out[e], " is negative");
    total += out[e];
  }
  PD_CHECK(total <= R, op, ": sum(counts) = ", total, " exceeds the ", R, " rows of 'x'");
  return out;
}

// Expert e's [rows, cols] matrix of a stacked [E, rows, cols] tensor (a view).
Tensor expert_matrix(const Tensor& w, int64_t e, int64_t rows, int64_t cols) {
  return paddle::experimental::reshape(w.slice(e, e + 1), {rows, cols});
}

// dst <- src, both contiguous with the same number of elements (device to device).
void copy_into(const char* op, Tensor dst, const Tensor& src, cudaStream_t stream) {
  PD_CHECK(dst.numel() == src.numel(), op, ": internal size mismatch (", dst.numel(), " vs ",
           src.numel(), ")");
  const size_t bytes = static_cast<size_t>(src.numel()) * phi::SizeOf(src.dtype());
  if (bytes == 0) return;
  SEMOE_GPU_OK(cudaMemcpyAsync(dst.data(), src.data(), bytes,
                               cudaMemcpyDeviceToDevice, stream),
               op, "cudaMemcpyAsync");
}

// Zeroes rows [begin, end) of a 2-D or 3-D tensor (slices on the first dimension).
void zero_rows(const char* op, const Tensor& t, int64_t begin, int64_t end, cudaStream_t stream) {
  if (end <= begin) return;
  Tensor view = t.slice(begin, end);
  const size_t bytes = static_cast<size_t>(view.numel()) * phi::SizeOf(view.dtype());
  if (bytes == 0) return;
  SEMOE_GPU_OK(cudaMemsetAsync(view.data(), 0, bytes, stream), op,
               "cudaMemsetAsync");
}

// counts as a device int32 tensor on x's place (the launcher reads them there).
Tensor counts_on_device(const Tensor& counts, const Tensor& x) {
  return counts.is_gpu() && counts.place() == x.place() ? counts : counts.copy_to(x.place(), false);
}

}  // namespace

std::vector<Tensor> GroupedFfnGpu(const Tensor& x, const Tensor& counts, const Tensor& w1,
                                  const Tensor& b1, const Tensor& w2, const Tensor& b2,
                                  const std::string& activation) {
  const cuda::DType dt = launcher_dtype(kOp, x.dtype());
  const int act = activation_code(kOp, activation);
  const int64_t R = x.shape()[0], D = x.shape()[1], E = w1.shape()[0], F = w1.shape()[2];
  const std::vector<int32_t> c = counts_on_host(kOp, counts, R);
  const cudaStream_t stream = x.stream();

  Tensor out = paddle::empty({R, D}, x.dtype(), x.place());
  Tensor hidden = paddle::empty({R, F}, x.dtype(), x.place());
  int64_t used = 0;
  for (int32_t n : c) used += n;

  if (used > 0) {
    // 1) h_e = x_e W1[e] into hidden_pre's rows of expert e.
    int64_t off = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = c[e];
      if (n > 0) {
        const Tensor h_e = paddle::experimental::matmul(x.slice(off, off + n),
                                                        expert_matrix(w1, e, D, F));
        copy_into(kOp, hidden.slice(off, off + n), h_e, stream);
      }
      off += n;
    }
    // 2) h += b1[expert of row]; a = act(h), over all used rows at once.
    Tensor a = paddle::empty({used, F}, x.dtype(), x.place());
    const Tensor dev_counts = counts_on_device(counts, x);
    SEMOE_GPU_OK(cuda::bias_act_fwd(hidden.data(), a.data(), dt, b1.data(),
                                    dev_counts.data<int32_t>(), E, used, F, act, stream),
                 kOp, "bias_act_fwd");
    // 3) y_e = a_e W2[e] + b2[e] into out's rows of expert e.
    off = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = c[e];
      if (n > 0) {
        const Tensor y_e = paddle::experimental::add(
            paddle::experimental::matmul(a.slice(off, off + n), expert_matrix(w2, e, F, D)),
            b2.slice(e, e + 1));  // [n, D] + [1, D]
        copy_into(kOp, out.slice(off, off + n), y_e, stream);
      }
      off += n;
    }
  }
  zero_rows(kOp, out, used, R, stream);
  zero_rows(kOp, hidden, used, R, stream);
  return {out, hidden};
}

std::vector<Tensor> GroupedFfnGradGpu(const Tensor& x, const Tensor& counts, const Tensor& w1,
                                      const Tensor& w2, const Tensor& hidden_pre,
                                      const Tensor& grad_out, const std::string& activation) {
  const cuda::DType dt = launcher_dtype(kGradOp, x.dtype());
  const int act = activation_code(kGradOp, activation);
  const int64_t R = x.shape()[0], D = x.shape()[1], E = w1.shape()[0], F = w1.shape()[2];
  const std::vector<int32_t> c = counts_on_host(kGradOp, counts, R);
  const cudaStream_t stream = x.stream();
  const auto place = x.place();
  const DataType dtype = x.dtype();

  Tensor grad_x = paddle::empty({R, D}, dtype, place);
  Tensor grad_w1 = paddle::empty({E, D, F}, dtype, place);
  Tensor grad_b1 = paddle::empty({E, F}, dtype, place);
  Tensor grad_w2 = paddle::empty({E, F, D}, dtype, place);
  Tensor grad_b2 = paddle::empty({E, D}, dtype, place);

  int64_t off = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = c[e];
    if (n == 0) {
      zero_rows(kGradOp, grad_w1, e, e + 1, stream);
      zero_rows(kGradOp, grad_b1, e, e + 1, stream);
      zero_rows(kGradOp, grad_w2, e, e + 1, stream);
      zero_rows(kGradOp, grad_b2, e, e + 1, stream);
      continue;
    }
    const Tensor x_e = x.slice(off, off + n);
    const Tensor h_e = hidden_pre.slice(off, off + n);
    const Tensor gy = grad_out.slice(off, off + n);
    const Tensor w1_e = expert_matrix(w1, e, D, F);
    const Tensor w2_e = expert_matrix(w2, e, F, D);
    // dA = gy W2^T [n, F]; then a = act(h) and dA <- dH = dA * act'(h) in one pass.
    Tensor d_h = paddle::experimental::matmul(gy, w2_e, false, true);
    Tensor a_e = paddle::empty({n, F}, dtype, place);
    SEMOE_GPU_OK(cuda::act_bwd(h_e.data(), a_e.data(), d_h.data(), dt, n * F, act, stream),
                 kGradOp, "act_bwd");
    copy_into(kGradOp, grad_w2.slice(e, e + 1),
              paddle::experimental::matmul(a_e, gy, true, false), stream);
    copy_into(kGradOp, grad_b2.slice(e, e + 1), paddle::experimental::sum(gy, {0}, dtype, false),
              stream);
    copy_into(kGradOp, grad_w1.slice(e, e + 1),
              paddle::experimental::matmul(x_e, d_h, true, false), stream);
    copy_into(kGradOp, grad_b1.slice(e, e + 1), paddle::experimental::sum(d_h, {0}, dtype, false),
              stream);
    copy_into(kGradOp, grad_x.slice(off, off + n),
              paddle::experimental::matmul(d_h, w1_e, false, true), stream);
    off += n;
  }
  zero_rows(kGradOp, grad_x, off, R, stream);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace semoe

#endif  // PADDLE_WITH_CUDA
