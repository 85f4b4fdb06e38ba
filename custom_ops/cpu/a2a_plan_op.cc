// semoe_a2a_plan: the exchange layout of semoe/a2a_layout.h as int64 CPU tensors, so the
// CPU build compiles the arithmetic the fused NCCL op uses and tests/ops/test_a2a_layout.py
// can compare it with paddle_semoe/comm/layout.py. No gradient; CPU only (host arithmetic).
#include <vector>

#include "check.h"
#include "paddle/extension.h"
#include "semoe/a2a_layout.h"

namespace {

using paddle::DataType;
using paddle::Tensor;

constexpr const char* kOp = "semoe_a2a_plan";

Tensor int64_tensor(const std::vector<int64_t>& values, std::vector<int64_t> shape) {
  Tensor t = paddle::empty(shape, DataType::INT64, paddle::CPUPlace());
  if (!values.empty()) std::copy(values.begin(), values.end(), t.data<int64_t>());
  return t;
}

// Inputs: count_matrix int64 [P, P*El] (CPU).
// Attrs: ep_rank, num_local_experts, node_size (EP ranks per node; used when hierarchical),
//        hierarchical, inverse (return the combine route instead of the dispatch route).
// Outputs (all int64, CPU):
//   local_counts [El]      rows per local expert after dispatch
//   sizes [2]              (rows the dispatch consumes, rows it produces)
//   steps [n, 4]           per step: kind (0 permutation, 1 exchange), group (-1, or 0 ep,
//                          1 intra-node, 2 inter-node), rows in, rows out
//   perms [sum rows]       row indices (out = x[index]) of the permutation steps, concatenated
//   splits [sum G*G]       split matrices [G, G] of the exchange steps, concatenated
//   members [sum G]        EP rank of each member of each exchange group, concatenated
std::vector<Tensor> A2APlan(const Tensor& count_matrix, int64_t ep_rank, int64_t num_local_experts,
                            int64_t node_size, bool hierarchical, bool inverse) {
  PD_CHECK(count_matrix.is_cpu(), kOp, ": argument 'count_matrix' must be a CPU tensor");
  semoe::check_tensor(kOp, "count_matrix", count_matrix, DataType::INT64, 2, "[P, E]");
  const int64_t P = count_matrix.shape()[0];
  PD_CHECK(P >= 1, kOp, ": argument 'count_matrix' must have at least one row (EP rank)");
  PD_CHECK(num_local_experts >= 1, kOp, ": num_local_experts must be >= 1, got ",
           num_local_experts);
  PD_CHECK(count_matrix.shape()[1] == P * num_local_experts, kOp,
           ": argument 'count_matrix' must have shape [P=", P,
           ", E=", P * num_local_experts, "] (num_local_experts=", num_local_experts, "), got ",
           semoe::shape_str(count_matrix.shape()));
  semoe::a2a::Plan plan;
  const std::string err = semoe::a2a::make_plan(count_matrix.data<int64_t>(), P,
                                                num_local_experts, ep_rank, node_size,
                                                hierarchical, &plan);
  PD_CHECK(err.empty(), kOp, ": ", err);
  const semoe::a2a::Route& route = inverse ? plan.combine : plan.dispatch;

  std::vector<int64_t> steps, perms, splits, members;
  for (const auto& s : route.steps) {
    steps.push_back(s.is_exchange ? 1 : 0);
    steps.push_back(s.is_exchange ? static_cast<int64_t>(s.exchange.group) : -1);
    steps.push_back(s.rows_in());
    steps.push_back(s.rows_out());
    if (s.is_exchange) {
      splits.insert(splits.end(), s.exchange.splits.begin(), s.exchange.splits.end());
      members.insert(members.end(), s.exchange.members.begin(), s.exchange.members.end());
    } else {
      const std::vector<int64_t> index = semoe::a2a::expand(s.permute);
      perms.insert(perms.end(), index.begin(), index.end());
    }
  }
  const int64_t n_steps = static_cast<int64_t>(route.steps.size());
  return {int64_tensor(plan.local_counts, {num_local_experts}),
          int64_tensor({route.rows_in, route.rows_out}, {2}),
          int64_tensor(steps, {n_steps, 4}),
          int64_tensor(perms, {static_cast<int64_t>(perms.size())}),
          int64_tensor(splits, {static_cast<int64_t>(splits.size())}),
          int64_tensor(members, {static_cast<int64_t>(members.size())})};
}

std::vector<std::vector<int64_t>> A2APlanShape(const std::vector<int64_t>&, int64_t, int64_t El,
                                               int64_t, bool, bool) {
  return {{El}, {2}, {-1, 4}, {-1}, {-1}, {-1}};
}

std::vector<DataType> A2APlanDtype(const DataType&) {
  return std::vector<DataType>(6, DataType::INT64);
}

}  // namespace

PD_BUILD_OP(semoe_a2a_plan)
    .Inputs({"CountMatrix"})
    .Outputs({"LocalCounts", "Sizes", "Steps", "Perms", "Splits", "Members"})
    .Attrs({"ep_rank: int64_t", "num_local_experts: int64_t", "node_size: int64_t",
            "hierarchical: bool", "inverse: bool"})
    .SetKernelFn(PD_KERNEL(A2APlan))
    .SetInferShapeFn(PD_INFER_SHAPE(A2APlanShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(A2APlanDtype));
