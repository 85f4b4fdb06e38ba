// The expert exchange of a whole EP group simulated on one device (or on the host), for the
// gpu_check shims: P ranks run as host threads, each driving the production step driver
// semoe::a2a::run_route over its own plan (semoe/a2a_layout.h). Permutations and copies go to
// a Device (the CUDA launchers in shim.cu, the host reference in shim_cpu.cc); an exchange
// step is a rendezvous of all ranks followed by copies straight out of the peers' buffers,
// in place of NCCL's grouped send/recv. What this leaves untested is only the NCCL call
// itself (custom_ops/cuda/fused_a2a_nccl.cu), which needs several GPUs.
//
// Device concept (every method returns "" or an error message):
//   permute(const a2a::BlockPermutation&, const void* src, void* dst, int64_t row_bytes)
//   copy(void* dst, const void* src, size_t bytes); zero(void* dst, size_t bytes)
//   sync(): wait until this rank's queued work is done
//   alloc(size_t bytes, void** p); release(void* p)
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "semoe/a2a_layout.h"

namespace semoe_chk {

namespace a2a = semoe::a2a;

constexpr const char* kPeerLeft = "a peer rank stopped (see its error)";

// A reusable barrier for `n` threads that any thread can break (then every wait fails).
class Barrier {
 public:
  explicit Barrier(int64_t n) : n_(n) {}

  // False when the barrier is broken (a rank failed or finished) or after `timeout`.
  bool wait(std::chrono::seconds timeout = std::chrono::seconds(120)) {
    std::unique_lock<std::mutex> lock(mu_);
    if (broken_) return false;
    const int64_t gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return true;
    }
    const bool ok = cv_.wait_for(lock, timeout, [&] { return generation_ != gen || broken_; });
    if (!ok) broken_ = true;
    cv_.notify_all();
    return !broken_ || generation_ != gen;
  }

  void leave() {
    std::lock_guard<std::mutex> lock(mu_);
    broken_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t n_, arrived_ = 0, generation_ = 0;
  bool broken_ = false;
};

struct World {
  explicit World(int64_t p) : P(p), barrier(p), src(p, nullptr), ex(p, nullptr) {}
  int64_t P;
  Barrier barrier;
  std::vector<const char*> src;            // each rank's exchange input, published
  std::vector<const a2a::Exchange*> ex;    // each rank's exchange step, published
};

template <class Device>
class SimBackend {
 public:
  SimBackend(World* world, int64_t rank, Device* dev) : w_(world), rank_(rank), dev_(dev) {}

  std::string permute(const a2a::BlockPermutation& bp, const void* src, void* dst,
                      int64_t row_bytes) {
    return dev_->permute(bp, src, dst, row_bytes);
  }
  std::string copy(void* dst, const void* src, size_t bytes) { return dev_->copy(dst, src, bytes); }
  std::string zero(void* dst, size_t bytes) { return dev_->zero(dst, bytes); }

  std::string exchange(const a2a::Exchange& ex, const void* src, void* dst, int64_t row_bytes) {
    std::string err = dev_->sync();  // my input rows are final before peers read them
    if (!err.empty()) return err;
    w_->src[rank_] = static_cast<const char*>(src);
    w_->ex[rank_] = &ex;
    if (!w_->barrier.wait()) return kPeerLeft;
    char* out = static_cast<char*>(dst);
    int64_t recv_off = 0;
    for (int64_t g = 0; g < ex.size && err.empty(); ++g) {
      const int64_t peer = ex.members[g];
      const a2a::Exchange& pex = *w_->ex[peer];
      if (pex.group != ex.group || pex.size != ex.size || pex.splits != ex.splits ||
          pex.members != ex.members || pex.me != g) {
        err = "rank " + std::to_string(rank_) + " and its peer " + std::to_string(peer) +
              " disagree on the exchange in " + a2a::group_name(ex.group);
        break;
      }
      int64_t peer_off = 0;  // rows the peer sends to the members before me
      for (int64_t h = 0; h < ex.me; ++h) peer_off += pex.send(h);
      const int64_t n = ex.recv(g);
      err = dev_->copy(out + recv_off * row_bytes, w_->src[peer] + peer_off * row_bytes,
                       static_cast<size_t>(n * row_bytes));
      recv_off += n;
    }
    if (err.empty()) err = dev_->sync();  // peers may reuse their buffers after the barrier
    if (!w_->barrier.wait() && err.empty()) err = kPeerLeft;
    return err;
  }

 private:
  World* w_;
  int64_t rank_;
  Device* dev_;
};

// Runs the dispatch (inverse = false) or combine (inverse = true) route of every rank of the
// EP group described by the count matrix C [P, P*El]. x[r]: rank r's input rows; out[r]: its
// output buffer of out_rows[r] rows (rows past the route's output are zeroed). make_device()
// is called once per rank thread. Returns "" or the first error ("rank r: ...").
template <class Device>
std::string simulate(const int64_t* C, int64_t P, int64_t El, int64_t node_size,
                     bool hierarchical, bool inverse, const void* const* x, void* const* out,
                     const int64_t* out_rows, int64_t row_bytes,
                     const std::function<std::unique_ptr<Device>()>& make_device) {
  if (P < 1) return "P must be >= 1";
  World world(P);
  std::vector<std::string> errors(static_cast<size_t>(P));
  std::vector<std::thread> threads;
  for (int64_t r = 0; r < P; ++r) {
    threads.emplace_back([&, r] {
      std::string err;
      std::unique_ptr<Device> dev = make_device();
      a2a::Plan plan;
      err = a2a::make_plan(C, P, El, r, node_size, hierarchical, &plan);
      void* ws = nullptr;
      if (err.empty()) {
        const a2a::Route& route = inverse ? plan.combine : plan.dispatch;
        const size_t ws_bytes = a2a::route_workspace_bytes(route, row_bytes);
        err = dev->alloc(ws_bytes, &ws);
        if (err.empty()) {
          SimBackend<Device> backend(&world, r, dev.get());
          err = a2a::run_route(backend, route, x[r], out[r], out_rows[r], row_bytes, ws,
                               ws_bytes);
        }
        if (err.empty()) err = dev->sync();
        if (ws != nullptr) dev->release(ws);
      }
      errors[r] = err;
      world.barrier.leave();
    });
  }
  for (auto& t : threads) t.join();
  for (int64_t r = 0; r < P; ++r) {  // the root cause first, then "a peer stopped"
    if (!errors[r].empty() && errors[r] != kPeerLeft) return "rank " + std::to_string(r) + ": " + errors[r];
  }
  for (int64_t r = 0; r < P; ++r) {
    if (!errors[r].empty()) return "rank " + std::to_string(r) + ": " + errors[r];
  }
  return "";
}

}  // namespace semoe_chk
