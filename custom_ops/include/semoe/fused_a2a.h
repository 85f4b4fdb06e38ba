// Fused expert all-to-all on GPUs, Paddle-free: the row permutation launcher
// (custom_ops/cuda/fused_a2a.cu) and a thin NCCL layer (custom_ops/cuda/fused_a2a_nccl.cu)
// that runs the routes of semoe/a2a_layout.h with grouped ncclSend/ncclRecv.
//
// NCCL is loaded at run time (dlopen of libnccl.so.2) rather than linked, so the op library
// builds and loads on machines whose Paddle has no NCCL to link against, and only the fused
// exchange fails (with a clear message) when NCCL is missing. nccl.h is needed at compile
// time only; without it (or with -DSEMOE_NO_NCCL) the NCCL functions return an error saying
// so. This header does not include nccl.h: communicators travel as opaque pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "semoe/a2a_layout.h"

namespace semoe {
namespace cuda {

// Blocks one launch of permute_row_blocks takes (its table travels as a kernel parameter,
// < 4 KB); larger tables are split over several launches.
constexpr int kPermuteBlocksPerLaunch = 240;

// Block gather of whole rows (any dtype: rows are row_bytes opaque bytes):
//   dst rows [dst_start[k], dst_start[k+1]) = src rows [src_start[k], src_start[k] + len_k),
//   len_k = dst_start[k+1] - dst_start[k] >= 0, for k in [0, num_blocks).
// src_start [num_blocks] and dst_start [num_blocks + 1] are HOST arrays (a2a::BlockPermutation
// src/dst); dst_start must be non-decreasing. dst rows outside [dst_start[0],
// dst_start[num_blocks]) are not touched. src and dst must not overlap. Moves 16-byte packs
// when row_bytes and both pointers allow it (else 8, 4 or 1 bytes). One warp per output row.
cudaError_t permute_row_blocks(const void* src, void* dst, int64_t row_bytes,
                               const int64_t* src_start, const int64_t* dst_start,
                               int64_t num_blocks, cudaStream_t stream);

}  // namespace cuda

namespace nccl {

using Comm = void*;  // ncclComm_t
constexpr int kUniqueIdBytes = 128;  // sizeof(ncclUniqueId)

enum class CountType : int { kInt32 = 0, kInt64 = 1 };

// NCCL_VERSION_CODE of the nccl.h this file was compiled with; 0 when built without NCCL.
int compiled_version();

// Loads NCCL once per process: an already loaded libnccl.so.2 (Paddle's), else `library`
// (a path; "" skips it), else libnccl.so.2 / libnccl.so from the loader's search path.
// *runtime_version gets ncclGetVersion. Returns "" or the reason it failed.
std::string load(const std::string& library, int* runtime_version);

// ncclGetUniqueId into id[kUniqueIdBytes] (host memory).
std::string get_unique_id(char* id);

// ncclCommInitRank on `device` (made current first). Collective over the nranks processes
// that pass the same id; blocks until all have joined.
std::string comm_init(const char* id, int nranks, int rank, int device, Comm* comm);

// ncclCommDestroy (or ncclCommAbort when `abort`, e.g. after an error).
std::string comm_destroy(Comm comm, bool abort);

// recv[r * count + i] = send_of_rank_r[i]: ncclAllGather of `count` integers on `stream`.
std::string all_gather(Comm comm, const void* send, void* recv, int64_t count, CountType type,
                       cudaStream_t stream);

// Waits for `stream` on the host, polling NCCL's asynchronous error state; on an NCCL error,
// or after timeout_ms (> 0), aborts the communicator and returns a message saying so (the
// communicator must not be used again). "" when the stream finished.
std::string wait(Comm comm, cudaStream_t stream, int64_t timeout_ms);

// Backend of a2a::run_route on one GPU stream:
//   permute   -> cuda::permute_row_blocks
//   exchange  -> one ncclGroupStart/End of ncclSend/ncclRecv to the other members
//                (members[g] is the peer's rank in `comm`, i.e. the EP rank), zero-row
//                directions skipped on both sides (both know the split matrix); the block
//                to itself is a device-to-device copy
//   copy/zero -> cudaMemcpyAsync / cudaMemsetAsync
// comm may be nullptr when every exchange of the route has one member. self_via_nccl sends the
// block to itself through ncclSend/ncclRecv too (a one-GPU smoke test of those calls).
class RouteBackend {
 public:
  RouteBackend(Comm comm, cudaStream_t stream, bool self_via_nccl = false)
      : comm_(comm), stream_(stream), self_via_nccl_(self_via_nccl) {}
  std::string permute(const a2a::BlockPermutation& bp, const void* src, void* dst,
                      int64_t row_bytes);
  std::string exchange(const a2a::Exchange& ex, const void* src, void* dst, int64_t row_bytes);
  std::string copy(void* dst, const void* src, size_t bytes);
  std::string zero(void* dst, size_t bytes);

 private:
  Comm comm_;
  cudaStream_t stream_;
  bool self_via_nccl_;
};

}  // namespace nccl
}  // namespace semoe
