// Paddle bindings of the multi-tensor optimizer ops (CPU, float32). Contract: custom_ops/README.md.
//   semoe_adamw_step(Params[], Grads[], Moment1[], Moment2[], Beta1Pow[], Beta2Pow[];
//                    lr, beta1, beta2, epsilon, weight_decay, decay_mask, grad_scale)
//     updates Params, Moment1, Moment2 and the beta powers in place (one call, every tensor).
//   semoe_squared_norms(X[]) -> float32 [n]: sum of squares of each tensor.
// Kernels: semoe/adamw_cpu.h. GPU tensors are refused: the Python side keeps Paddle's own
// optimizer there (said once, loudly).
#include <string>
#include <vector>

#include "check.h"
#include "paddle/extension.h"
#include "semoe/adamw_cpu.h"

namespace {

using paddle::DataType;
using paddle::Tensor;

constexpr const char* kAdamw = "semoe_adamw_step";

void check_list(const char* op, const char* arg, const std::vector<Tensor>& ts, size_t n,
                const std::vector<Tensor>* like) {
  PD_CHECK(ts.size() == n, op, ": argument '", arg, "' must hold ", n, " tensors, got ", ts.size());
  for (size_t k = 0; k < ts.size(); ++k) {
    PD_CHECK(ts[k].is_cpu() && ts[k].dtype() == DataType::FLOAT32, op, ": argument '", arg, "'[",
             k, "] must be a float32 CPU tensor, got ", ts[k].dtype());
    if (like != nullptr)
      PD_CHECK(ts[k].numel() == (*like)[k].numel(), op, ": argument '", arg, "'[", k, "] has ",
               ts[k].numel(), " elements, its parameter ", (*like)[k].numel());
  }
}

void AdamwStep(std::vector<Tensor>& params, const std::vector<Tensor>& grads,
               std::vector<Tensor>& m1s, std::vector<Tensor>& m2s, std::vector<Tensor>& b1ps,
               std::vector<Tensor>& b2ps, float lr, float beta1, float beta2, float epsilon,
               float weight_decay, const std::vector<int>& decay_mask, float grad_scale) {
  const size_t n = params.size();
  check_list(kAdamw, "params", params, n, nullptr);
  check_list(kAdamw, "grads", grads, n, &params);
  check_list(kAdamw, "moment1", m1s, n, &params);
  check_list(kAdamw, "moment2", m2s, n, &params);
  check_list(kAdamw, "beta1_pow", b1ps, n, nullptr);
  check_list(kAdamw, "beta2_pow", b2ps, n, nullptr);
  PD_CHECK(decay_mask.size() == n, kAdamw, ": decay_mask must hold ", n, " flags, got ",
           decay_mask.size());
  std::vector<semoe::AdamwTensor> ts;
  ts.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    PD_CHECK(b1ps[k].numel() == 1 && b2ps[k].numel() == 1, kAdamw, ": beta powers of tensor ", k,
             " must have one element");
    const double b1p = b1ps[k].data<float>()[0], b2p = b2ps[k].data<float>()[0];
    const double lr_t = lr * std::sqrt(1.0 - b2p) / (1.0 - b1p);
    ts.push_back({params[k].data<float>(), grads[k].data<float>(), m1s[k].data<float>(),
                  m2s[k].data<float>(), params[k].numel(), static_cast<float>(lr_t),
                  static_cast<float>(epsilon * std::sqrt(1.0 - b2p)),
                  decay_mask[k] ? lr * weight_decay : 0.f});
  }
  semoe::adamw_multi_tensor(ts, {beta1, beta2, grad_scale});
  for (size_t k = 0; k < n; ++k) {
    b1ps[k].data<float>()[0] *= beta1;
    b2ps[k].data<float>()[0] *= beta2;
  }
}

std::vector<Tensor> SquaredNorms(const std::vector<Tensor>& xs) {
  check_list("semoe_squared_norms", "x", xs, xs.size(), nullptr);
  std::vector<const float*> ptrs;
  std::vector<int64_t> ns;
  for (const auto& t : xs) {
    ptrs.push_back(t.data<float>());
    ns.push_back(t.numel());
  }
  std::vector<double> out(xs.size());
  semoe::squared_norms(ptrs, ns, out.data());
  Tensor res = paddle::empty({static_cast<int64_t>(xs.size())}, DataType::FLOAT32, paddle::CPUPlace());
  for (size_t k = 0; k < xs.size(); ++k) res.data<float>()[k] = static_cast<float>(out[k]);
  return {res};
}

}  // namespace

PD_BUILD_OP(semoe_adamw_step)
    .Inputs({paddle::Vec("Params"), paddle::Vec("Grads"), paddle::Vec("Moment1"),
             paddle::Vec("Moment2"), paddle::Vec("Beta1Pow"), paddle::Vec("Beta2Pow")})
    .Outputs({paddle::Vec("ParamsOut"), paddle::Vec("Moment1Out"), paddle::Vec("Moment2Out"),
              paddle::Vec("Beta1PowOut"), paddle::Vec("Beta2PowOut")})
    .SetInplaceMap({{paddle::Vec("Params"), paddle::Vec("ParamsOut")},
                    {paddle::Vec("Moment1"), paddle::Vec("Moment1Out")},
                    {paddle::Vec("Moment2"), paddle::Vec("Moment2Out")},
                    {paddle::Vec("Beta1Pow"), paddle::Vec("Beta1PowOut")},
                    {paddle::Vec("Beta2Pow"), paddle::Vec("Beta2PowOut")}})
    .Attrs({"lr: float", "beta1: float", "beta2: float", "epsilon: float", "weight_decay: float",
            "decay_mask: std::vector<int>", "grad_scale: float"})
    .SetKernelFn(PD_KERNEL(AdamwStep));

PD_BUILD_OP(semoe_squared_norms)
    .Inputs({paddle::Vec("X")})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(SquaredNorms));
