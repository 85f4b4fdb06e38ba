// Paddle bindings of the fused dense-model ops (CPU, float32). Contract: custom_ops/README.md.
//   semoe_linear(X[..., K], W[K, N] or [N, K], B[N] or [0]; activation, trans_w) -> Out, Pre
//   semoe_layernorm(X[T, D], Gamma[D], Beta[D]; epsilon) -> Out, Mean[T], Rstd[T]
//   semoe_add_layernorm(X, Residual, Gamma, Beta; epsilon) -> Out, Sum, Mean, Rstd
//   semoe_softmax_ce(Logits[T, V], Labels int64[T]; ignore_index) -> Loss[1], Lse[T], Count[1]
//   semoe_set_cpu_gemm_precision(Dummy; precision) -> Code int32[1]: float32, bfloat16 (every
//     CPU GEMM of the module) or bfloat16_ffn (expert/dense FFN GEMMs only), see
//     semoe/cpu_gemm.h; Code 0/1/2, or -1 when
//     bfloat16 was asked but oneDNN's bf16 GEMM is unavailable (float32 kept)
// GPU tensors are refused here: the Python wrappers route GPU inputs to Paddle's own fused
// ops (said once, loudly) before any of these kernels is called.
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "paddle/extension.h"
#include "semoe/layernorm_cpu.h"
#include "semoe/linear_cpu.h"
#include "semoe/softmax_ce_cpu.h"

namespace {

using paddle::DataType;
using paddle::Tensor;

void check_cpu_f32(const char* op, const char* arg, const Tensor& t) {
  PD_CHECK(t.is_cpu(), op, ": argument '", arg,
           "' must be a CPU tensor (GPU inputs go to Paddle's own ops in the Python wrapper)");
  PD_CHECK(t.dtype() == DataType::FLOAT32, op, ": argument '", arg, "' must be float32, got ",
           t.dtype());
}

// ---------------------------------------------------------------- linear
constexpr const char* kLinear = "semoe_linear";

semoe::LinearAct linear_act(const std::string& name) {
  semoe::LinearAct a;
  PD_CHECK(semoe::parse_linear_activation(name, &a), kLinear, ": unknown activation '", name,
           "' (expected none, gelu, gelu_tanh, relu or silu)");
  return a;
}

template <typename Fn>
void with_linear_act(semoe::LinearAct a, Fn&& fn) {
  using semoe::LinearAct;
  switch (a) {
    case LinearAct::kNone: fn(std::integral_constant<LinearAct, LinearAct::kNone>{}); break;
    case LinearAct::kGelu: fn(std::integral_constant<LinearAct, LinearAct::kGelu>{}); break;
    case LinearAct::kGeluTanh: fn(std::integral_constant<LinearAct, LinearAct::kGeluTanh>{}); break;
    case LinearAct::kRelu: fn(std::integral_constant<LinearAct, LinearAct::kRelu>{}); break;
    case LinearAct::kSilu: fn(std::integral_constant<LinearAct, LinearAct::kSilu>{}); break;
  }
}

struct LinearDims {
  int64_t T, K, N;
};

LinearDims linear_dims(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                       bool trans_w) {
  int64_t T = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) T *= x[i];
  return {T, x.back(), trans_w ? w[0] : w[1]};
}

std::vector<int64_t> linear_out_shape(const std::vector<int64_t>& x, int64_t N) {
  std::vector<int64_t> s(x.begin(), x.end() - 1);
  s.push_back(N);
  return s;
}

