// Paddle bindings of the fused expert all-to-all over NCCL (GPU builds of Paddle only; the
// Python side is paddle_semoe/comm/nccl_fused.py). Thin: input checks, allocation, and calls
// into the Paddle-free layers: semoe/a2a_layout.h (every index), semoe/fused_a2a.h (the
// permutation launcher and the NCCL calls).
//
// Ops (all attributes int64 unless noted; `comm` is the ncclComm_t as an integer):
//   semoe_nccl_load(anchor; library: string) -> versions int64[2] CPU
//       loads NCCL (see nccl::load); (NCCL_VERSION_CODE compiled against, runtime version)
//   semoe_nccl_unique_id(anchor; library: string) -> id int64[16] CPU    (ncclGetUniqueId)
//   semoe_nccl_comm_init(id int64[16]; nranks, rank, device) -> comm int64[1] CPU
//   semoe_nccl_comm_destroy(comm int64[1]; abort: bool) -> int64[1] CPU (0)
//   semoe_fused_a2a_dispatch(rows[R, D], counts int32|int64[E]; comm, ep_rank, ep_size,
//           num_local_experts, node_size, hierarchical: bool, timeout_ms)
//       -> local_rows [R_loc, D], local_counts int32 [El] (GPU), count_matrix int64 [P, E] (CPU)
//       count phase (ncclAllGather of counts, then ONE host wait: split sizes and R_loc depend
//       on every rank's counts) and the dispatch route (layout of ExpertExchange.dispatch).
//   semoe_fused_a2a_route(x[n, D], count_matrix int64[P, E]; comm, ep_rank, ep_size,
//           num_local_experts, node_size, hierarchical: bool, inverse: bool, out_rows)
//       -> y [out_rows, D]: the dispatch route (inverse=false) or the combine route
//       (inverse=true) of this count matrix on the first rows of x; rows of y past the route's
//       output are zero; out_rows < 0 means exactly the route's output. No host wait.
// Everything runs on the stream of the input rows (Paddle's compute stream), so the exchange
// is ordered with the kernels around it without extra events.
#ifdef PADDLE_WITH_CUDA

#include <cuda_runtime.h>

#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "paddle/extension.h"
#include "semoe/a2a_layout.h"
#include "semoe/fused_a2a.h"

