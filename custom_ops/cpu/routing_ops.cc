// Paddle bindings of the routing ops: semoe_expert_count, semoe_gate_dispatch,
// semoe_combine (with grads). CPU kernels live in semoe/routing_cpu.h; CUDA launchers in
// custom_ops/cuda (compiled only when Paddle is built with CUDA).
#include <vector>

#include "check.h"
#include "paddle/extension.h"
#include "semoe/routing_cpu.h"

#ifdef PADDLE_WITH_CUDA
#include "semoe/cuda_launchers.h"
#endif

namespace {

using paddle::DataType;
using paddle::Tensor;

#ifdef PADDLE_WITH_CUDA
semoe::cuda::DType cuda_dtype(const char* op, DataType d) {
  if (d == DataType::FLOAT32) return semoe::cuda::DType::kFloat32;
  if (d == DataType::FLOAT16) return semoe::cuda::DType::kFloat16;
  if (d == DataType::BFLOAT16) return semoe::cuda::DType::kBFloat16;
  PD_THROW(op, ": token rows must be float32, float16 or bfloat16, got ", d);
}
#define SEMOE_CUDA_OK(expr, op)                                                      \
  do {                                                                               \
    cudaError_t err_ = (expr);                                                       \
    PD_CHECK(err_ == cudaSuccess, op, ": CUDA error ", cudaGetErrorString(err_));   \
  } while (0)
#endif

void check_rows_dtype(const char* op, const char* arg, const Tensor& t, bool gpu) {
  if (gpu) {
    PD_CHECK(t.dtype() == DataType::FLOAT32 || t.dtype() == DataType::FLOAT16 ||
                 t.dtype() == DataType::BFLOAT16,
             op, ": argument '", arg, "' must be float32, float16 or bfloat16, got ", t.dtype());
  } else {
    PD_CHECK(t.dtype() == DataType::FLOAT32, op, ": argument '", arg,
             "' must be float32 on CPU, got ", t.dtype());
  }
}

// ---------------------------------------------------------------- expert_count
std::vector<Tensor> ExpertCount(const Tensor& ids, int64_t num_experts) {
  constexpr const char* kOp = "semoe_expert_count";
  PD_CHECK(ids.dtype() == DataType::INT32, kOp, ": argument 'ids' must be int32, got ",
           ids.dtype());
  PD_CHECK(num_experts > 0, kOp, ": num_experts must be positive, got ", num_experts);
  Tensor counts = paddle::empty({num_experts}, DataType::INT32, ids.place());
  if (ids.is_gpu()) {
#ifdef PADDLE_WITH_CUDA
    SEMOE_CUDA_OK(semoe::cuda::expert_count(ids.data<int32_t>(), ids.numel(), num_experts,
                                            counts.data<int32_t>(), ids.stream()),
                  kOp);
    return {counts};
#else
    PD_THROW(kOp, ": GPU tensor given but the op library was built without CUDA");
#endif
  }
  semoe::expert_count_cpu(ids.data<int32_t>(), ids.numel(), num_experts,
                          counts.data<int32_t>());
  return {counts};
}

std::vector<std::vector<int64_t>> ExpertCountShape(const std::vector<int64_t>&,
                                                   int64_t num_experts) {
  return {{num_experts}};
}
std::vector<DataType> ExpertCountDtype(const DataType&) { return {DataType::INT32}; }

// ---------------------------------------------------------------- gate_dispatch
void check_gate_inputs(const char* op, const Tensor& x, const Tensor& logits, const Tensor& noise,
                       const Tensor& bias, int64_t top_k, int64_t capacity_rule,
                       bool batch_priority, int64_t min_capacity, int64_t score_fn) {
  check_rows_dtype(op, "x", x, x.is_gpu());
  PD_CHECK(x.shape().size() == 2, op, ": argument 'x' must have shape [T, D], got ",
           semoe::shape_str(x.shape()));
  semoe::check_tensor(op, "logits", logits, DataType::FLOAT32, 2, "[T, E]");
  semoe::check_same_place(op, "logits", logits, x);
  semoe::check_dim(op, "logits.shape[0] (tokens)", logits.shape()[0], x.shape()[0]);
  const int64_t E = logits.shape()[1];
  PD_CHECK(E > 0, op, ": logits must have at least one expert column");
  PD_CHECK(top_k >= 1 && top_k <= E, op, ": top_k must be in [1, num_experts=", E, "], got ",
           top_k);
  PD_CHECK(noise.dtype() == DataType::FLOAT32, op, ": argument 'noise' must be float32, got ",
           noise.dtype());
  PD_CHECK(noise.numel() == 0 || noise.numel() == x.shape()[0], op,
           ": argument 'noise' must have T=", x.shape()[0], " elements or none, got ",
           noise.numel());
  if (noise.numel() > 0) semoe::check_same_place(op, "noise", noise, x);
  PD_CHECK(semoe::valid_capacity_rule(capacity_rule), op,
           ": capacity_rule must be 0 (choice-major), 1 (token-major) or 2 (probs), got ",
           capacity_rule);
  PD_CHECK(!(batch_priority && capacity_rule == 2), op,
           ": batch_priority orders tokens for the position rules; it cannot be combined with "
           "capacity_rule 2 (probs)");
  PD_CHECK(min_capacity >= 0, op, ": min_capacity must be >= 0, got ", min_capacity);
  PD_CHECK(semoe::valid_score_fn(score_fn), op,
           ": score_fn must be 0 (softmax) or 1 (sigmoid), got ", score_fn);
  PD_CHECK(bias.dtype() == DataType::FLOAT32, op,
           ": argument 'select_bias' must be float32, got ", bias.dtype());
  const int64_t T = x.shape()[0];
  const bool per_expert = bias.shape().size() == 1 && bias.numel() == E;
  const bool per_token = bias.shape().size() == 2 && bias.shape()[0] == T && bias.shape()[1] == E;
  PD_CHECK(bias.numel() == 0 || per_expert || per_token, op,
           ": argument 'select_bias' must have shape [0], [E=", E, "] or [T=", T, ", E=", E,
           "], got ", semoe::shape_str(bias.shape()));
  if (bias.numel() > 0) semoe::check_same_place(op, "select_bias", bias, x);
}

std::vector<Tensor> GateDispatch(const Tensor& x, const Tensor& logits, const Tensor& noise,
                                 const Tensor& bias, int64_t top_k,
                                 int64_t capacity_factor_micro, bool normalize,
                                 int64_t capacity_rule, bool batch_priority,
                                 int64_t min_capacity, int64_t score_fn) {
  constexpr const char* kOp = "semoe_gate_dispatch";
  check_gate_inputs(kOp, x, logits, noise, bias, top_k, capacity_rule, batch_priority,
                    min_capacity, score_fn);
  const int64_t T = x.shape()[0], D = x.shape()[1], E = logits.shape()[1], K = top_k;
  const int64_t cap = semoe::expert_capacity(T, E, K, capacity_factor_micro, min_capacity);
  const auto rule = static_cast<semoe::CapacityRule>(capacity_rule);
  const int64_t n_rows = semoe::dispatch_rows(T, E, K, cap);
  const auto place = x.place();
  Tensor rows = paddle::empty({n_rows, D}, x.dtype(), place);
  Tensor weights = paddle::empty({T, K}, DataType::FLOAT32, place);
  Tensor ids = paddle::empty({T, K}, DataType::INT32, place);
  Tensor pos = paddle::empty({T, K}, DataType::INT32, place);
  Tensor counts = paddle::empty({E}, DataType::INT32, place);
  Tensor probs = paddle::empty({T, E}, DataType::FLOAT32, place);
  const float* noise_ptr = noise.numel() > 0 ? noise.data<float>() : nullptr;
  const float* bias_ptr = bias.numel() > 0 ? bias.data<float>() : nullptr;
  const bool bias_per_token = bias.shape().size() == 2;
  const auto fn = static_cast<semoe::ScoreFn>(score_fn);
  if (x.is_gpu()) {
#ifdef PADDLE_WITH_CUDA
    const size_t ws_bytes = semoe::cuda::gate_dispatch_workspace_bytes(T, E, K);
    Tensor ws = paddle::empty({static_cast<int64_t>(ws_bytes) + 1}, DataType::UINT8, place);
    SEMOE_CUDA_OK(semoe::cuda::gate_dispatch(
                      x.data(), cuda_dtype(kOp, x.dtype()), logits.data<float>(), noise_ptr,
                      bias_ptr, bias_per_token, T, D, E, K, cap, normalize,
                      static_cast<int>(fn), static_cast<int>(rule), batch_priority, n_rows,
                      rows.data(), weights.data<float>(),
                      ids.data<int32_t>(), pos.data<int32_t>(), counts.data<int32_t>(),
                      probs.data<float>(), ws.data(), ws_bytes, x.stream()),
                  kOp);
    return {rows, weights, ids, pos, counts, probs};
#else
    PD_THROW(kOp, ": GPU tensor given but the op library was built without CUDA");
#endif
  }
  semoe::gate_dispatch_cpu(x.data<float>(), logits.data<float>(), noise_ptr, bias_ptr,
                           bias_per_token, T, D, E, K, cap, normalize, fn, rule,
                           batch_priority, n_rows, rows.data<float>(),
                           weights.data<float>(),
                           ids.data<int32_t>(), pos.data<int32_t>(), counts.data<int32_t>(),
                           probs.data<float>());
  return {rows, weights, ids, pos, counts, probs};
}

std::vector<std::vector<int64_t>> GateDispatchShape(const std::vector<int64_t>& x,
                                                    const std::vector<int64_t>& logits,
                                                    const std::vector<int64_t>&,
                                                    const std::vector<int64_t>&, int64_t top_k,
                                                    int64_t capacity_factor_micro, bool, int64_t,
                                                    bool, int64_t min_capacity, int64_t) {
  const int64_t T = x[0], D = x[1], E = logits[1];
  int64_t n_rows = -1;
  if (T >= 0 && E > 0) {
    n_rows = semoe::dispatch_rows(
        T, E, top_k, semoe::expert_capacity(T, E, top_k, capacity_factor_micro, min_capacity));
  }
  return {{n_rows, D}, {T, top_k}, {T, top_k}, {T, top_k}, {E}, {T, E}};
}

std::vector<DataType> GateDispatchDtype(const DataType& x, const DataType&, const DataType&,
                                        const DataType&) {
  return {x, DataType::FLOAT32, DataType::INT32, DataType::INT32, DataType::INT32,
          DataType::FLOAT32};
}

std::vector<Tensor> GateDispatchGrad(const Tensor& x, const Tensor& probs, const Tensor& weights,
                                     const Tensor& ids, const Tensor& pos,
                                     const Tensor& grad_rows, const Tensor& grad_weights,
                                     const Tensor& grad_probs, int64_t top_k, int64_t,
                                     bool normalize, int64_t, bool, int64_t, int64_t score_fn) {
  constexpr const char* kOp = "semoe_gate_dispatch_grad";
  const int64_t T = x.shape()[0], D = x.shape()[1], E = probs.shape()[1], K = top_k;
  Tensor grad_x = paddle::empty({T, D}, x.dtype(), x.place());
  Tensor grad_logits = paddle::empty({T, E}, DataType::FLOAT32, x.place());
  const bool has_rows = grad_rows.initialized();
  const bool has_w = grad_weights.initialized();
  const bool has_p = grad_probs.initialized();
  if (x.is_gpu()) {
#ifdef PADDLE_WITH_CUDA
    SEMOE_CUDA_OK(semoe::cuda::gate_dispatch_grad(
                      probs.data<float>(), weights.data<float>(), ids.data<int32_t>(),
                      pos.data<int32_t>(), has_rows ? grad_rows.data() : nullptr,
                      cuda_dtype(kOp, x.dtype()), has_w ? grad_weights.data<float>() : nullptr,
                      has_p ? grad_probs.data<float>() : nullptr, T, D, E, K, normalize,
                      static_cast<int>(score_fn), grad_x.data(), grad_logits.data<float>(),
                      x.stream()),
                  kOp);
    return {grad_x, grad_logits};
#else
    PD_THROW(kOp, ": GPU tensor given but the op library was built without CUDA");
#endif
  }
  semoe::gate_dispatch_grad_cpu(probs.data<float>(), weights.data<float>(), ids.data<int32_t>(),
                                pos.data<int32_t>(), has_rows ? grad_rows.data<float>() : nullptr,
                                has_w ? grad_weights.data<float>() : nullptr,
                                has_p ? grad_probs.data<float>() : nullptr, T, D, E, K,
                                normalize, static_cast<semoe::ScoreFn>(score_fn),
                                grad_x.data<float>(), grad_logits.data<float>());
  return {grad_x, grad_logits};
}

// ---------------------------------------------------------------- combine
void check_combine_inputs(const char* op, const Tensor& rows, const Tensor& weights,
                          const Tensor& pos) {
  check_rows_dtype(op, "rows", rows, rows.is_gpu());
  PD_CHECK(rows.shape().size() == 2, op, ": argument 'rows' must have shape [R, D], got ",
           semoe::shape_str(rows.shape()));
  semoe::check_tensor(op, "weights", weights, DataType::FLOAT32, 2, "[T, K]");
  semoe::check_tensor(op, "positions", pos, DataType::INT32, 2, "[T, K]");
  PD_CHECK(weights.shape() == pos.shape(), op, ": 'weights' ", semoe::shape_str(weights.shape()),
           " and 'positions' ", semoe::shape_str(pos.shape()), " must have the same shape");
  semoe::check_same_place(op, "weights", weights, rows);
  semoe::check_same_place(op, "positions", pos, rows);
}

std::vector<Tensor> Combine(const Tensor& rows, const Tensor& weights, const Tensor& pos) {
  constexpr const char* kOp = "semoe_combine";
  check_combine_inputs(kOp, rows, weights, pos);
  const int64_t T = pos.shape()[0], K = pos.shape()[1], D = rows.shape()[1];
  const int64_t R = rows.shape()[0];
  Tensor out = paddle::empty({T, D}, rows.dtype(), rows.place());
  if (rows.is_gpu()) {
#ifdef PADDLE_WITH_CUDA
    SEMOE_CUDA_OK(semoe::cuda::combine(rows.data(), cuda_dtype(kOp, rows.dtype()),
                                       weights.data<float>(), pos.data<int32_t>(), T, K, D,
                                       out.data(), rows.stream()),
                  kOp);
    return {out};
#else
    PD_THROW(kOp, ": GPU tensor given but the op library was built without CUDA");
#endif
  }
  std::vector<uint8_t> referenced(static_cast<size_t>(R));
  const int64_t bad = semoe::check_positions(pos.data<int32_t>(), T * K, R, referenced.data());
  PD_CHECK(bad < 0, kOp, ": positions[", bad / K, ", ", bad % K, "] = ",
           bad < 0 ? 0 : pos.data<int32_t>()[bad], " is out of range [-1, ", R,
           ") or repeats an earlier position");
  semoe::combine_cpu(rows.data<float>(), weights.data<float>(), pos.data<int32_t>(), T, K, D,
                     out.data<float>());
  return {out};
}

std::vector<std::vector<int64_t>> CombineShape(const std::vector<int64_t>& rows,
                                               const std::vector<int64_t>&,
                                               const std::vector<int64_t>& pos) {
  return {{pos[0], rows[1]}};
}
std::vector<DataType> CombineDtype(const DataType& rows, const DataType&, const DataType&) {
  return {rows};
}

std::vector<Tensor> CombineGrad(const Tensor& rows, const Tensor& weights, const Tensor& pos,
                                const Tensor& grad_out) {
  constexpr const char* kOp = "semoe_combine_grad";
  const int64_t T = pos.shape()[0], K = pos.shape()[1], D = rows.shape()[1];
  const int64_t R = rows.shape()[0];
  Tensor grad_rows = paddle::empty({R, D}, rows.dtype(), rows.place());
  Tensor grad_weights = paddle::empty({T, K}, DataType::FLOAT32, rows.place());
  if (rows.is_gpu()) {
#ifdef PADDLE_WITH_CUDA
    const size_t ws_bytes = semoe::cuda::combine_grad_workspace_bytes(R);
    Tensor ws = paddle::empty({static_cast<int64_t>(ws_bytes) + 1}, DataType::UINT8, rows.place());
    SEMOE_CUDA_OK(semoe::cuda::combine_grad(rows.data(), cuda_dtype(kOp, rows.dtype()),
                                            weights.data<float>(), pos.data<int32_t>(),
                                            grad_out.data(), T, K, D, R, grad_rows.data(),
                                            grad_weights.data<float>(), ws.data(), ws_bytes,
                                            rows.stream()),
                  kOp);
    return {grad_rows, grad_weights};
#else
    PD_THROW(kOp, ": GPU tensor given but the op library was built without CUDA");
#endif
  }
  std::vector<uint8_t> referenced(static_cast<size_t>(R));
  const int64_t bad = semoe::check_positions(pos.data<int32_t>(), T * K, R, referenced.data());
  PD_CHECK(bad < 0, kOp, ": positions[", bad / K, ", ", bad % K, "] = ",
           bad < 0 ? 0 : pos.data<int32_t>()[bad], " is out of range [-1, ", R,
           ") or repeats an earlier position");
  semoe::combine_grad_cpu(rows.data<float>(), weights.data<float>(), pos.data<int32_t>(),
                          grad_out.data<float>(), referenced.data(), T, K, D, R,
                          grad_rows.data<float>(), grad_weights.data<float>());
  return {grad_rows, grad_weights};
}

}  // namespace