std::vector<Tensor> Linear(const Tensor& x, const Tensor& w, const Tensor& b,
                           const std::string& activation, bool trans_w) {
  const semoe::LinearAct act = linear_act(activation);
  check_cpu_f32(kLinear, "x", x);
  check_cpu_f32(kLinear, "w", w);
  check_cpu_f32(kLinear, "b", b);
  PD_CHECK(x.shape().size() >= 2, kLinear, ": argument 'x' must have shape [..., K], got ",
           semoe::shape_str(x.shape()));
  PD_CHECK(w.shape().size() == 2, kLinear, ": argument 'w' must have shape ",
           trans_w ? "[N, K]" : "[K, N]", ", got ", semoe::shape_str(w.shape()));
  const LinearDims d = linear_dims(x.shape(), w.shape(), trans_w);
  const int64_t wk = trans_w ? w.shape()[1] : w.shape()[0];
  PD_CHECK(wk == d.K, kLinear, ": argument 'w' ", semoe::shape_str(w.shape()),
           " does not match the K=", d.K, " features of 'x'", trans_w ? " (trans_w: w is [N, K])" : "");
  PD_CHECK(b.numel() == 0 || (b.shape().size() == 1 && b.shape()[0] == d.N), kLinear,
           ": argument 'b' must have shape [N=", d.N, "] or [0] (no bias), got ",
           semoe::shape_str(b.shape()));
  const auto out_shape = linear_out_shape(x.shape(), d.N);
  Tensor out = paddle::empty(out_shape, DataType::FLOAT32, x.place());
  const bool keep_pre = act != semoe::LinearAct::kNone;
  Tensor pre = keep_pre ? paddle::empty(out_shape, DataType::FLOAT32, x.place())
                        : paddle::empty({0}, DataType::FLOAT32, x.place());
  const semoe::SgemmFn gemm = semoe::linear_gemm();
  with_linear_act(act, [&](auto tag) {
    semoe::linear_fwd_cpu<decltype(tag)>(gemm, x.data<float>(), w.data<float>(),
                                         b.numel() ? b.data<float>() : nullptr, d.T, d.K, d.N,
                                         trans_w, out.data<float>(),
                                         keep_pre ? pre.data<float>() : nullptr);
  });
  return {out, pre};
}

std::vector<std::vector<int64_t>> LinearShape(const std::vector<int64_t>& x,
                                              const std::vector<int64_t>& w,
                                              const std::vector<int64_t>&,
                                              const std::string& activation, bool trans_w) {
  const auto out = linear_out_shape(x, trans_w ? w[0] : w[1]);
  const bool keep_pre = !(activation == "none" || activation.empty());
  return {out, keep_pre ? out : std::vector<int64_t>{0}};
}

std::vector<DataType> LinearDtype(const DataType& x, const DataType&, const DataType&) {
  return {x, x};
}

std::vector<Tensor> LinearGrad(const Tensor& x, const Tensor& w, const Tensor& b,
                               const Tensor& pre, const Tensor& grad_out,
                               const std::string& activation, bool trans_w) {
  const semoe::LinearAct act = linear_act(activation);
  check_cpu_f32("semoe_linear_grad", "grad_out", grad_out);
  const LinearDims d = linear_dims(x.shape(), w.shape(), trans_w);
  Tensor grad_x = paddle::empty(x.shape(), DataType::FLOAT32, x.place());
  Tensor grad_w = paddle::empty(w.shape(), DataType::FLOAT32, x.place());
  Tensor grad_b = paddle::empty(b.shape(), DataType::FLOAT32, x.place());
  const bool need_g = act != semoe::LinearAct::kNone;
  std::unique_ptr<float[]> scratch_g(need_g ? new float[static_cast<size_t>(d.T * d.N)] : nullptr);
  std::unique_ptr<float[]> scratch_t(trans_w ? nullptr : new float[static_cast<size_t>(d.K * d.N)]);
  const semoe::SgemmFn gemm = semoe::linear_gemm();
  with_linear_act(act, [&](auto tag) {
    semoe::linear_bwd_cpu<decltype(tag)>(
        gemm, x.data<float>(), w.data<float>(), need_g ? pre.data<float>() : nullptr,
        grad_out.data<float>(), d.T, d.K, d.N, trans_w, grad_x.data<float>(),
        grad_w.data<float>(), b.numel() ? grad_b.data<float>() : nullptr, scratch_g.get(),
        scratch_t.get());
  });
  return {grad_x, grad_w, grad_b};
}

// ---------------------------------------------------------------- layernorm
void check_ln(const char* op, const Tensor& x, const Tensor& gamma, const Tensor& beta) {
  check_cpu_f32(op, "x", x);
  check_cpu_f32(op, "gamma", gamma);
  check_cpu_f32(op, "beta", beta);
  PD_CHECK(x.shape().size() >= 1, op, ": argument 'x' must have shape [..., D], got ",
           semoe::shape_str(x.shape()));
  const int64_t D = x.shape().back();
  PD_CHECK(gamma.shape().size() == 1 && gamma.shape()[0] == D, op,
           ": argument 'gamma' must have shape [D=", D, "], got ", semoe::shape_str(gamma.shape()));
  PD_CHECK(beta.shape().size() == 1 && beta.shape()[0] == D, op,
           ": argument 'beta' must have shape [D=", D, "], got ", semoe::shape_str(beta.shape()));
}

