// Paddle bindings of semoe_grouped_ffn_int8 / semoe_grouped_ffn_int4: weight-only int8 and int4
// experts for inference (CPU, float32 rows; no gradient). Kernels: semoe/grouped_ffn_int8_cpu.h.
//   semoe_grouped_ffn_int8(x[R,D], counts i32[E], w1 i8[E,D,F], s1[E,F], b1[E,F],
//                          w2 i8[E,F,D], s2[E,D], b2[E,D]; activation) -> out[R,D]
//   semoe_grouped_ffn_int4(x[R,D], counts i32[E], w1 u8[E,D,F/2], s1[E,ceil(D/G),F], b1[E,F],
//                          w2 u8[E,F,D/2], s2[E,ceil(F/G),D], b2[E,D]; activation, group_size G)
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "paddle/extension.h"
#include "semoe/grouped_ffn_int8_cpu.h"

namespace {

using paddle::DataType;
using paddle::Tensor;

constexpr const char* kOp = "semoe_grouped_ffn_int8";
constexpr const char* kOp4 = "semoe_grouped_ffn_int4";

void check_cpu(const char* op, const char* arg, const Tensor& t) {
  PD_CHECK(t.is_cpu(), op, ": argument '", arg, "' must be a CPU tensor (int8 experts are served on the CPU)");
}

void check_shape(const char* op, const char* arg, const Tensor& t, const std::vector<int64_t>& want) {
  PD_CHECK(t.shape() == want, op, ": argument '", arg, "' must have shape ", semoe::shape_str(want),
           ", got ", semoe::shape_str(t.shape()));
}


// counts validated against the R rows of x; returns the largest count.
int64_t check_counts(const char* op, const Tensor& counts, int64_t R) {
  const int32_t* c = counts.data<int32_t>();
  int64_t total = 0, most = 0;
  for (int64_t e = 0; e < counts.shape()[0]; ++e) {
    PD_CHECK(c[e] >= 0, op, ": counts[", e, "] = ", c[e], " is negative");
    total += c[e];
    most = c[e] > most ? c[e] : most;
  }
  PD_CHECK(total <= R, op, ": sum(counts) = ", total, " exceeds the ", R, " rows of 'x'");
  return most;
}

template <typename Fn>
void with_activation(const char* op, const std::string& name, Fn&& fn) {
  semoe::Activation act;
  PD_CHECK(semoe::parse_activation(name, &act), op, ": unknown activation '", name,
           "' (expected gelu, gelu_tanh, relu or silu)");
  switch (act) {
    case semoe::Activation::kGelu: fn(std::integral_constant<int, 0>{}); break;
    case semoe::Activation::kGeluTanh: fn(std::integral_constant<int, 1>{}); break;
    case semoe::Activation::kRelu: fn(std::integral_constant<int, 2>{}); break;
    case semoe::Activation::kSilu: fn(std::integral_constant<int, 3>{}); break;
  }
}

// The checks both ops share: x float32 [R, D], counts int32 [E], w1/w2 of `wdtype` and shapes
// w1_shape/w2_shape, s1/s2 float32 of s1_shape/s2_shape, b1 [E, F], b2 [E, D]; all on the CPU.
void check_quant_inputs(const char* op, const Tensor& x, const Tensor& counts, const Tensor& w1,
                        const Tensor& s1, const Tensor& b1, const Tensor& w2, const Tensor& s2,
                        const Tensor& b2, DataType wdtype, const std::vector<int64_t>& w1_shape,
                        const std::vector<int64_t>& s1_shape, const std::vector<int64_t>& w2_shape,
                        const std::vector<int64_t>& s2_shape) {
  const int64_t E = w1_shape[0], D = x.shape()[1], F = b1.shape().size() == 2 ? b1.shape()[1] : -1;
  PD_CHECK(w1.dtype() == wdtype, op, ": argument 'w1' must be ", wdtype, ", got ", w1.dtype());
  PD_CHECK(w2.dtype() == wdtype, op, ": argument 'w2' must be ", wdtype, ", got ", w2.dtype());
  check_shape(op, "w1", w1, w1_shape);
  check_shape(op, "w2", w2, w2_shape);
  const char* names[] = {"s1", "b1", "s2", "b2"};
  const Tensor* vecs[] = {&s1, &b1, &s2, &b2};
  const std::vector<int64_t> wants[] = {s1_shape, {E, F}, s2_shape, {E, D}};
  for (int i = 0; i < 4; ++i) {
    PD_CHECK(vecs[i]->dtype() == DataType::FLOAT32, op, ": argument '", names[i], "' must be float32, got ",
             vecs[i]->dtype());
    check_shape(op, names[i], *vecs[i], wants[i]);
  }
  const char* all_names[] = {"x", "counts", "w1", "s1", "b1", "w2", "s2", "b2"};
  const Tensor* all[] = {&x, &counts, &w1, &s1, &b1, &w2, &s2, &b2};
  for (int i = 0; i < 8; ++i) check_cpu(op, all_names[i], *all[i]);
}

std::vector<Tensor> GroupedFfnInt8(const Tensor& x, const Tensor& counts, const Tensor& w1,
                                   const Tensor& s1, const Tensor& b1, const Tensor& w2,
                                   const Tensor& s2, const Tensor& b2,
                                   const std::string& activation) {
  semoe::check_tensor(kOp, "x", x, DataType::FLOAT32, 2, "[R, D]");
  semoe::check_tensor(kOp, "counts", counts, DataType::INT32, 1, "[E]");
  PD_CHECK(w1.shape().size() == 3, kOp, ": argument 'w1' must have shape [E, D, F], got ",
           semoe::shape_str(w1.shape()));
  const int64_t R = x.shape()[0], D = x.shape()[1], E = counts.shape()[0], F = w1.shape()[2];
  PD_CHECK(b1.shape().size() == 2, kOp, ": argument 'b1' must have shape [E, F], got ",
           semoe::shape_str(b1.shape()));
  check_quant_inputs(kOp, x, counts, w1, s1, b1, w2, s2, b2, DataType::INT8, {E, D, F}, {E, F},
                     {E, F, D}, {E, D});
  const int64_t most = check_counts(kOp, counts, R);
  Tensor out = paddle::empty({R, D}, DataType::FLOAT32, x.place());
  // uninitialized scratch (hidden and activated rows): every element is written before it is read
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(2 * most * F)]);
  with_activation(kOp, activation, [&](auto tag) {
    constexpr auto A = static_cast<semoe::Activation>(decltype(tag)::value);
    semoe::grouped_ffn_int8_fwd_cpu<A>(x.data<float>(), counts.data<int32_t>(), w1.data<int8_t>(),
                                       s1.data<float>(), b1.data<float>(), w2.data<int8_t>(),
                                       s2.data<float>(), b2.data<float>(), R, E, D, F,
                                       out.data<float>(), scratch.get());
  });
  return {out};
}