namespace {

using paddle::DataType;
using paddle::Tensor;

constexpr const char* kLoad = "semoe_nccl_load";
constexpr const char* kUniqueId = "semoe_nccl_unique_id";
constexpr const char* kCommInit = "semoe_nccl_comm_init";
constexpr const char* kCommDestroy = "semoe_nccl_comm_destroy";
constexpr const char* kDispatch = "semoe_fused_a2a_dispatch";
constexpr const char* kRoute = "semoe_fused_a2a_route";
constexpr int64_t kIdWords = semoe::nccl::kUniqueIdBytes / 8;

Tensor cpu_int64(const std::vector<int64_t>& values) {
  Tensor t = paddle::empty({static_cast<int64_t>(values.size())}, DataType::INT64,
                           paddle::CPUPlace());
  if (!values.empty()) std::memcpy(t.data<int64_t>(), values.data(), 8 * values.size());
  return t;
}

void check_ok(const char* op, const std::string& err) { PD_CHECK(err.empty(), op, ": ", err); }

semoe::nccl::Comm comm_of(int64_t handle) {
  return reinterpret_cast<semoe::nccl::Comm>(static_cast<intptr_t>(handle));
}

// Common attribute checks of the exchange ops.
void check_group(const char* op, int64_t comm, int64_t ep_rank, int64_t ep_size,
                 int64_t num_local_experts) {
  PD_CHECK(ep_size >= 1, op, ": ep_size must be >= 1, got ", ep_size);
  PD_CHECK(ep_rank >= 0 && ep_rank < ep_size, op, ": ep_rank=", ep_rank,
           " outside the EP group [0, ", ep_size, ")");
  PD_CHECK(num_local_experts >= 1, op, ": num_local_experts must be >= 1, got ",
           num_local_experts);
  PD_CHECK(comm != 0 || ep_size == 1, op,
           ": comm is 0 (no NCCL communicator) but the EP group has ", ep_size, " ranks");
}

void check_rows(const char* op, const char* arg, const Tensor& t) {
  PD_CHECK(t.is_gpu(), op, ": argument '", arg, "' must be a GPU tensor");
  PD_CHECK(t.shape().size() == 2, op, ": argument '", arg, "' must have shape [rows, D], got ",
           semoe::shape_str(t.shape()));
}

int64_t row_bytes_of(const Tensor& t) {
  return t.shape()[1] * static_cast<int64_t>(phi::SizeOf(t.dtype()));
}

// Runs `route` on x into a new [out_rows, D] tensor (rows past the route's output zeroed).
Tensor run(const char* op, const semoe::a2a::Route& route, const Tensor& x, int64_t out_rows,
           int64_t comm) {
  const int64_t row_bytes = row_bytes_of(x);
  Tensor out = paddle::empty({out_rows, x.shape()[1]}, x.dtype(), x.place());
  const size_t ws_bytes = semoe::a2a::route_workspace_bytes(route, row_bytes);
  Tensor ws = paddle::empty({static_cast<int64_t>(ws_bytes) + 1}, DataType::UINT8, x.place());
  semoe::nccl::RouteBackend backend(comm_of(comm), x.stream());
  check_ok(op, semoe::a2a::run_route(backend, route, x.data(), out.data(), out_rows, row_bytes,
                                     ws.data(), ws_bytes));
  return out;
}

semoe::a2a::Plan plan_of(const char* op, const int64_t* C, int64_t ep_size, int64_t ep_rank,
                         int64_t num_local_experts, int64_t node_size, bool hierarchical) {
  semoe::a2a::Plan plan;
  check_ok(op, semoe::a2a::make_plan(C, ep_size, num_local_experts, ep_rank, node_size,
                                     hierarchical, &plan));
  return plan;
}

// ---------------------------------------------------------------- communicator ops
std::vector<Tensor> NcclLoad(const Tensor&, const std::string& library) {
  int runtime = 0;
  check_ok(kLoad, semoe::nccl::load(library, &runtime));
  return {cpu_int64({semoe::nccl::compiled_version(), runtime})};
}

std::vector<Tensor> NcclUniqueId(const Tensor&, const std::string& library) {
  int runtime = 0;
  check_ok(kUniqueId, semoe::nccl::load(library, &runtime));
  std::vector<int64_t> id(kIdWords);
  check_ok(kUniqueId, semoe::nccl::get_unique_id(reinterpret_cast<char*>(id.data())));
  return {cpu_int64(id)};
}

std::vector<Tensor> NcclCommInit(const Tensor& unique_id, int64_t nranks, int64_t rank,
                                 int64_t device) {
  semoe::check_tensor(kCommInit, "unique_id", unique_id, DataType::INT64, 1, "[16]");
  semoe::check_dim(kCommInit, "unique_id.shape[0]", unique_id.shape()[0], kIdWords);
  const Tensor id = unique_id.is_cpu() ? unique_id : unique_id.copy_to(paddle::CPUPlace(), true);
  semoe::nccl::Comm comm = nullptr;
  check_ok(kCommInit, semoe::nccl::comm_init(reinterpret_cast<const char*>(id.data<int64_t>()),
                                             static_cast<int>(nranks), static_cast<int>(rank),
                                             static_cast<int>(device), &comm));
  return {cpu_int64({static_cast<int64_t>(reinterpret_cast<intptr_t>(comm))})};
}

std::vector<Tensor> NcclCommDestroy(const Tensor& handle, bool abort) {
  semoe::check_tensor(kCommDestroy, "comm", handle, DataType::INT64, 1, "[1]");
  PD_CHECK(handle.is_cpu(), kCommDestroy, ": argument 'comm' must be a CPU tensor");
  semoe::check_dim(kCommDestroy, "comm.shape[0]", handle.shape()[0], 1);
  check_ok(kCommDestroy, semoe::nccl::comm_destroy(comm_of(handle.data<int64_t>()[0]), abort));
  return {cpu_int64({0})};
}

std::vector<std::vector<int64_t>> VersionsShape(const std::vector<int64_t>&, const std::string&) {
  return {{2}};
}
std::vector<std::vector<int64_t>> UniqueIdShape(const std::vector<int64_t>&, const std::string&) {
  return {{kIdWords}};
}
std::vector<std::vector<int64_t>> CommInitShape(const std::vector<int64_t>&, int64_t, int64_t,
                                                int64_t) {
  return {{1}};
}
std::vector<std::vector<int64_t>> CommDestroyShape(const std::vector<int64_t>&, bool) {
  return {{1}};
}
std::vector<DataType> Int64Dtype(const DataType&) { return {DataType::INT64}; }

// ---------------------------------------------------------------- dispatch (counts + rows)
std::vector<Tensor> FusedA2ADispatch(const Tensor& rows, const Tensor& counts, int64_t comm,
                                     int64_t ep_rank, int64_t ep_size, int64_t num_local_experts,
                                     int64_t node_size, bool hierarchical, int64_t timeout_ms) {
  check_rows(kDispatch, "rows", rows);
  check_group(kDispatch, comm, ep_rank, ep_size, num_local_experts);
  PD_CHECK(counts.dtype() == DataType::INT32 || counts.dtype() == DataType::INT64, kDispatch,
           ": argument 'counts' must be int32 or int64, got ", counts.dtype());
  semoe::check_same_place(kDispatch, "counts", counts, rows);
  const int64_t P = ep_size, E = ep_size * num_local_experts;
  PD_CHECK(counts.shape().size() == 1 && counts.shape()[0] == E, kDispatch,
           ": argument 'counts' must have shape [E=", E, "] (ep_size=", P,
           " x num_local_experts=", num_local_experts, "), got ",
           semoe::shape_str(counts.shape()));
  const auto stream = rows.stream();

  // Count phase: every rank's counts, then the one host wait of the exchange.
  Tensor gathered = paddle::empty({P * E}, counts.dtype(), rows.place());
  if (comm != 0) {
    check_ok(kDispatch, semoe::nccl::all_gather(
                            comm_of(comm), counts.data(), gathered.data(), E,
                            counts.dtype() == DataType::INT64 ? semoe::nccl::CountType::kInt64
                                                              : semoe::nccl::CountType::kInt32,
                            stream));
  } else {
    const cudaError_t e = cudaMemcpyAsync(gathered.data(), counts.data(),
                                          static_cast<size_t>(E) * phi::SizeOf(counts.dtype()),
                                          cudaMemcpyDeviceToDevice, stream);
    PD_CHECK(e == cudaSuccess, kDispatch, ": copying counts: ", cudaGetErrorString(e));
  }
  check_ok(kDispatch, semoe::nccl::wait(comm_of(comm), stream, timeout_ms));
  const Tensor host = gathered.copy_to(paddle::CPUPlace(), true);
  Tensor C = paddle::empty({P, E}, DataType::INT64, paddle::CPUPlace());
  int64_t* c = C.data<int64_t>();
  for (int64_t i = 0; i < P * E; ++i) {
    c[i] = counts.dtype() == DataType::INT64 ? host.data<int64_t>()[i]
                                             : static_cast<int64_t>(host.data<int32_t>()[i]);
  }
  const semoe::a2a::Plan plan = plan_of(kDispatch, c, P, ep_rank, num_local_experts, node_size,
                                        hierarchical);
  PD_CHECK(rows.shape()[0] >= plan.send_rows, kDispatch, ": argument 'rows' has ",
           rows.shape()[0], " rows but counts sum to ", plan.send_rows,
           ": rows must hold sum(counts) expert-major rows (plus optional padding)");

  // local_counts goes up while the stream is idle (a blocking copy costs nothing here).
  Tensor lc = paddle::empty({num_local_experts}, DataType::INT32, paddle::CPUPlace());
  for (int64_t e = 0; e < num_local_experts; ++e) {
    lc.data<int32_t>()[e] = static_cast<int32_t>(plan.local_counts[e]);
  }
  Tensor local_counts = lc.copy_to(rows.place(), true);
  Tensor local_rows = run(kDispatch, plan.dispatch, rows, plan.local_rows, comm);
  return {local_rows, local_counts, C};
}

std::vector<std::vector<int64_t>> FusedA2ADispatchShape(const std::vector<int64_t>& rows,
                                                        const std::vector<int64_t>&, int64_t,
                                                        int64_t, int64_t ep_size,
                                                        int64_t num_local_experts, int64_t, bool,
                                                        int64_t) {
  return {{-1, rows.size() == 2 ? rows[1] : -1},
          {num_local_experts},
          {ep_size, ep_size * num_local_experts}};
}

std::vector<DataType> FusedA2ADispatchDtype(const DataType& rows, const DataType&) {
  return {rows, DataType::INT32, DataType::INT64};
}

// ---------------------------------------------------------------- rows only (a known plan)
std::vector<Tensor> FusedA2ARoute(const Tensor& x, const Tensor& count_matrix, int64_t comm,
                                  int64_t ep_rank, int64_t ep_size, int64_t num_local_experts,
                                  int64_t node_size, bool hierarchical, bool inverse,
                                  int64_t out_rows) {
  check_rows(kRoute, "x", x);
  check_group(kRoute, comm, ep_rank, ep_size, num_local_experts);
  semoe::check_tensor(kRoute, "count_matrix", count_matrix, DataType::INT64, 2, "[P, E]");
  PD_CHECK(count_matrix.shape()[0] == ep_size &&
               count_matrix.shape()[1] == ep_size * num_local_experts,
           kRoute, ": argument 'count_matrix' must have shape [P=", ep_size,
           ", E=", ep_size * num_local_experts, "], got ",
           semoe::shape_str(count_matrix.shape()));
  const Tensor C =
      count_matrix.is_cpu() ? count_matrix : count_matrix.copy_to(paddle::CPUPlace(), true);
  const semoe::a2a::Plan plan = plan_of(kRoute, C.data<int64_t>(), ep_size, ep_rank,
                                        num_local_experts, node_size, hierarchical);
  const semoe::a2a::Route& route = inverse ? plan.combine : plan.dispatch;
  PD_CHECK(x.shape()[0] >= route.rows_in, kRoute, ": argument 'x' has ", x.shape()[0],
           " rows, the ", inverse ? "combine" : "dispatch", " route of this count matrix reads ",
           route.rows_in);
  if (out_rows < 0) out_rows = route.rows_out;
  PD_CHECK(out_rows >= route.rows_out, kRoute, ": out_rows=", out_rows, " is less than the ",
           route.rows_out, " rows the route produces");
  return {run(kRoute, route, x, out_rows, comm)};
}

std::vector<std::vector<int64_t>> FusedA2ARouteShape(const std::vector<int64_t>& x,
                                                     const std::vector<int64_t>&, int64_t,
                                                     int64_t, int64_t, int64_t, int64_t, bool,
                                                     bool, int64_t out_rows) {
  return {{out_rows >= 0 ? out_rows : -1, x.size() == 2 ? x[1] : -1}};
}

std::vector<DataType> FusedA2ARouteDtype(const DataType& x, const DataType&) { return {x}; }

}  // namespace

