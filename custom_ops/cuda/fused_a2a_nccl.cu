// Thin NCCL layer of the fused expert all-to-all (semoe/fused_a2a.h): loading NCCL,
// communicator bootstrap, the count all-gather, the grouped send/recv of one exchange step,
// and a host wait that notices NCCL errors and time-outs. Host code only; Paddle-free.
// All index arithmetic (which rows go where) comes from semoe/a2a_layout.h.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "semoe/fused_a2a.h"

#if !defined(SEMOE_NO_NCCL) && defined(__has_include)
#if __has_include(<nccl.h>)
#include <nccl.h>
#define SEMOE_HAVE_NCCL 1
#endif
#endif

namespace semoe {
namespace nccl {
namespace {

std::string cuda_error(const char* what, cudaError_t e) {
  return std::string(what) + ": CUDA error " + cudaGetErrorName(e) + " (" +
         cudaGetErrorString(e) + ")";
}

}  // namespace

// ---------------------------------------------------------------- stream helpers (no NCCL)
std::string RouteBackend::permute(const a2a::BlockPermutation& bp, const void* src, void* dst,
                                  int64_t row_bytes) {
  const cudaError_t e = cuda::permute_row_blocks(src, dst, row_bytes, bp.src.data(),
                                                 bp.dst.data(), bp.num_blocks(), stream_);
  return e == cudaSuccess ? "" : cuda_error("permute_row_blocks", e);
}

std::string RouteBackend::copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return "";
  const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_);
  return e == cudaSuccess ? "" : cuda_error("cudaMemcpyAsync", e);
}

std::string RouteBackend::zero(void* dst, size_t bytes) {
  if (bytes == 0) return "";
  const cudaError_t e = cudaMemsetAsync(dst, 0, bytes, stream_);
  return e == cudaSuccess ? "" : cuda_error("cudaMemsetAsync", e);
}

#ifdef SEMOE_HAVE_NCCL
static_assert(sizeof(ncclUniqueId) == kUniqueIdBytes, "ncclUniqueId is 128 bytes");

namespace {

// The NCCL entry points this layer uses, resolved by dlsym.
struct Api {
  decltype(&ncclGetVersion) get_version = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRank) comm_init_rank = nullptr;
  decltype(&ncclCommDestroy) comm_destroy = nullptr;
  decltype(&ncclCommAbort) comm_abort = nullptr;
  decltype(&ncclCommGetAsyncError) get_async_error = nullptr;
  decltype(&ncclGroupStart) group_start = nullptr;
  decltype(&ncclGroupEnd) group_end = nullptr;
  decltype(&ncclSend) send = nullptr;
  decltype(&ncclRecv) recv = nullptr;
  decltype(&ncclAllGather) all_gather = nullptr;
  const char* (*last_error)(ncclComm_t) = nullptr;  // ncclGetLastError: NCCL >= 2.13, optional
  int version = 0;
  std::string library;  // what was loaded
};

std::mutex g_mutex;
Api g_api;
bool g_loaded = false;

template <typename F>
bool resolve(void* handle, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(handle, name));
  return *fn != nullptr;
}

std::string load_locked(const std::string& library) {
  if (g_loaded) return "";
  void* handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_NOLOAD);  // Paddle's, if loaded
  std::string which = "libnccl.so.2 (already loaded)";
  std::string tried;
  auto attempt = [&](const std::string& name) {
    if (handle != nullptr || name.empty()) return;
    handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    which = name;
    if (handle == nullptr) {
      const char* why = dlerror();
      tried += "\n  " + name + ": " + (why ? why : "not found");
    }
  };
  attempt(library);
  attempt("libnccl.so.2");
  attempt("libnccl.so");
  if (handle == nullptr) {
    return "could not load NCCL (install the nvidia-nccl-cu12/cu13 wheel that matches your "
           "CUDA, or set SEMOE_NCCL_LIB to libnccl.so.2); tried:" + tried;
  }
  Api api;
  const bool ok =
      resolve(handle, "ncclGetVersion", &api.get_version) &&
      resolve(handle, "ncclGetErrorString", &api.error_string) &&
      resolve(handle, "ncclGetUniqueId", &api.get_unique_id) &&
      resolve(handle, "ncclCommInitRank", &api.comm_init_rank) &&
      resolve(handle, "ncclCommDestroy", &api.comm_destroy) &&
      resolve(handle, "ncclCommAbort", &api.comm_abort) &&
      resolve(handle, "ncclCommGetAsyncError", &api.get_async_error) &&
      resolve(handle, "ncclGroupStart", &api.group_start) &&
      resolve(handle, "ncclGroupEnd", &api.group_end) &&
      resolve(handle, "ncclSend", &api.send) && resolve(handle, "ncclRecv", &api.recv) &&
      resolve(handle, "ncclAllGather", &api.all_gather);
  if (!ok) {
    const char* why = dlerror();
    return which + " lacks NCCL entry points this op needs (NCCL >= 2.7 required): " +
           (why ? why : "?");
  }
  resolve(handle, "ncclGetLastError", &api.last_error);
  if (api.get_version(&api.version) != ncclSuccess) return which + ": ncclGetVersion failed";
  if (api.version < 20700) {
    return which + " is NCCL " + std::to_string(api.version) +
           "; grouped ncclSend/ncclRecv need NCCL >= 2.7";
  }
  api.library = which;
  g_api = api;
  g_loaded = true;
  return "";
}

