// gpu_check shim over the CPU kernels (semoe/routing_cpu.h, semoe/activation.h): the same C
// API as shim.cu, on host memory, so check.py --emulate-cpu runs the identical driver and
// NumPy comparisons without a GPU. float16/bfloat16 rows are widened to float32, computed by
// the float32 CPU kernels and rounded back to nearest-even once (the GPU contract: fp32
// arithmetic, one rounding per stored value). Timings through this library mean nothing.
// The fused all-to-all pieces run the host reference of the permutation (a2a_layout.h) and the
// simulated exchange of a2a_sim.h over host memory.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "a2a_sim.h"
#include "semoe/a2a_layout.h"
#include "semoe/activation.h"
#include "semoe/routing_cpu.h"
#include "shim_api.h"

namespace {

enum Code : int { kOk = 0, kInvalidValue = 1, kBadDtype = 2, kBadPositions = 3, kNoMemory = 4 };

// ---- element conversions (round to nearest even)
float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}
uint16_t float_to_half(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Token-row values of `dtype` widened to float32.
std::vector<float> widen(const void* p, int dtype, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  if (n == 0 || p == nullptr) return out;
  if (dtype == 0) {
    std::memcpy(out.data(), p, sizeof(float) * n);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(p);
    for (int64_t i = 0; i < n; ++i) out[i] = dtype == 1 ? half_to_float(s[i]) : bf16_to_float(s[i]);
  }
  return out;
}

// float32 values rounded once to `dtype` and stored.
void narrow(const float* src, int dtype, int64_t n, void* dst) {
  if (n == 0) return;
  if (dtype == 0) {
    std::memcpy(dst, src, sizeof(float) * n);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = dtype == 1 ? float_to_half(src[i]) : float_to_bf16(src[i]);
}

float round_to(float v, int dtype) {
  if (dtype == 1) return half_to_float(float_to_half(v));
  if (dtype == 2) return bf16_to_float(float_to_bf16(v));
  return v;
}

bool valid_dtype(int d) { return d >= 0 && d <= 2; }

template <typename Fn>
void with_act(int act, Fn&& fn) {
  switch (act) {
    case 0: fn(std::integral_constant<int, 0>{}); break;
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    default: fn(std::integral_constant<int, 3>{}); break;
  }
}

struct HostEvent {
  std::chrono::steady_clock::time_point t;
};

// Device of a2a_sim.h over host memory.
struct HostDevice {
  std::string permute(const semoe::a2a::BlockPermutation& bp, const void* src, void* dst,
                      int64_t row_bytes) {
    semoe::a2a::permute_rows_host(bp, src, dst, row_bytes);
    return "";
  }
  std::string copy(void* dst, const void* src, size_t bytes) {
    if (bytes) std::memcpy(dst, src, bytes);
    return "";
  }
  std::string zero(void* dst, size_t bytes) {
    if (bytes) std::memset(dst, 0, bytes);
    return "";
  }
  std::string sync() { return ""; }
  std::string alloc(size_t bytes, void** p) {
    *p = std::malloc(bytes > 0 ? bytes : 1);
    return *p != nullptr ? "" : "out of host memory";
  }
  void release(void* p) { std::free(p); }
};

std::string g_last_message;

}  // namespace

extern "C" {

int semoe_chk_backend(void) { return 1; }

const char* semoe_chk_error_string(int c) {
  switch (c) {
    case kOk: return "no error";
    case kInvalidValue: return "invalid argument";
    case kBadDtype: return "unsupported dtype";
    case kBadPositions: return "positions out of range or repeated";
    case kNoMemory: return "out of host memory";
    default: return "unknown error";
  }
}

int semoe_chk_device_name(char* buf, int len) {
  std::snprintf(buf, static_cast<size_t>(len), "CPU emulation (semoe CPU kernels)");
  return kOk;
}

int semoe_chk_malloc(uint64_t bytes, void** ptr) {
  *ptr = std::malloc(bytes > 0 ? bytes : 1);
  return *ptr != nullptr ? kOk : kNoMemory;
}
int semoe_chk_free(void* ptr) {
  std::free(ptr);
  return kOk;
}
int semoe_chk_h2d(void* dst, const void* src, uint64_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
  return kOk;
}
int semoe_chk_d2h(void* dst, const void* src, uint64_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
  return kOk;
}
int semoe_chk_memset(void* ptr, int byte_value, uint64_t bytes) {
  if (bytes) std::memset(ptr, byte_value, bytes);
  return kOk;
}
int semoe_chk_d2d(void* dst, const void* src, uint64_t bytes) {
  if (bytes) std::memmove(dst, src, bytes);
  return kOk;
}
int semoe_chk_synchronize(void) { return kOk; }

int semoe_chk_spin(int64_t) { return kOk; }
int semoe_chk_event_create(void** event) {
  *event = new HostEvent();
  return kOk;
}
int semoe_chk_event_record(void* event) {
  static_cast<HostEvent*>(event)->t = std::chrono::steady_clock::now();
  return kOk;
}
int semoe_chk_event_elapsed_ms(void* start, void* end, float* ms) {
  const auto d = static_cast<HostEvent*>(end)->t - static_cast<HostEvent*>(start)->t;
  *ms = std::chrono::duration<float, std::milli>(d).count();
  return kOk;
}
int semoe_chk_event_destroy(void* event) {
  delete static_cast<HostEvent*>(event);
  return kOk;
}

int semoe_chk_expert_count(const int32_t* ids, int64_t n, int64_t num_experts, int32_t* counts) {
  if (num_experts <= 0 || n < 0) return kInvalidValue;
  semoe::expert_count_cpu(ids, n, num_experts, counts);
  return kOk;
}

uint64_t semoe_chk_gate_dispatch_workspace_bytes(int64_t, int64_t, int64_t) { return 0; }

int semoe_chk_gate_dispatch(const void* x, int dtype, const float* logits, const float* noise,
                            const float* bias, int bias_per_token, int64_t tokens,
                            int64_t hidden, int64_t num_experts, int64_t top_k,
                            int64_t capacity, int normalize, int score_fn, int capacity_rule,
                            int batch_priority, int64_t n_rows, void* rows, float* weights,
                            int32_t* ids, int32_t* pos, int32_t* counts, float* probs, void*,
                            uint64_t) {
  if (!valid_dtype(dtype)) return kBadDtype;
  if (tokens < 0 || hidden < 0 || num_experts <= 0 || top_k < 1 || top_k > num_experts ||
      !semoe::valid_capacity_rule(capacity_rule) || !semoe::valid_score_fn(score_fn) ||
      (batch_priority != 0 && capacity_rule == static_cast<int>(semoe::CapacityRule::kProbs))) {
    return kInvalidValue;
  }
  const std::vector<float> xf = widen(x, dtype, tokens * hidden);
  std::vector<float> rf(static_cast<size_t>(n_rows * hidden));
  semoe::gate_dispatch_cpu(xf.data(), logits, noise, bias, bias_per_token != 0, tokens, hidden,
                           num_experts, top_k, capacity, normalize != 0,
                           static_cast<semoe::ScoreFn>(score_fn),
                           static_cast<semoe::CapacityRule>(capacity_rule),
                           batch_priority != 0, n_rows, rf.data(), weights, ids, pos, counts,
                           probs);
  narrow(rf.data(), dtype, n_rows * hidden, rows);
  return kOk;
}

int semoe_chk_gate_dispatch_grad(const float* probs, const float* weights, const int32_t* ids,
                                 const int32_t* pos, const void* grad_rows, int dtype,
                                 const float* grad_weights, const float* grad_probs,
                                 int64_t tokens, int64_t hidden, int64_t num_experts,
                                 int64_t top_k, int normalize, int score_fn, void* grad_x,
                                 float* grad_logits) {
  if (!valid_dtype(dtype)) return kBadDtype;
  if (!semoe::valid_score_fn(score_fn)) return kInvalidValue;
  // The number of rows of grad_rows is not passed: widen up to the largest position used.
  int64_t n_rows = 0;
  for (int64_t a = 0; a < tokens * top_k; ++a) n_rows = pos[a] + 1 > n_rows ? pos[a] + 1 : n_rows;
  const std::vector<float> gr = widen(grad_rows, dtype, n_rows * hidden);
  std::vector<float> gx(static_cast<size_t>(tokens * hidden));
  semoe::gate_dispatch_grad_cpu(probs, weights, ids, pos, grad_rows ? gr.data() : nullptr,
                                grad_weights, grad_probs, tokens, hidden, num_experts, top_k,
                                normalize != 0, static_cast<semoe::ScoreFn>(score_fn), gx.data(),
                                grad_logits);
  narrow(gx.data(), dtype, tokens * hidden, grad_x);
  return kOk;
}

int semoe_chk_combine(const void* rows, int dtype, const float* weights, const int32_t* pos,
                      int64_t tokens, int64_t top_k, int64_t hidden, void* out) {
  if (!valid_dtype(dtype)) return kBadDtype;
  int64_t n_rows = 0;
  for (int64_t a = 0; a < tokens * top_k; ++a) n_rows = pos[a] + 1 > n_rows ? pos[a] + 1 : n_rows;
  const std::vector<float> rf = widen(rows, dtype, n_rows * hidden);
  std::vector<float> of(static_cast<size_t>(tokens * hidden));
  semoe::combine_cpu(rf.data(), weights, pos, tokens, top_k, hidden, of.data());
  narrow(of.data(), dtype, tokens * hidden, out);
  return kOk;
}

uint64_t semoe_chk_combine_grad_workspace_bytes(int64_t n_rows) {
  return n_rows > 0 ? static_cast<uint64_t>(n_rows) * 4 : 0;
}

int semoe_chk_combine_grad(const void* rows, int dtype, const float* weights, const int32_t* pos,
                           const void* grad_out, int64_t tokens, int64_t top_k, int64_t hidden,
                           int64_t n_rows, void* grad_rows, float* grad_weights, void*, uint64_t,
                           int) {
  if (!valid_dtype(dtype)) return kBadDtype;
  std::vector<uint8_t> referenced(static_cast<size_t>(n_rows > 0 ? n_rows : 1));
  if (semoe::check_positions(pos, tokens * top_k, n_rows, referenced.data()) >= 0) {
    return kBadPositions;
  }
  const std::vector<float> rf = widen(rows, dtype, n_rows * hidden);
  const std::vector<float> gf = widen(grad_out, dtype, tokens * hidden);
  std::vector<float> grf(static_cast<size_t>(n_rows * hidden));
  semoe::combine_grad_cpu(rf.data(), weights, pos, gf.data(), referenced.data(), tokens, top_k,
                          hidden, n_rows, grf.data(), grad_weights);
  narrow(grf.data(), dtype, n_rows * hidden, grad_rows);
  return kOk;
}

int semoe_chk_bias_act_fwd(void* h, void* a, int dtype, const void* bias, const int32_t* counts,
                           int64_t num_experts, int64_t rows, int64_t cols, int activation) {
  if (!valid_dtype(dtype)) return kBadDtype;
  if (activation < 0 || activation > 3 || rows < 0 || cols < 0 || num_experts < 0) {
    return kInvalidValue;
  }
  std::vector<float> hf = widen(h, dtype, rows * cols);
  const std::vector<float> bf = widen(bias, dtype, num_experts * cols);
  std::vector<float> af(hf.size());
  // Expert e owns rows [off_e, off_e + counts[e]); rows past the last expert get no bias.
  std::vector<int32_t> expert_of(static_cast<size_t>(rows), -1);
  int64_t off = 0;
  for (int64_t e = 0; e < num_experts && off < rows; ++e) {
    for (int64_t r = off; r < off + counts[e] && r < rows; ++r) expert_of[r] = static_cast<int32_t>(e);
    off += counts[e] > 0 ? counts[e] : 0;
  }
  with_act(activation, [&](auto tag) {
    constexpr auto A = static_cast<semoe::Activation>(decltype(tag)::value);
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t e = expert_of[r];
      for (int64_t c = 0; c < cols; ++c) {
        float v = hf[r * cols + c];
        if (e >= 0) v = round_to(v + bf[e * cols + c], dtype);
        hf[r * cols + c] = v;
        af[r * cols + c] = semoe::act_fwd<A>(v);
      }
    }
  });
  narrow(hf.data(), dtype, rows * cols, h);
  narrow(af.data(), dtype, rows * cols, a);
  return kOk;
}

int semoe_chk_act_bwd(const void* h, void* a, void* g, int dtype, int64_t n, int activation) {
  if (!valid_dtype(dtype)) return kBadDtype;
  if (activation < 0 || activation > 3 || n < 0) return kInvalidValue;
  const std::vector<float> hf = widen(h, dtype, n);
  std::vector<float> gf = widen(g, dtype, n);
  std::vector<float> af(static_cast<size_t>(n));
  with_act(activation, [&](auto tag) {
    constexpr auto A = static_cast<semoe::Activation>(decltype(tag)::value);
    semoe::act_bwd_rows<A>(hf.data(), af.data(), gf.data(), n);
  });
  narrow(af.data(), dtype, n, a);
  narrow(gf.data(), dtype, n, g);
  return kOk;
}

int semoe_chk_permute_row_blocks(const void* src, void* dst, int64_t row_bytes,
                                 const int64_t* src_start, const int64_t* dst_start,
                                 int64_t num_blocks) {
  if (row_bytes < 0 || num_blocks < 0) return kInvalidValue;
  for (int64_t k = 0; k < num_blocks; ++k) {
    if (dst_start[k + 1] < dst_start[k] || src_start[k] < 0 || dst_start[k] < 0) {
      return kInvalidValue;
    }
  }
  for (int64_t k = 0; k < num_blocks; ++k) {
    const int64_t n = dst_start[k + 1] - dst_start[k];
    if (n > 0 && row_bytes > 0) {
      std::memcpy(static_cast<char*>(dst) + dst_start[k] * row_bytes,
                  static_cast<const char*>(src) + src_start[k] * row_bytes,
                  static_cast<size_t>(n * row_bytes));
    }
  }
  return kOk;
}

int semoe_chk_a2a_simulate(const int64_t* counts, int64_t P, int64_t El, int64_t node_size,
                           int hierarchical, int inverse, const uint64_t* x, const uint64_t* out,
                           const int64_t* out_rows, int64_t row_bytes) {
  std::vector<const void*> xs(static_cast<size_t>(P > 0 ? P : 0));
  std::vector<void*> outs(xs.size());
  for (size_t r = 0; r < xs.size(); ++r) {
    xs[r] = reinterpret_cast<const void*>(static_cast<uintptr_t>(x[r]));
    outs[r] = reinterpret_cast<void*>(static_cast<uintptr_t>(out[r]));
  }
  g_last_message = semoe_chk::simulate<HostDevice>(
      counts, P, El, node_size, hierarchical != 0, inverse != 0, xs.data(), outs.data(), out_rows,
      row_bytes, [] { return std::make_unique<HostDevice>(); });
  return g_last_message.empty() ? kOk : kInvalidValue;
}

int semoe_chk_nccl_smoke(const char*, int64_t, int64_t, int* skipped) {
  *skipped = 1;
  g_last_message = "CPU emulation has no NCCL";
  return kOk;
}

const char* semoe_chk_last_message(void) { return g_last_message.c_str(); }

}  // extern "C"
