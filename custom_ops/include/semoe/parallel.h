// Small OpenMP helpers shared by the CPU kernels. Paddle-free.
//
// A Paddle process has two OpenMP runtimes: Intel's libiomp5 (loaded first, with its GOMP_*
// compatibility entry points; oneDNN binds to it) and GNU libgomp (what -fopenmp links). The
// compiled kernels bind GOMP_parallel and omp_* to libiomp5, but the entry points libiomp5
// lacks (e.g. GOMP_loop_nonmonotonic_dynamic_*, what schedule(dynamic) compiles to) bind to
// libgomp, which then treats every thread of the libiomp5 team as a team of its own: each
// runs the whole loop. So kernels use only `omp parallel`, omp_get_thread_num() /
// omp_get_num_threads(), static work splits and std::atomic counters, never dynamic or guided
// schedules, `omp single`, `omp critical` or tasks.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace semoe {

// Run fn(begin, end) over [0, n) split into contiguous chunks, one per thread.
// Falls back to one serial call when n is small (thread start-up costs more than the work).
template <typename Fn>
inline void parallel_for(int64_t n, int64_t min_per_thread, Fn&& fn) {
  if (n <= 0) return;
#ifdef _OPENMP
  int threads = omp_get_max_threads();
  // inside a parallel region (experts run one per thread) the caller's thread does it all
  if (threads > 1 && n >= 2 * min_per_thread && !omp_in_parallel()) {
    int64_t chunks = n / min_per_thread;
    if (chunks < threads) threads = static_cast<int>(chunks);
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num();
      const int nt = omp_get_num_threads();
      const int64_t per = (n + nt - 1) / nt;
      const int64_t b = tid * per;
      const int64_t e = b + per < n ? b + per : n;
      if (b < e) fn(b, e);
    }
    return;
  }
#endif
  fn(int64_t{0}, n);
}

}  // namespace semoe
