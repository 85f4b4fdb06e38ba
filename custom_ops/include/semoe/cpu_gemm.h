// Row-major float32 GEMM on the CPU through the BLAS that the Paddle wheel already loaded.
// Paddle-free. Paddle's own CPU matmul goes through MKL, which on some CPUs (AMD EPYC here)
// runs a slow generic path; oneDNN's dnnl_sgemm, linked into every x86 Paddle wheel, picks
// its kernel by CPU features. We resolve it at run time from the already-loaded library
// (RTLD_NOLOAD: nothing new is loaded), then fall back to MKL's cblas_sgemm. If neither is
// present the caller uses its own fallback and must say so.
//
// bfloat16 autocast: with set_gemm_precision(kBf16) every GEMM through cpu_gemm() rounds its
// float32 operands to bfloat16 (round to nearest even) and runs oneDNN's
// dnnl_gemm_bf16bf16f32 (AVX512-BF16 / AMX kernels), accumulating and writing float32. The
// weights, their gradients and the optimizer states stay float32 (the caller's tensors).
// Process-wide (one flag for every kernel of the module); float32 is the default.
//
// Every call into the external GEMM runs with asynchronous signals held (signal_guard.h): the
// oneDNN in the Paddle wheel corrupts the heap when a signal lands inside its GEMM kernels.
#pragma once

#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "semoe/bf16.h"
#include "semoe/signal_guard.h"

namespace semoe {

// C[M,N] = alpha * op(A) @ op(B) + beta * C, all row-major; lda/ldb/ldc are row strides.
using SgemmFn = void (*)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                         const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                         float* c, int64_t ldc);

namespace detail {
using DnnlSgemm = int (*)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
using CblasSgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                            int, float, float*, int);
using DnnlGemmBf16 = int (*)(char, char, int64_t, int64_t, int64_t, float, const uint16_t*, int64_t,
                             const uint16_t*, int64_t, float, float*, int64_t);

inline DnnlSgemm& dnnl_fn() { static DnnlSgemm f = nullptr; return f; }
inline DnnlGemmBf16& dnnl_bf16_fn() { static DnnlGemmBf16 f = nullptr; return f; }
inline std::atomic<int>& precision_flag() { static std::atomic<int> p{0}; return p; }

// rows_to_bf16 into dst (resized), rows split over the threads for large blocks.
inline void block_to_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld,
                          std::vector<uint16_t>& dst) {
  dst.resize(static_cast<size_t>(rows * cols));
  uint16_t* d = dst.data();
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) rows_to_bf16(src + r * ld, 1, cols, ld, d + r * cols);
}
inline CblasSgemm& cblas_fn() { static CblasSgemm f = nullptr; return f; }