std::vector<int64_t> lead_shape(const std::vector<int64_t>& x) {
  return std::vector<int64_t>(x.begin(), x.end() - 1);
}

std::vector<Tensor> LayerNorm(const Tensor& x, const Tensor& gamma, const Tensor& beta,
                              float epsilon) {
  check_ln("semoe_layernorm", x, gamma, beta);
  const int64_t D = x.shape().back(), T = D ? x.numel() / D : 0;
  Tensor out = paddle::empty(x.shape(), DataType::FLOAT32, x.place());
  Tensor mean = paddle::empty(lead_shape(x.shape()), DataType::FLOAT32, x.place());
  Tensor rstd = paddle::empty(lead_shape(x.shape()), DataType::FLOAT32, x.place());
  semoe::layernorm_fwd_cpu(x.data<float>(), nullptr, gamma.data<float>(), beta.data<float>(), T,
                           D, epsilon, out.data<float>(), nullptr, mean.data<float>(),
                           rstd.data<float>());
  return {out, mean, rstd};
}

std::vector<std::vector<int64_t>> LayerNormShape(const std::vector<int64_t>& x,
                                                 const std::vector<int64_t>&,
                                                 const std::vector<int64_t>&, float) {
  return {x, lead_shape(x), lead_shape(x)};
}

std::vector<DataType> LayerNormDtype(const DataType& x, const DataType&, const DataType&) {
  return {x, DataType::FLOAT32, DataType::FLOAT32};
}

std::vector<Tensor> LayerNormGrad(const Tensor& x, const Tensor& gamma, const Tensor& mean,
                                  const Tensor& rstd, const Tensor& grad_out, float) {
  check_cpu_f32("semoe_layernorm_grad", "grad_out", grad_out);
  const int64_t D = x.shape().back(), T = D ? x.numel() / D : 0;
  Tensor grad_x = paddle::empty(x.shape(), DataType::FLOAT32, x.place());
  Tensor grad_gamma = paddle::empty({D}, DataType::FLOAT32, x.place());
  Tensor grad_beta = paddle::empty({D}, DataType::FLOAT32, x.place());
  semoe::layernorm_bwd_cpu(x.data<float>(), gamma.data<float>(), mean.data<float>(),
                           rstd.data<float>(), grad_out.data<float>(), nullptr, T, D,
                           grad_x.data<float>(), grad_gamma.data<float>(),
                           grad_beta.data<float>());
  return {grad_x, grad_gamma, grad_beta};
}

std::vector<Tensor> AddLayerNorm(const Tensor& x, const Tensor& residual, const Tensor& gamma,
                                 const Tensor& beta, float epsilon) {
  constexpr const char* kOp = "semoe_add_layernorm";
  check_ln(kOp, x, gamma, beta);
  check_cpu_f32(kOp, "residual", residual);
  PD_CHECK(residual.shape() == x.shape(), kOp, ": argument 'residual' must have the shape of 'x' ",
           semoe::shape_str(x.shape()), ", got ", semoe::shape_str(residual.shape()));
  const int64_t D = x.shape().back(), T = D ? x.numel() / D : 0;
  Tensor out = paddle::empty(x.shape(), DataType::FLOAT32, x.place());
  Tensor sum = paddle::empty(x.shape(), DataType::FLOAT32, x.place());
  Tensor mean = paddle::empty(lead_shape(x.shape()), DataType::FLOAT32, x.place());
  Tensor rstd = paddle::empty(lead_shape(x.shape()), DataType::FLOAT32, x.place());
  semoe::layernorm_fwd_cpu(x.data<float>(), residual.data<float>(), gamma.data<float>(),
                           beta.data<float>(), T, D, epsilon, out.data<float>(),
                           sum.data<float>(), mean.data<float>(), rstd.data<float>());
  return {out, sum, mean, rstd};
}