const Api* api_or(std::string* err) {
  std::lock_guard<std::mutex> lock(g_mutex);
  *err = load_locked("");
  return err->empty() ? &g_api : nullptr;
}

std::string nccl_error(const Api& api, const char* what, ncclResult_t r, ncclComm_t comm) {
  std::string msg = std::string(what) + ": NCCL error " + std::to_string(static_cast<int>(r)) +
                    " (" + api.error_string(r) + ")";
  if (api.last_error != nullptr) {
    const char* last = api.last_error(comm);
    if (last != nullptr && last[0] != '\0') msg += ": " + std::string(last);
  }
  return msg;
}

#define SEMOE_NCCL_TRY(api, what, expr, comm)                        \
  do {                                                               \
    const ncclResult_t semoe_r_ = (expr);                            \
    if (semoe_r_ != ncclSuccess) return nccl_error(api, what, semoe_r_, comm); \
  } while (0)

}  // namespace

int compiled_version() { return NCCL_VERSION_CODE; }

std::string load(const std::string& library, int* runtime_version) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const std::string err = load_locked(library);
  if (err.empty() && runtime_version != nullptr) *runtime_version = g_api.version;
  return err;
}

std::string get_unique_id(char* id) {
  std::string err;
  const Api* api = api_or(&err);
  if (api == nullptr) return err;
  ncclUniqueId uid;
  SEMOE_NCCL_TRY(*api, "ncclGetUniqueId", api->get_unique_id(&uid), nullptr);
  std::memcpy(id, &uid, sizeof(uid));
  return "";
}

std::string comm_init(const char* id, int nranks, int rank, int device, Comm* comm) {
  std::string err;
  const Api* api = api_or(&err);
  if (api == nullptr) return err;
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    return "comm_init: rank " + std::to_string(rank) + " outside [0, " + std::to_string(nranks) +
           ")";
  }
  const cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return cuda_error("cudaSetDevice", e);
  ncclUniqueId uid;
  std::memcpy(&uid, id, sizeof(uid));
  ncclComm_t c = nullptr;
  SEMOE_NCCL_TRY(*api, "ncclCommInitRank", api->comm_init_rank(&c, nranks, uid, rank), nullptr);
  *comm = c;
  return "";
}

std::string comm_destroy(Comm comm, bool abort) {
  if (comm == nullptr) return "";
  std::string err;
  const Api* api = api_or(&err);
  if (api == nullptr) return err;
  ncclComm_t c = static_cast<ncclComm_t>(comm);
  if (abort) {
    SEMOE_NCCL_TRY(*api, "ncclCommAbort", api->comm_abort(c), nullptr);
  } else {
    SEMOE_NCCL_TRY(*api, "ncclCommDestroy", api->comm_destroy(c), nullptr);
  }
  return "";
}

std::string all_gather(Comm comm, const void* send, void* recv, int64_t count, CountType type,
                       cudaStream_t stream) {
  std::string err;
  const Api* api = api_or(&err);
  if (api == nullptr) return err;
  if (comm == nullptr) return "all_gather: no communicator";
  if (count == 0) return "";
  ncclComm_t c = static_cast<ncclComm_t>(comm);
  const ncclDataType_t dt = type == CountType::kInt64 ? ncclInt64 : ncclInt32;
  SEMOE_NCCL_TRY(*api, "ncclAllGather",
                 api->all_gather(send, recv, static_cast<size_t>(count), dt, c, stream), c);
  return "";
}

std::string wait(Comm comm, cudaStream_t stream, int64_t timeout_ms) {
  std::string err;
  const Api* api = comm != nullptr ? api_or(&err) : nullptr;
  if (comm != nullptr && api == nullptr) return err;
  const auto start = std::chrono::steady_clock::now();
  auto pause = std::chrono::microseconds(0);
  while (true) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return "";
    if (e != cudaErrorNotReady) return cuda_error("waiting for the exchange", e);
    if (api != nullptr) {
      ncclComm_t c = static_cast<ncclComm_t>(comm);
      ncclResult_t async = ncclSuccess;
      const ncclResult_t r = api->get_async_error(c, &async);
      if (r != ncclSuccess || async != ncclSuccess) {
        const std::string msg = nccl_error(*api, "NCCL reported an error while exchanging",
                                           r != ncclSuccess ? r : async, c);
        api->comm_abort(c);
        return msg + "; the communicator was aborted";
      }
    }
    const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now() - start)
                            .count();
    if (timeout_ms > 0 && waited > timeout_ms) {
      if (api != nullptr) api->comm_abort(static_cast<ncclComm_t>(comm));
      return "the exchange did not finish within " + std::to_string(timeout_ms) +
             " ms (a peer missing or stuck?); the communicator was aborted";
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2 + std::chrono::microseconds(1), std::chrono::microseconds(200));
  }
}