// oneDNN's bf16 GEMM on operands already in bf16 (what bf16_operand_gemm hands out).
inline int call_dnnl_bf16(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha,
                          const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                          float beta, float* c, int64_t ldc) {
  const AsyncSignalsHeld held;
  return dnnl_bf16_fn()(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// float32 always, whatever the precision flag (the FFN-only bf16 mode keeps these in fp32)
inline void call_dnnl_fp32(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                           const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                           float* c, int64_t ldc) {
  const AsyncSignalsHeld held;
  dnnl_fn()(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void call_dnnl(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                      float* c, int64_t ldc) {
  if (precision_flag().load(std::memory_order_relaxed) == 1 && dnnl_bf16_fn() != nullptr &&
      m > 0 && n > 0 && k > 0) {
    // operands as stored: A is m x k (k x m when ta), B is k x n (n x k when tb)
    static thread_local std::vector<uint16_t> abuf, bbuf;
    block_to_bf16(a, ta ? k : m, ta ? m : k, lda, abuf);
    block_to_bf16(b, tb ? n : k, tb ? k : n, ldb, bbuf);
    call_dnnl_bf16(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, abuf.data(), ta ? m : k,
                   bbuf.data(), tb ? k : n, beta, c, ldc);
    return;
  }
  call_dnnl_fp32(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline std::atomic<int>& linear_bf16_flag() { static std::atomic<int> p{0}; return p; }

inline void call_cblas(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                       float* c, int64_t ldc) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  const AsyncSignalsHeld held;
  cblas_fn()(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(m),
             static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
             static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

inline void* find_symbol(const char* const* libs, const char* sym) {
  for (const char* const* lib = libs; *lib != nullptr; ++lib) {
    void* h = dlopen(*lib, RTLD_NOW | RTLD_NOLOAD);
    if (h == nullptr) continue;
    void* f = dlsym(h, sym);
    if (f != nullptr) return f;
  }
  return dlsym(RTLD_DEFAULT, sym);
}
}  // namespace detail

// Plain loops, used only when no BLAS is loaded (the caller warns): correct, not fast.
inline void naive_sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                        const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                        float* c, int64_t ldc) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = beta == 0.f ? 0.f : beta * ci[j];
    for (int64_t p = 0; p < k; ++p) {
      const float av = alpha * (ta ? a[p * lda + i] : a[i * lda + p]);
      if (tb) {
        for (int64_t j = 0; j < n; ++j) ci[j] += av * b[j * ldb + p];
      } else {
        const float* bp = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) ci[j] += av * bp[j];
      }
    }
  }
}

struct CpuGemm {
  SgemmFn fn = &naive_sgemm;
  const char* name = "naive";
};

// Resolved once per process; thread-safe.
inline const CpuGemm& cpu_gemm() {
  static CpuGemm g;
  static std::once_flag once;
  std::call_once(once, [] {
    static const char* const kDnnl[] = {"libdnnl.so.3", "libdnnl.so.2", "libdnnl.so", nullptr};
    static const char* const kMkl[] = {"libmklml_intel.so", "libmkl_rt.so", nullptr};
    if (void* f = detail::find_symbol(kDnnl, "dnnl_sgemm")) {
      detail::dnnl_fn() = reinterpret_cast<detail::DnnlSgemm>(f);
      if (void* fb = detail::find_symbol(kDnnl, "dnnl_gemm_bf16bf16f32"))
        detail::dnnl_bf16_fn() = reinterpret_cast<detail::DnnlGemmBf16>(fb);
      g.fn = &detail::call_dnnl;
      g.name = "onednn";
    } else if (void* f2 = detail::find_symbol(kMkl, "cblas_sgemm")) {
      detail::cblas_fn() = reinterpret_cast<detail::CblasSgemm>(f2);
      g.fn = &detail::call_cblas;
      g.name = "cblas";
    }
  });
  return g;
}

// GEMM precision: 0 = float32; 1 = bfloat16 operands with float32 accumulation for every
// kernel using cpu_gemm(); 2 = bfloat16 for the FFN GEMMs (grouped expert/dense FFN) only,
// the fused linear layers (attention projections, head) through linear_gemm() stay float32.
// Returns false (and keeps float32) when bf16 was asked but oneDNN's bf16 GEMM is missing.
inline bool set_gemm_precision(int precision) {
  cpu_gemm();
  if (precision != 0 && detail::dnnl_bf16_fn() == nullptr) {
    detail::precision_flag().store(0);
    detail::linear_bf16_flag().store(0);
    return false;
  }
  detail::precision_flag().store(precision == 0 ? 0 : 1);
  detail::linear_bf16_flag().store(precision == 1 ? 1 : 0);
  return true;
}

// oneDNN's bf16 GEMM when `gemm` is cpu_gemm()'s oneDNN entry and every GEMM through it runs
// in bf16 (precision 1 or 2), else nullptr. Kernels that convert operands once and reuse
// them (the grouped FFN) call it with bf16 operands directly; the result is the same as
// `gemm` with the same float32 operands, which converts them inside every call.
inline detail::DnnlGemmBf16 bf16_operand_gemm(SgemmFn gemm) {
  if (gemm != &detail::call_dnnl || detail::precision_flag().load(std::memory_order_relaxed) != 1)
    return nullptr;  // precision 1 is only ever set with the bf16 GEMM resolved
  return &detail::call_dnnl_bf16;
}

inline int gemm_precision() {
  return detail::precision_flag().load() == 0 ? 0 : (detail::linear_bf16_flag().load() ? 1 : 2);
}

// The GEMM of the fused linear layers: cpu_gemm(), or float32 oneDNN in the FFN-only mode.
inline SgemmFn linear_gemm() {
  const CpuGemm& g = cpu_gemm();
  if (g.fn == &detail::call_dnnl && detail::precision_flag().load() == 1 &&
      detail::linear_bf16_flag().load() == 0)
    return &detail::call_dnnl_fp32;
  return g.fn;
}

}  // namespace semoe