std::vector<std::vector<int64_t>> AddLayerNormShape(const std::vector<int64_t>& x,
                                                    const std::vector<int64_t>&,
                                                    const std::vector<int64_t>&,
                                                    const std::vector<int64_t>&, float) {
  return {x, x, lead_shape(x), lead_shape(x)};
}

std::vector<DataType> AddLayerNormDtype(const DataType& x, const DataType&, const DataType&,
                                        const DataType&) {
  return {x, x, DataType::FLOAT32, DataType::FLOAT32};
}

std::vector<Tensor> AddLayerNormGrad(const Tensor& sum, const Tensor& gamma, const Tensor& mean,
                                     const Tensor& rstd, const Tensor& grad_out,
                                     const Tensor& grad_sum, float) {
  const int64_t D = sum.shape().back(), T = D ? sum.numel() / D : 0;
  const bool has_out = grad_out.initialized(), has_sum = grad_sum.initialized();
  Tensor grad_x = paddle::empty(sum.shape(), DataType::FLOAT32, sum.place());
  Tensor grad_r = paddle::empty(sum.shape(), DataType::FLOAT32, sum.place());
  Tensor grad_gamma = paddle::empty({D}, DataType::FLOAT32, sum.place());
  Tensor grad_beta = paddle::empty({D}, DataType::FLOAT32, sum.place());
  if (has_out) {  // grad_x and grad_r (the same gradient) written in one pass
    semoe::layernorm_bwd_cpu(sum.data<float>(), gamma.data<float>(), mean.data<float>(),
                             rstd.data<float>(), grad_out.data<float>(),
                             has_sum ? grad_sum.data<float>() : nullptr, T, D,
                             grad_x.data<float>(), grad_gamma.data<float>(),
                             grad_beta.data<float>(), grad_r.data<float>());
  } else {
    float* gx = grad_x.data<float>();
    float* gr = grad_r.data<float>();
    const float* gs = has_sum ? grad_sum.data<float>() : nullptr;
    for (int64_t i = 0; i < T * D; ++i) gx[i] = gr[i] = gs ? gs[i] : 0.f;
    for (int64_t c = 0; c < D; ++c) grad_gamma.data<float>()[c] = grad_beta.data<float>()[c] = 0.f;
  }
  return {grad_x, grad_r, grad_gamma, grad_beta};
}

// ---------------------------------------------------------------- softmax cross-entropy
constexpr const char* kCe = "semoe_softmax_ce";

std::vector<Tensor> SoftmaxCe(const Tensor& logits, const Tensor& labels, int64_t ignore_index) {
  check_cpu_f32(kCe, "logits", logits);
  PD_CHECK(logits.shape().size() == 2, kCe, ": argument 'logits' must have shape [T, V], got ",
           semoe::shape_str(logits.shape()));
  PD_CHECK(labels.is_cpu() && labels.dtype() == DataType::INT64, kCe,
           ": argument 'labels' must be int64 on the CPU, got ", labels.dtype());
  const int64_t T = logits.shape()[0], V = logits.shape()[1];
  PD_CHECK(labels.numel() == T, kCe, ": argument 'labels' must have T=", T, " elements, got ",
           semoe::shape_str(labels.shape()));
  const int64_t bad = semoe::softmax_ce_bad_label(labels.data<int64_t>(), T, V, ignore_index);
  PD_CHECK(bad < 0, kCe, ": labels[", bad, "] = ", bad < 0 ? 0 : labels.data<int64_t>()[bad],
           " is outside [0, V=", V, ") and is not ignore_index=", ignore_index);
  Tensor loss = paddle::empty({1}, DataType::FLOAT32, logits.place());
  Tensor lse = paddle::empty({T}, DataType::FLOAT32, logits.place());
  Tensor count = paddle::empty({1}, DataType::FLOAT32, logits.place());
  semoe::softmax_ce_fwd_cpu(logits.data<float>(), labels.data<int64_t>(), T, V, ignore_index,
                            lse.data<float>(), loss.data<float>(), count.data<float>());
  return {loss, lse, count};
}

std::vector<std::vector<int64_t>> SoftmaxCeShape(const std::vector<int64_t>& logits,
                                                 const std::vector<int64_t>&, int64_t) {
  return {{1}, {logits[0]}, {1}};
}

std::vector<DataType> SoftmaxCeDtype(const DataType& logits, const DataType&) {
  return {logits, DataType::FLOAT32, DataType::FLOAT32};
}