std::string RouteBackend::exchange(const a2a::Exchange& ex, const void* src, void* dst,
                                   int64_t row_bytes) {
  const char* in = static_cast<const char*>(src);
  char* out = static_cast<char*>(dst);
  int64_t send_off = 0, recv_off = 0, self_src = 0, self_dst = 0;
  std::vector<int64_t> send_at(static_cast<size_t>(ex.size)), recv_at(static_cast<size_t>(ex.size));
  bool remote = false;
  for (int64_t g = 0; g < ex.size; ++g) {
    send_at[g] = send_off;
    recv_at[g] = recv_off;
    if (g == ex.me) {
      self_src = send_off;
      self_dst = recv_off;
    }
    if ((g != ex.me || self_via_nccl_) && (ex.send(g) > 0 || ex.recv(g) > 0)) remote = true;
    send_off += ex.send(g);
    recv_off += ex.recv(g);
  }
  if (remote) {
    std::string err;
    const Api* api = api_or(&err);
    if (api == nullptr) return err;
    if (comm_ == nullptr) return "exchange with peers but no communicator";
    ncclComm_t c = static_cast<ncclComm_t>(comm_);
    SEMOE_NCCL_TRY(*api, "ncclGroupStart", api->group_start(), c);
    std::string failed;
    for (int64_t g = 0; g < ex.size && failed.empty(); ++g) {
      if (g == ex.me && !self_via_nccl_) continue;
      const int peer = static_cast<int>(ex.members[g]);
      ncclResult_t r = ncclSuccess;
      if (ex.send(g) > 0) {
        r = api->send(in + send_at[g] * row_bytes, static_cast<size_t>(ex.send(g) * row_bytes),
                      ncclUint8, peer, c, stream_);
      }
      if (r == ncclSuccess && ex.recv(g) > 0) {
        r = api->recv(out + recv_at[g] * row_bytes, static_cast<size_t>(ex.recv(g) * row_bytes),
                      ncclUint8, peer, c, stream_);
      }
      if (r != ncclSuccess) {
        failed = nccl_error(*api, ("send/recv with rank " + std::to_string(peer)).c_str(), r, c);
      }
    }
    const ncclResult_t end = api->group_end();  // always close the group
    if (!failed.empty()) return failed;
    if (end != ncclSuccess) return nccl_error(*api, "ncclGroupEnd", end, c);
    if (self_via_nccl_) return "";
  }
  const int64_t self_rows = ex.send(ex.me);
  return copy(out + self_dst * row_bytes, in + self_src * row_bytes,
              static_cast<size_t>(self_rows * row_bytes));
}

#else  // !SEMOE_HAVE_NCCL: every NCCL entry point explains why it cannot work.

namespace {
const char* kNoNccl =
    "the op library was compiled without nccl.h (install the nvidia-nccl-cu12/cu13 wheel or "
    "libnccl-dev and rebuild the ops): the fused NCCL all-to-all is unavailable";
}  // namespace

int compiled_version() { return 0; }
std::string load(const std::string&, int*) { return kNoNccl; }
std::string get_unique_id(char*) { return kNoNccl; }
std::string comm_init(const char*, int, int, int, Comm*) { return kNoNccl; }
std::string comm_destroy(Comm comm, bool) { return comm == nullptr ? "" : kNoNccl; }
std::string all_gather(Comm, const void*, void*, int64_t, CountType, cudaStream_t) {
  return kNoNccl;
}
std::string wait(Comm comm, cudaStream_t stream, int64_t) {
  if (comm != nullptr) return kNoNccl;
  const cudaError_t e = cudaStreamSynchronize(stream);
  return e == cudaSuccess ? "" : cuda_error("cudaStreamSynchronize", e);
}
std::string RouteBackend::exchange(const a2a::Exchange& ex, const void* src, void* dst,
                                   int64_t row_bytes) {
  if (self_via_nccl_ && ex.send(ex.me) > 0) return kNoNccl;
  for (int64_t g = 0; g < ex.size; ++g) {
    if (g != ex.me && (ex.send(g) > 0 || ex.recv(g) > 0)) return kNoNccl;
  }
  int64_t self_src = 0, self_dst = 0;
  for (int64_t g = 0; g < ex.me; ++g) {
    self_src += ex.send(g);
    self_dst += ex.recv(g);
  }
  return copy(static_cast<char*>(dst) + self_dst * row_bytes,
              static_cast<const char*>(src) + self_src * row_bytes,
              static_cast<size_t>(ex.send(ex.me) * row_bytes));
}

#endif  // SEMOE_HAVE_NCCL

}  // namespace nccl
}  // namespace semoe