std::vector<Tensor> GroupedFfnInt4(const Tensor& x, const Tensor& counts, const Tensor& w1,
                                   const Tensor& s1, const Tensor& b1, const Tensor& w2,
                                   const Tensor& s2, const Tensor& b2,
                                   const std::string& activation, int group_size) {
  semoe::check_tensor(kOp4, "x", x, DataType::FLOAT32, 2, "[R, D]");
  semoe::check_tensor(kOp4, "counts", counts, DataType::INT32, 1, "[E]");
  PD_CHECK(group_size >= 1, kOp4, ": group_size must be >= 1, got ", group_size);
  PD_CHECK(b1.shape().size() == 2, kOp4, ": argument 'b1' must have shape [E, F], got ",
           semoe::shape_str(b1.shape()));
  const int64_t R = x.shape()[0], D = x.shape()[1], E = counts.shape()[0], F = b1.shape()[1];
  const int64_t G = group_size;
  PD_CHECK(D % 2 == 0 && F % 2 == 0, kOp4, ": int4 packs two columns per byte: D=", D, " and F=", F,
           " must be even");
  check_quant_inputs(kOp4, x, counts, w1, s1, b1, w2, s2, b2, DataType::UINT8, {E, D, F / 2},
                     {E, (D + G - 1) / G, F}, {E, F, D / 2}, {E, (F + G - 1) / G, D});
  const int64_t most = check_counts(kOp4, counts, R);
  Tensor out = paddle::empty({R, D}, DataType::FLOAT32, x.place());
  std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(2 * most * F)]);
  with_activation(kOp4, activation, [&](auto tag) {
    constexpr auto A = static_cast<semoe::Activation>(decltype(tag)::value);
    semoe::grouped_ffn_int4_fwd_cpu<A>(x.data<float>(), counts.data<int32_t>(), w1.data<uint8_t>(),
                                       s1.data<float>(), b1.data<float>(), w2.data<uint8_t>(),
                                       s2.data<float>(), b2.data<float>(), R, E, D, F, G,
                                       out.data<float>(), scratch.get());
  });
  return {out};
}

std::vector<std::vector<int64_t>> GroupedFfnInt8Shape(
    const std::vector<int64_t>& x, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::string&) {
  return {{x[0], x[1]}};
}

std::vector<DataType> GroupedFfnInt8Dtype(const DataType&, const DataType&, const DataType&,
                                          const DataType&, const DataType&, const DataType&,
                                          const DataType&, const DataType&) {
  return {DataType::FLOAT32};
}

std::vector<std::vector<int64_t>> GroupedFfnInt4Shape(
    const std::vector<int64_t>& x, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::string&, int) {
  return {{x[0], x[1]}};
}

}  // namespace

PD_BUILD_OP(semoe_grouped_ffn_int8)
    .Inputs({"X", "Counts", "W1", "S1", "B1", "W2", "S2", "B2"})
    .Outputs({"Out"})
    .Attrs({"activation: std::string"})
    .SetKernelFn(PD_KERNEL(GroupedFfnInt8))
    .SetInferShapeFn(PD_INFER_SHAPE(GroupedFfnInt8Shape))
    .SetInferDtypeFn(PD_INFER_DTYPE(GroupedFfnInt8Dtype));

PD_BUILD_OP(semoe_grouped_ffn_int4)
    .Inputs({"X", "Counts", "W1", "S1", "B1", "W2", "S2", "B2"})
    .Outputs({"Out"})
    .Attrs({"activation: std::string", "group_size: int"})
    .SetKernelFn(PD_KERNEL(GroupedFfnInt4))
    .SetInferShapeFn(PD_INFER_SHAPE(GroupedFfnInt4Shape))
    .SetInferDtypeFn(PD_INFER_DTYPE(GroupedFfnInt8Dtype));