std::vector<Tensor> SoftmaxCeGrad(const Tensor& logits, const Tensor& labels, const Tensor& lse,
                                  const Tensor& count, const Tensor& grad_loss,
                                  int64_t ignore_index) {
  const int64_t T = logits.shape()[0], V = logits.shape()[1];
  Tensor grad_logits = paddle::empty({T, V}, DataType::FLOAT32, logits.place());
  semoe::softmax_ce_bwd_cpu(logits.data<float>(), labels.data<int64_t>(), lse.data<float>(),
                            grad_loss.data<float>()[0], count.data<float>()[0], T, V,
                            ignore_index, grad_logits.data<float>());
  return {grad_logits};
}

// ---------------------------------------------------------------- GEMM precision
std::vector<Tensor> SetGemmPrecision(const Tensor& /*dummy*/, const std::string& precision) {
  PD_CHECK(precision == "float32" || precision == "bfloat16" || precision == "bfloat16_ffn",
           "semoe_set_cpu_gemm_precision: precision must be float32, bfloat16 or bfloat16_ffn, got '",
           precision, "'");
  const bool ok = semoe::set_gemm_precision(
      precision == "bfloat16" ? 1 : (precision == "bfloat16_ffn" ? 2 : 0));
  Tensor out = paddle::empty({1}, DataType::INT32, paddle::CPUPlace());
  out.data<int32_t>()[0] = ok ? semoe::gemm_precision() : -1;
  return {out};
}

}  // namespace

PD_BUILD_OP(semoe_set_cpu_gemm_precision)
    .Inputs({"Dummy"})
    .Outputs({"Code"})
    .Attrs({"precision: std::string"})
    .SetKernelFn(PD_KERNEL(SetGemmPrecision));

PD_BUILD_OP(semoe_linear)
    .Inputs({"X", "W", "B"})
    .Outputs({"Out", "Pre"})
    .Attrs({"activation: std::string", "trans_w: bool"})
    .SetKernelFn(PD_KERNEL(Linear))
    .SetInferShapeFn(PD_INFER_SHAPE(LinearShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(LinearDtype));

PD_BUILD_GRAD_OP(semoe_linear)
    .Inputs({"X", "W", "B", "Pre", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W"), paddle::Grad("B")})
    .Attrs({"activation: std::string", "trans_w: bool"})
    .SetKernelFn(PD_KERNEL(LinearGrad));

PD_BUILD_OP(semoe_layernorm)
    .Inputs({"X", "Gamma", "Beta"})
    .Outputs({"Out", "Mean", "Rstd"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNorm))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(LayerNormDtype));

PD_BUILD_GRAD_OP(semoe_layernorm)
    .Inputs({"X", "Gamma", "Mean", "Rstd", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Gamma"), paddle::Grad("Beta")})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormGrad));

PD_BUILD_OP(semoe_add_layernorm)
    .Inputs({"X", "Residual", "Gamma", "Beta"})
    .Outputs({"Out", "Sum", "Mean", "Rstd"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(AddLayerNorm))
    .SetInferShapeFn(PD_INFER_SHAPE(AddLayerNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(AddLayerNormDtype));

PD_BUILD_GRAD_OP(semoe_add_layernorm)
    .Inputs({"Sum", "Gamma", "Mean", "Rstd", paddle::Grad("Out"), paddle::Grad("Sum")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Residual"), paddle::Grad("Gamma"),
              paddle::Grad("Beta")})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(AddLayerNormGrad));

PD_BUILD_OP(semoe_softmax_ce)
    .Inputs({"Logits", "Labels"})
    .Outputs({"Loss", "Lse", "Count"})
    .Attrs({"ignore_index: int64_t"})
    .SetKernelFn(PD_KERNEL(SoftmaxCe))
    .SetInferShapeFn(PD_INFER_SHAPE(SoftmaxCeShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SoftmaxCeDtype));

PD_BUILD_GRAD_OP(semoe_softmax_ce)
    .Inputs({"Logits", "Labels", "Lse", "Count", paddle::Grad("Loss")})
    .Outputs({paddle::Grad("Logits")})
    .Attrs({"ignore_index: int64_t"})
    .SetKernelFn(PD_KERNEL(SoftmaxCeGrad));