PD_BUILD_OP(semoe_nccl_load)
    .Inputs({"Anchor"})
    .Outputs({"Versions"})
    .Attrs({"library: std::string"})
    .SetKernelFn(PD_KERNEL(NcclLoad))
    .SetInferShapeFn(PD_INFER_SHAPE(VersionsShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Int64Dtype));

PD_BUILD_OP(semoe_nccl_unique_id)
    .Inputs({"Anchor"})
    .Outputs({"UniqueId"})
    .Attrs({"library: std::string"})
    .SetKernelFn(PD_KERNEL(NcclUniqueId))
    .SetInferShapeFn(PD_INFER_SHAPE(UniqueIdShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Int64Dtype));

PD_BUILD_OP(semoe_nccl_comm_init)
    .Inputs({"UniqueId"})
    .Outputs({"Comm"})
    .Attrs({"nranks: int64_t", "rank: int64_t", "device: int64_t"})
    .SetKernelFn(PD_KERNEL(NcclCommInit))
    .SetInferShapeFn(PD_INFER_SHAPE(CommInitShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Int64Dtype));

PD_BUILD_OP(semoe_nccl_comm_destroy)
    .Inputs({"Comm"})
    .Outputs({"Status"})
    .Attrs({"abort: bool"})
    .SetKernelFn(PD_KERNEL(NcclCommDestroy))
    .SetInferShapeFn(PD_INFER_SHAPE(CommDestroyShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Int64Dtype));

PD_BUILD_OP(semoe_fused_a2a_dispatch)
    .Inputs({"Rows", "Counts"})
    .Outputs({"LocalRows", "LocalCounts", "CountMatrix"})
    .Attrs({"comm: int64_t", "ep_rank: int64_t", "ep_size: int64_t",
            "num_local_experts: int64_t", "node_size: int64_t", "hierarchical: bool",
            "timeout_ms: int64_t"})
    .SetKernelFn(PD_KERNEL(FusedA2ADispatch))
    .SetInferShapeFn(PD_INFER_SHAPE(FusedA2ADispatchShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FusedA2ADispatchDtype));

PD_BUILD_OP(semoe_fused_a2a_route)
    .Inputs({"X", "CountMatrix"})
    .Outputs({"Y"})
    .Attrs({"comm: int64_t", "ep_rank: int64_t", "ep_size: int64_t",
            "num_local_experts: int64_t", "node_size: int64_t", "hierarchical: bool",
            "inverse: bool", "out_rows: int64_t"})
    .SetKernelFn(PD_KERNEL(FusedA2ARoute))
    .SetInferShapeFn(PD_INFER_SHAPE(FusedA2ARouteShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FusedA2ARouteDtype));

#endif  // PADDLE_WITH_CUDA
