// Paddle binding of semoe_causal_attention (CPU, float32). Contract: custom_ops/README.md.
//   semoe_causal_attention(QKV[B, S, 3*H*Dh], KPast[B, H, P, Dh], VPast[B, H, P, Dh]; num_heads)
//     -> Out[B, S, H*Dh], Lse[B, H, S]
// Kernel: semoe/attention_cpu.h. GPU tensors are refused here: the Python wrapper sends GPU
// inputs to Paddle's own scaled_dot_product_attention (said once, loudly).
#include <string>
#include <vector>

#include "check.h"
#include "paddle/extension.h"
#include "semoe/attention_cpu.h"

namespace {

using paddle::DataType;
using paddle::Tensor;

constexpr const char* kOp = "semoe_causal_attention";

semoe::AttnDims attn_dims(const Tensor& qkv, const Tensor& k_past, const Tensor& v_past,
                          int64_t num_heads) {
  for (const auto& [arg, t] : {std::pair<const char*, const Tensor*>{"qkv", &qkv},
                               {"k_past", &k_past}, {"v_past", &v_past}}) {
    PD_CHECK(t->is_cpu(), kOp, ": argument '", arg,
             "' must be a CPU tensor (GPU inputs go to Paddle's attention in the Python wrapper)");
    PD_CHECK(t->dtype() == DataType::FLOAT32, kOp, ": argument '", arg, "' must be float32, got ",
             t->dtype());
  }
  PD_CHECK(qkv.shape().size() == 3, kOp, ": argument 'qkv' must have shape [B, S, 3*H*Dh], got ",
           semoe::shape_str(qkv.shape()));
  PD_CHECK(num_heads > 0, kOp, ": num_heads must be positive, got ", num_heads);
  const int64_t B = qkv.shape()[0], S = qkv.shape()[1], D3 = qkv.shape()[2];
  PD_CHECK(D3 % (3 * num_heads) == 0, kOp, ": the last dim of 'qkv' (", D3,
           ") must be 3 * num_heads (", num_heads, ") * head_dim");
  const int64_t Dh = D3 / (3 * num_heads);
  PD_CHECK(k_past.shape().size() == 4 && k_past.shape()[0] == B && k_past.shape()[1] == num_heads &&
               k_past.shape()[3] == Dh,
           kOp, ": argument 'k_past' must have shape [B=", B, ", H=", num_heads, ", P, Dh=", Dh,
           "], got ", semoe::shape_str(k_past.shape()));
  PD_CHECK(v_past.shape() == k_past.shape(), kOp, ": argument 'v_past' must have the shape of 'k_past' ",
           semoe::shape_str(k_past.shape()), ", got ", semoe::shape_str(v_past.shape()));
  return {B, S, num_heads, Dh, k_past.shape()[2]};
}

std::vector<Tensor> Attention(const Tensor& qkv, const Tensor& k_past, const Tensor& v_past,
                              int64_t num_heads) {
  const semoe::AttnDims d = attn_dims(qkv, k_past, v_past, num_heads);
  Tensor out = paddle::empty({d.B, d.S, d.D()}, DataType::FLOAT32, qkv.place());
  Tensor lse = paddle::empty({d.B, d.H, d.S}, DataType::FLOAT32, qkv.place());
  semoe::causal_attention_fwd_cpu(d, qkv.data<float>(), d.P ? k_past.data<float>() : nullptr,
                                  d.P ? v_past.data<float>() : nullptr, out.data<float>(),
                                  lse.data<float>());
  return {out, lse};
}

std::vector<std::vector<int64_t>> AttentionShape(const std::vector<int64_t>& qkv,
                                                 const std::vector<int64_t>&,
                                                 const std::vector<int64_t>&, int64_t num_heads) {
  return {{qkv[0], qkv[1], qkv[2] / 3}, {qkv[0], num_heads, qkv[1]}};
}

std::vector<DataType> AttentionDtype(const DataType& qkv, const DataType&, const DataType&) {
  return {qkv, DataType::FLOAT32};
}

std::vector<Tensor> AttentionGrad(const Tensor& qkv, const Tensor& k_past, const Tensor& v_past,
                                  const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                                  int64_t num_heads) {
  const semoe::AttnDims d = attn_dims(qkv, k_past, v_past, num_heads);
  PD_CHECK(grad_out.dtype() == DataType::FLOAT32 && grad_out.shape() == out.shape(),
           "semoe_causal_attention_grad: argument 'grad_out' must be float32 ",
           semoe::shape_str(out.shape()), ", got ", grad_out.dtype(), " ",
           semoe::shape_str(grad_out.shape()));
  Tensor grad_qkv = paddle::empty(qkv.shape(), DataType::FLOAT32, qkv.place());
  Tensor grad_k = paddle::empty(k_past.shape(), DataType::FLOAT32, qkv.place());
  Tensor grad_v = paddle::empty(v_past.shape(), DataType::FLOAT32, qkv.place());
  semoe::causal_attention_bwd_cpu(d, qkv.data<float>(), d.P ? k_past.data<float>() : nullptr,
                                  d.P ? v_past.data<float>() : nullptr, out.data<float>(),
                                  lse.data<float>(), grad_out.data<float>(),
                                  grad_qkv.data<float>(), d.P ? grad_k.data<float>() : nullptr,
                                  d.P ? grad_v.data<float>() : nullptr);
  return {grad_qkv, grad_k, grad_v};
}

}  // namespace

PD_BUILD_OP(semoe_causal_attention)
    .Inputs({"QKV", "KPast", "VPast"})
    .Outputs({"Out", "Lse"})
    .Attrs({"num_heads: int64_t"})
    .SetKernelFn(PD_KERNEL(Attention))
    .SetInferShapeFn(PD_INFER_SHAPE(AttentionShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(AttentionDtype));

PD_BUILD_GRAD_OP(semoe_causal_attention)
    .Inputs({"QKV", "KPast", "VPast", "Out", "Lse", paddle::Grad("Out")})
    .Outputs({paddle::Grad("QKV"), paddle::Grad("KPast"), paddle::Grad("VPast")})
    .Attrs({"num_heads: int64_t"})
    .SetKernelFn(PD_KERNEL(AttentionGrad));
