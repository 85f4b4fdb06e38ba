// Paddle binding of semoe_grouped_ffn: the expert FFN over expert-major rows.
//   out[rows of e] = act(x_e @ w1[e] + b1[e]) @ w2[e] + b2[e]
// CPU: GEMMs through oneDNN/cblas (semoe/cpu_gemm.h), fused bias+activation passes.
// GPU: GEMMs through Paddle's matmul (cuBLAS) per expert, element-wise parts by launchers.
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "paddle/extension.h"
#include "semoe/grouped_ffn_cpu.h"

#ifdef PADDLE_WITH_CUDA
#include "grouped_ffn_gpu.h"
#endif

namespace {

using paddle::DataType;
using paddle::Tensor;

constexpr const char* kOp = "semoe_grouped_ffn";

semoe::Activation activation_of(const std::string& name) {
  semoe::Activation a;
  PD_CHECK(semoe::parse_activation(name, &a), kOp, ": unknown activation '", name,
           "' (expected gelu, gelu_tanh, relu or silu)");
  return a;
}

struct Dims {
  int64_t R, D, F, E;
};

Dims check_inputs(const Tensor& x, const Tensor& counts, const Tensor& w1, const Tensor& b1,
                  const Tensor& w2, const Tensor& b2) {
  PD_CHECK(x.dtype() == DataType::FLOAT32 || x.is_gpu(), kOp,
           ": argument 'x' must be float32 on CPU, got ", x.dtype());
  PD_CHECK(x.shape().size() == 2, kOp, ": argument 'x' must have shape [R, D], got ",
           semoe::shape_str(x.shape()));
  PD_CHECK(counts.dtype() == DataType::INT32 && counts.shape().size() == 1, kOp,
           ": argument 'counts' must be int32 [E], got ", counts.dtype(), " ",
           semoe::shape_str(counts.shape()));
  const int64_t R = x.shape()[0], D = x.shape()[1], E = counts.shape()[0];
  PD_CHECK(w1.shape().size() == 3 && w1.shape()[0] == E && w1.shape()[1] == D, kOp,
           ": argument 'w1' must have shape [E=", E, ", D=", D, ", F], got ",
           semoe::shape_str(w1.shape()));
  const int64_t F = w1.shape()[2];
  const std::vector<int64_t> want_b1 = {E, F}, want_w2 = {E, F, D}, want_b2 = {E, D};
  PD_CHECK(b1.shape() == want_b1, kOp, ": argument 'b1' must have shape ",
           semoe::shape_str(want_b1), ", got ", semoe::shape_str(b1.shape()));
  PD_CHECK(w2.shape() == want_w2, kOp, ": argument 'w2' must have shape ",
           semoe::shape_str(want_w2), ", got ", semoe::shape_str(w2.shape()));
  PD_CHECK(b2.shape() == want_b2, kOp, ": argument 'b2' must have shape ",
           semoe::shape_str(want_b2), ", got ", semoe::shape_str(b2.shape()));
  for (const auto* t : {&w1, &b1, &w2, &b2}) {
    PD_CHECK(t->dtype() == x.dtype(), kOp, ": expert weights must have the dtype of 'x' (",
             x.dtype(), "), got ", t->dtype());
    semoe::check_same_place(kOp, "expert weights", *t, x);
  }
  return {R, D, F, E};
}

// counts on the host (copied from the device when needed), validated against R.
std::vector<int32_t> host_counts(const Tensor& counts, int64_t R) {
  Tensor c = counts.is_cpu() ? counts : counts.copy_to(paddle::CPUPlace(), true);
  std::vector<int32_t> out(c.data<int32_t>(), c.data<int32_t>() + c.numel());
  int64_t total = 0;
  for (size_t e = 0; e < out.size(); ++e) {
    PD_CHECK(out[e] >= 0, kOp, ": counts[", e, "] = ", out[e], " is negative");
    total += out[e];
  }
  PD_CHECK(total <= R, kOp, ": sum(counts) = ", total, " exceeds the ", R, " rows of 'x'");
  return out;
}

template <typename Fn>
void with_activation(semoe::Activation a, Fn&& fn) {
  switch (a) {
    case semoe::Activation::kGelu: fn(std::integral_constant<int, 0>{}); break;
    case semoe::Activation::kGeluTanh: fn(std::integral_constant<int, 1>{}); break;
    case semoe::Activation::kRelu: fn(std::integral_constant<int, 2>{}); break;
    case semoe::Activation::kSilu: fn(std::integral_constant<int, 3>{}); break;
  }
}

std::vector<Tensor> GroupedFfn(const Tensor& x, const Tensor& counts, const Tensor& w1,
                               const Tensor& b1, const Tensor& w2, const Tensor& b2,
                               const std::string& activation) {
  const semoe::Activation act = activation_of(activation);
  const Dims d = check_inputs(x, counts, w1, b1, w2, b2);
  if (x.is_gpu()) {
#ifdef PADDLE_WITH_CUDA
    return semoe::GroupedFfnGpu(x, counts, w1, b1, w2, b2, activation);
#else
    PD_THROW(kOp, ": GPU tensor given but the op library was built without CUDA");
#endif
  }
  const std::vector<int32_t> c = host_counts(counts, d.R);
  Tensor out = paddle::empty({d.R, d.D}, x.dtype(), x.place());
  Tensor hidden = paddle::empty({d.R, d.F}, x.dtype(), x.place());
  const semoe::SgemmFn gemm = semoe::cpu_gemm().fn;
  with_activation(act, [&](auto tag) {
    constexpr auto A = static_cast<semoe::Activation>(decltype(tag)::value);
    semoe::grouped_ffn_fwd_cpu<A>(gemm, x.data<float>(), c.data(), w1.data<float>(),
                                  b1.data<float>(), w2.data<float>(), b2.data<float>(), d.R, d.E,
                                  d.D, d.F, out.data<float>(), hidden.data<float>());
  });
  return {out, hidden};
}

std::vector<std::vector<int64_t>> GroupedFfnShape(
    const std::vector<int64_t>& x, const std::vector<int64_t>&, const std::vector<int64_t>& w1,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::string&) {
  return {{x[0], x[1]}, {x[0], w1[2]}};
}

std::vector<DataType> GroupedFfnDtype(const DataType& x, const DataType&, const DataType&,
                                      const DataType&, const DataType&, const DataType&) {
  return {x, x};
}

std::vector<Tensor> GroupedFfnGrad(const Tensor& x, const Tensor& counts, const Tensor& w1,
                                   const Tensor& w2, const Tensor& hidden_pre,
                                   const Tensor& grad_out, const std::string& activation) {
  const semoe::Activation act = activation_of(activation);
  if (x.is_gpu()) {
#ifdef PADDLE_WITH_CUDA
    return semoe::GroupedFfnGradGpu(x, counts, w1, w2, hidden_pre, grad_out, activation);
#else
    PD_THROW(kOp, ": GPU tensor given but the op library was built without CUDA");
#endif
  }
  const int64_t R = x.shape()[0], D = x.shape()[1], E = w1.shape()[0], F = w1.shape()[2];
  const std::vector<int32_t> c = host_counts(counts, R);
  Tensor grad_x = paddle::empty({R, D}, x.dtype(), x.place());
  Tensor grad_w1 = paddle::empty({E, D, F}, x.dtype(), x.place());
  Tensor grad_b1 = paddle::empty({E, F}, x.dtype(), x.place());
  Tensor grad_w2 = paddle::empty({E, F, D}, x.dtype(), x.place());
  Tensor grad_b2 = paddle::empty({E, D}, x.dtype(), x.place());
  const semoe::SgemmFn gemm = semoe::cpu_gemm().fn;
  with_activation(act, [&](auto tag) {
    constexpr auto A = static_cast<semoe::Activation>(decltype(tag)::value);
    semoe::grouped_ffn_bwd_cpu<A>(gemm, x.data<float>(), c.data(), w1.data<float>(),
                                  w2.data<float>(), hidden_pre.data<float>(),
                                  grad_out.data<float>(), R, E, D, F, grad_x.data<float>(),
                                  grad_w1.data<float>(), grad_b1.data<float>(),
                                  grad_w2.data<float>(), grad_b2.data<float>());
  });
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

// Which GEMM backs the CPU kernel ("onednn", "cblas" or "naive"), for the Python wrapper's
// one-time report. Returned as a 1-element int32 tensor code to stay within op signatures.
std::vector<Tensor> GemmBackend(const Tensor& /*dummy*/) {
  Tensor out = paddle::empty({1}, DataType::INT32, paddle::CPUPlace());
  const std::string name = semoe::cpu_gemm().name;
  out.data<int32_t>()[0] = name == "onednn" ? 0 : (name == "cblas" ? 1 : 2);
  return {out};
}

}  // namespace

PD_BUILD_OP(semoe_grouped_ffn)
    .Inputs({"X", "Counts", "W1", "B1", "W2", "B2"})
    .Outputs({"Out", "HiddenPre"})
    .Attrs({"activation: std::string"})
    .SetKernelFn(PD_KERNEL(GroupedFfn))
    .SetInferShapeFn(PD_INFER_SHAPE(GroupedFfnShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(GroupedFfnDtype));

PD_BUILD_GRAD_OP(semoe_grouped_ffn)
    .Inputs({"X", "Counts", "W1", "W2", "HiddenPre", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W1"), paddle::Grad("B1"), paddle::Grad("W2"),
              paddle::Grad("B2")})
    .Attrs({"activation: std::string"})
    .SetKernelFn(PD_KERNEL(GroupedFfnGrad));

PD_BUILD_OP(semoe_cpu_gemm_backend)
    .Inputs({"Dummy"})
    .Outputs({"Code"})
    .SetKernelFn(PD_KERNEL(GemmBackend));