PD_BUILD_OP(semoe_expert_count)
    .Inputs({"Ids"})
    .Outputs({"Counts"})
    .Attrs({"num_experts: int64_t"})
    .SetKernelFn(PD_KERNEL(ExpertCount))
    .SetInferShapeFn(PD_INFER_SHAPE(ExpertCountShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ExpertCountDtype));

PD_BUILD_OP(semoe_gate_dispatch)
    .Inputs({"X", "Logits", "Noise", "SelectBias"})
    .Outputs({"Rows", "Weights", "Ids", "Pos", "Counts", "Probs"})
    .Attrs({"top_k: int64_t", "capacity_factor_micro: int64_t", "normalize: bool",
            "capacity_rule: int64_t", "batch_priority: bool", "min_capacity: int64_t",
            "score_fn: int64_t"})
    .SetKernelFn(PD_KERNEL(GateDispatch))
    .SetInferShapeFn(PD_INFER_SHAPE(GateDispatchShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(GateDispatchDtype));

PD_BUILD_GRAD_OP(semoe_gate_dispatch)
    .Inputs({"X", "Probs", "Weights", "Ids", "Pos", paddle::Grad("Rows"), paddle::Grad("Weights"),
             paddle::Grad("Probs")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Logits")})
    .Attrs({"top_k: int64_t", "capacity_factor_micro: int64_t", "normalize: bool",
            "capacity_rule: int64_t", "batch_priority: bool", "min_capacity: int64_t",
            "score_fn: int64_t"})
    .SetKernelFn(PD_KERNEL(GateDispatchGrad));

PD_BUILD_OP(semoe_combine)
    .Inputs({"Rows", "Weights", "Pos"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(Combine))
    .SetInferShapeFn(PD_INFER_SHAPE(CombineShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(CombineDtype));

PD_BUILD_GRAD_OP(semoe_combine)
    .Inputs({"Rows", "Weights", "Pos", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Rows"), paddle::Grad("Weights")})
    .SetKernelFn(PD_KERNEL(CombineGrad));
