// Row-major float32 GEMM on the CPU through the BLAS that the Paddle wheel already loaded.
// Paddle-free. Paddle's own CPU matmul goes through MKL, which on some CPUs (AMD EPYC here)
// runs a slow generic path; oneDNN's dnnl_sgemm, linked into every x86 Paddle wheel, picks
// its kernel by CPU features. We resolve it at run time from the already-loaded library
// (RTLD_NOLOAD: nothing new is loaded), then fall back to MKL's cblas_sgemm. If neither is
// present the caller uses its own fallback and must say so.
#pragma once

#include <dlfcn.h>

#include <cstdint>
#include <mutex>

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

inline DnnlSgemm& dnnl_fn() { static DnnlSgemm f = nullptr; return f; }
inline CblasSgemm& cblas_fn() { static CblasSgemm f = nullptr; return f; }

inline void call_dnnl(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                      float* c, int64_t ldc) {
  dnnl_fn()(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void call_cblas(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                       float* c, int64_t ldc) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
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

}  // namespace semoe
