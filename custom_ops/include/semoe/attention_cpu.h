// Causal multi-head self-attention on the CPU, fused and tiled (FlashAttention-style).
//
// Layouts (row-major, float32):
//   qkv    [B, S, 3, H, Dh]  the qkv projection's output as it comes ([B, S, 3*H*Dh])
//   k_past [B, H, P, Dh], v_past [B, H, P, Dh]: keys/values of P earlier positions (P may be 0:
//          training; P > 0: incremental decoding with a KV cache)
//   out    [B, S, H, Dh]     heads merged, ready for the output projection ([B, S, H*Dh])
//   lse    [B, H, S]         log-sum-exp of each query's scaled scores (the only thing the
//                            backward keeps besides out: no [S, S] probability buffer)
// Query i has absolute position P + i and attends to keys 0 .. P + i (keys 0..P-1 from the
// cache, P.. from qkv). Scores are scaled by 1/sqrt(Dh).
//
// Work is split over the B*H (batch, head) pairs. Each thread copies its pair's keys (times
// 1/sqrt(Dh)) and values transposed into padded tiles ([Dh, Lp]; Lp, Dhp rounded up to 16
// floats, the padding zero) and walks the queries in blocks of kR rows: one block's scores
// against its causal prefix of keys ([kR, Lp], per-thread scratch) come from register-blocked
// kR x 32 micro-kernels (AVX-512 intrinsics where the compiler targets AVX-512, else portable
// loops of the same order). Rows of q, k, v and dO, and of out and the gradients, are read and
// written where they are in the tensors (a stride apart) when a head's row is whole vectors and
// there is no cache (training, prefill): ~10-20% faster than through padded copies at Dh 32,
// S 64 (measured in the training step: attention backward 1.5 -> 1.2 ms per layer). Otherwise
// (odd head dims, a KV cache, a partial block) they go through padded copies [kR or Lp, Dhp].
// The backward keeps the probabilities and score gradients of a block of kQB query rows
// ([kQB, Lp] each, per-thread scratch, never returned) so that dK = dS^T Q and dV = P^T dO run
// as register-blocked products over the block's rows. Deterministic: every sum has a fixed
// order independent of the thread count and of the batch size, and a query row's numbers do
// not depend on which rows share its block. Paddle-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "semoe/activation.h"

namespace semoe {

struct AttnDims {
  int64_t B, S, H, Dh, P;
  int64_t L() const { return P + S; }
  int64_t D() const { return H * Dh; }
};

namespace attn_detail {

constexpr int64_t kR = 8;    // query rows (or keys, for dK/dV) per micro-tile
constexpr int64_t kV = 16;   // floats per vector chunk
constexpr int64_t kQB = 64;  // query rows per backward block (multiple of kR)
constexpr int64_t kParallelWork = 1 << 15;  // multiply-adds below which one thread does it all

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// dst[0 .. n) = src[0 .. n) for a short row (a head's Dh floats): inline vector code (a libc
// memcpy call per row costs more than the copy at these sizes).
inline void copy_row(float* dst, const float* src, int64_t n) {
#if defined(__AVX512F__)
  for (int64_t c = 0; c < n; c += kV) {
    const __mmask16 on = lanes_below(c, n);
    _mm512_mask_storeu_ps(dst + c, on, _mm512_maskz_loadu_ps(on, src + c));
  }
#else
  for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
#endif
}

// sum_c a[c] * b[c] over a short row (a head's Dh floats), in vector lanes: a scalar loop
// is one dependent multiply-add chain (the compiler may not reorder a float sum); replacing it
// made the backward 6-8% faster at Dh 32.
inline float dot_row(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += kV) {
    const __mmask16 on = lanes_below(c, n);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(on, a + c), _mm512_maskz_loadu_ps(on, b + c), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float s = 0.f;
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
#endif
}

// Rows of one head are a stride of 3*H*Dh floats apart (several KiB: past the hardware
// prefetcher's reach across pages), so the kernels prefetch the rows they read kAhead ahead.
constexpr int64_t kAhead = 8;
inline void prefetch_row(const float* p, int64_t n) {
  for (int64_t c = 0; c < n; c += kV) __builtin_prefetch(p + c);
}

#if defined(__AVX512F__)
// In-register transpose of a 16 x 16 block: x[i] holds row i on entry, column i on exit.
inline void transpose16(__m512 x[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + m]: column m of each 128-bit lane, rows g .. g+3
    u[g + 0] = _mm512_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
    x[m] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    x[8 + m] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    x[4 + m] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    x[12 + m] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}
#endif

// Fill the transposed tile t [Dh, Lp] (scaled by t_scale) and/or the row tile r [Lp, Dhp] of
// slot 1 (k) or 2 (v). Rows are prefetched kAhead (rows) or one 16-row group (t alone) ahead.
inline void gather(const AttnDims& d, const float* qkv, const float* past, int slot, int64_t b,
                   int64_t h, int64_t Lp, int64_t Dhp, float* t, float* r, float t_scale = 1.0f) {
  const int64_t L = d.L(), Dh = d.Dh, P = d.P, D3 = 3 * d.D();
  const float* from_cache = P > 0 ? past + (b * d.H + h) * P * Dh : nullptr;
  const float* from_qkv = qkv + b * d.S * D3 + slot * d.D() + h * Dh;
  auto row = [&](int64_t j) { return j < P ? from_cache + j * Dh : from_qkv + (j - P) * D3; };
  if (r != nullptr) {
    for (int64_t j = 0; j < L; ++j) {
      if (j + kAhead < L) prefetch_row(row(j + kAhead), Dh);
      copy_row(r + j * Dhp, row(j), Dh);
    }
  }
  if (t == nullptr) return;
#if defined(__AVX512F__)
  // 16 keys x 16 features at a time (missing keys load as zeros: t's padding columns)
  const __m512 sc = _mm512_set1_ps(t_scale);
  for (int64_t j0 = 0; j0 < L; j0 += kV) {
    if (r == nullptr)
      for (int64_t j = j0 + kV; j < std::min(j0 + 2 * kV, L); ++j) prefetch_row(row(j), Dh);
    for (int64_t c0 = 0; c0 < Dh; c0 += kV) {
      const __mmask16 cols = lanes_below(c0, Dh);
      __m512 x[16];
      for (int64_t i = 0; i < kV; ++i)
        x[i] = j0 + i < L ? _mm512_maskz_loadu_ps(cols, row(j0 + i) + c0) : _mm512_setzero_ps();
      transpose16(x);
      for (int64_t c = c0; c < std::min(c0 + kV, Dh); ++c)
        _mm512_storeu_ps(t + c * Lp + j0, _mm512_mul_ps(x[c - c0], sc));
    }
  }
#else
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < Dh; ++c) t[c * Lp + j] = row(j)[c] * t_scale;
#endif
}

// Copy `rows` rows (row stride `stride`) of Dh floats into a [kR, Dhp] block; rows past
// `rows` are zero (the padding columns are zero already). The first `ahead` rows of the next
// block (kR rows on) are prefetched.
inline void load_rows(const float* base, int64_t stride, int64_t rows, int64_t Dh, int64_t Dhp,
                      float* dst, int64_t ahead = 0) {
  std::fill(dst, dst + kR * Dhp, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    if (r < ahead) prefetch_row(base + (r + kR) * stride, Dh);
    copy_row(dst + r * Dhp, base + r * stride, Dh);
  }
}

// out[r, j] = sum_{c < Dh} a[r * lda + c] * bt[c * ldb + j]   for r < kR, j < n16
// (n16 a multiple of kV; a holds kR rows).
inline void tile_abt(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t Dh,
                     int64_t n16, float* out, int64_t ldo) {
  int64_t jj = 0;
#if defined(__AVX512F__)
  for (; jj + 2 * kV <= n16; jj += 2 * kV) {
    __m512 acc[kR][2];
    for (int64_t r = 0; r < kR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < Dh; ++c) {
      const __m512 b0 = _mm512_loadu_ps(bt + c * ldb + jj);
      const __m512 b1 = _mm512_loadu_ps(bt + c * ldb + jj + kV);
      for (int64_t r = 0; r < kR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda + c]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
    }
    for (int64_t r = 0; r < kR; ++r) {
      _mm512_storeu_ps(out + r * ldo + jj, acc[r][0]);
      _mm512_storeu_ps(out + r * ldo + jj + kV, acc[r][1]);
    }
  }
  if (jj < n16) {  // one 16-wide tile left
    __m512 acc[kR];
    for (int64_t r = 0; r < kR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < Dh; ++c) {
      const __m512 b0 = _mm512_loadu_ps(bt + c * ldb + jj);
      for (int64_t r = 0; r < kR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + c]), b0, acc[r]);
    }
    for (int64_t r = 0; r < kR; ++r) _mm512_storeu_ps(out + r * ldo + jj, acc[r]);
    jj += kV;
  }
#endif
  for (; jj < n16; jj += kV) {
    float acc[kR][kV] = {};
    for (int64_t c = 0; c < Dh; ++c) {
      const float* br = bt + c * ldb + jj;
      for (int64_t r = 0; r < kR; ++r) {
        const float av = a[r * lda + c];
#pragma omp simd
        for (int64_t u = 0; u < kV; ++u) acc[r][u] += av * br[u];
      }
    }
    for (int64_t r = 0; r < kR; ++r) std::memcpy(out + r * ldo + jj, acc[r], sizeof(acc[r]));
  }
}

// out[k, c] (+)= sum_{j < n} p[k * ks + j * js] * rows[j * ldr + c]   for k < kR, c < Dhp
// (Dhp a multiple of kV). With ks = ld, js = 1: P @ V for kR query rows; with ks = 1,
// js = ld: dS^T @ Q for kR keys.
template <bool Accumulate>
inline void tile_pv(const float* p, int64_t ks, int64_t js, const float* rows, int64_t ldr,
                    int64_t Dhp, int64_t n, float* out, int64_t ldo) {
  int64_t cc = 0;
#if defined(__AVX512F__)
  for (; cc + 2 * kV <= Dhp; cc += 2 * kV) {
    __m512 acc[kR][2];
    for (int64_t k = 0; k < kR; ++k) {
      acc[k][0] = Accumulate ? _mm512_loadu_ps(out + k * ldo + cc) : _mm512_setzero_ps();
      acc[k][1] = Accumulate ? _mm512_loadu_ps(out + k * ldo + cc + kV) : _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m512 r0 = _mm512_loadu_ps(rows + j * ldr + cc);
      const __m512 r1 = _mm512_loadu_ps(rows + j * ldr + cc + kV);
      const float* pj = p + j * js;
      for (int64_t k = 0; k < kR; ++k) {
        const __m512 pv = _mm512_set1_ps(pj[k * ks]);
        acc[k][0] = _mm512_fmadd_ps(pv, r0, acc[k][0]);
        acc[k][1] = _mm512_fmadd_ps(pv, r1, acc[k][1]);
      }
    }
    for (int64_t k = 0; k < kR; ++k) {
      _mm512_storeu_ps(out + k * ldo + cc, acc[k][0]);
      _mm512_storeu_ps(out + k * ldo + cc + kV, acc[k][1]);
    }
  }
  if (cc < Dhp) {  // one 16-wide chunk left
    __m512 acc[kR];
    for (int64_t k = 0; k < kR; ++k) acc[k] = Accumulate ? _mm512_loadu_ps(out + k * ldo + cc) : _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m512 r0 = _mm512_loadu_ps(rows + j * ldr + cc);
      const float* pj = p + j * js;
      for (int64_t k = 0; k < kR; ++k) acc[k] = _mm512_fmadd_ps(_mm512_set1_ps(pj[k * ks]), r0, acc[k]);
    }
    for (int64_t k = 0; k < kR; ++k) _mm512_storeu_ps(out + k * ldo + cc, acc[k]);
    cc += kV;
  }
#endif
  for (; cc < Dhp; cc += kV) {
    float acc[kR][kV];
    for (int64_t k = 0; k < kR; ++k)
      for (int64_t u = 0; u < kV; ++u) acc[k][u] = Accumulate ? out[k * ldo + cc + u] : 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const float* vr = rows + j * ldr + cc;
      const float* pj = p + j * js;
      for (int64_t k = 0; k < kR; ++k) {
        const float pv = pj[k * ks];
#pragma omp simd
        for (int64_t u = 0; u < kV; ++u) acc[k][u] += pv * vr[u];
      }
    }
    for (int64_t k = 0; k < kR; ++k) std::memcpy(out + k * ldo + cc, acc[k], sizeof(acc[k]));
  }
}

// Row softmax of scores s[0 .. nr) in place (zeros on [nr, n16)); returns the row max and
// writes the sum of exp(s - max) to *sum (the log-sum-exp is max + log(sum)).
inline float softmax_row(float* s, int64_t nr, int64_t n16, float* sum_out) {
#if defined(__AVX512F__)
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < nr; j += kV)
    mv = _mm512_mask_max_ps(mv, lanes_below(j, nr), mv, _mm512_loadu_ps(s + j));
  const float m = _mm512_reduce_max_ps(mv);
  const __m512 mb = _mm512_set1_ps(m);
  __m512 sv = _mm512_setzero_ps();
  for (int64_t j = 0; j < n16; j += kV) {
    const __mmask16 on = lanes_below(j, nr);
    const __m512 p = _mm512_maskz_mov_ps(on, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mb)));
    sv = _mm512_add_ps(sv, p);
    _mm512_storeu_ps(s + j, p);
  }
  const float sum = _mm512_reduce_add_ps(sv);
  const __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int64_t j = 0; j < nr; j += kV) _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), inv));
#else
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < nr; ++j) m = s[j] > m ? s[j] : m;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < nr; ++j) {
    const float p = fast_exp(s[j] - m);
    s[j] = p;
    sum += p;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < nr; ++j) s[j] *= inv;
  for (int64_t j = nr; j < n16; ++j) s[j] = 0.f;
#endif
  *sum_out = sum;
  return m;
}

// softmax_row over the `rows` (<= kR) rows of a block of scores (row stride ld; row r sees
// nr0 + r keys), writing each row's log-sum-exp to lse[r]: the logs of the block in one
// vector (log16) instead of a libm call per row.
inline void softmax_rows(float* s, int64_t ld, int64_t rows, int64_t nr0, int64_t n16, float* lse) {
#if defined(__AVX512F__)
  static_assert(kR <= kV, "one vector holds a block's row sums");
  alignas(64) float m[kV], sum[kV];
  for (int64_t r = 0; r < kV; ++r) m[r] = 0.f, sum[r] = 1.f;
  for (int64_t r = 0; r < rows; ++r) m[r] = softmax_row(s + r * ld, nr0 + r, n16, &sum[r]);
  const __m512 v = _mm512_add_ps(_mm512_load_ps(m), log16(_mm512_load_ps(sum)));
  _mm512_mask_storeu_ps(lse, lanes_below(0, rows), v);
#else
  for (int64_t r = 0; r < rows; ++r) {
    float sum;
    const float m = softmax_row(s + r * ld, nr0 + r, n16, &sum);
    lse[r] = m + std::log(sum);
  }
#endif
}

// Backward element-wise step of one query row, in place: p = exp(s - lse) and
// ds = p * (dp - delta) * scale on [0, nr), zeros on [nr, n16).
inline void score_grad_row(float* s, float* dp, int64_t nr, int64_t n16, float lse, float delta,
                           float scale) {
#if defined(__AVX512F__)
  const __m512 l = _mm512_set1_ps(lse), dl = _mm512_set1_ps(delta), sc = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n16; j += kV) {
    const __mmask16 on = lanes_below(j, nr);
    const __m512 p = _mm512_maskz_mov_ps(on, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), l)));
    const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + j), dl)), sc);
    _mm512_storeu_ps(s + j, p);
    _mm512_storeu_ps(dp + j, ds);
  }
#else
#pragma omp simd
  for (int64_t j = 0; j < nr; ++j) {
    const float p = fast_exp(s[j] - lse);
    s[j] = p;
    dp[j] = p * (dp[j] - delta) * scale;
  }
  for (int64_t j = nr; j < n16; ++j) s[j] = dp[j] = 0.f;
#endif
}

}  // namespace attn_detail

// Forward: out and lse. k_past / v_past may be null when P == 0.
inline void causal_attention_fwd_cpu(const AttnDims& d, const float* qkv, const float* k_past,
                                     const float* v_past, float* out, float* lse) {
  using namespace attn_detail;
  const int64_t Dh = d.Dh, D = d.D(), D3 = 3 * D, pairs = d.B * d.H;
  if (pairs == 0 || d.S == 0) return;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));  // folded into the keys
  const int64_t Lp = round_up(d.L(), kV), Dhp = round_up(Dh, kV);
  // Without a cache and with whole vectors per head row, full blocks read q and v where they
  // are in qkv and write out in place (rows a stride apart); else through padded copies.
  const bool direct = d.P == 0 && Dh == Dhp;
  // small problems (decoding one token) run on the calling thread: a thread team costs more
#pragma omp parallel if (pairs > 1 && pairs * d.S * d.L() * Dh > kParallelWork)
  {
    std::vector<float> kt(static_cast<size_t>(Dh * Lp), 0.f);
    std::vector<float> vrow(direct ? 0 : static_cast<size_t>(Lp * Dhp), 0.f);
    std::vector<float> q(static_cast<size_t>(kR * Dhp)), s(static_cast<size_t>(kR * Lp));
    std::vector<float> acc(static_cast<size_t>(kR * Dhp));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < pairs; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      gather(d, qkv, k_past, 1, b, h, Lp, Dhp, kt.data(), nullptr, scale);
      if (!direct) gather(d, qkv, v_past, 2, b, h, Lp, Dhp, nullptr, vrow.data());
      const float* v_rows = direct ? qkv + b * d.S * D3 + 2 * D + h * Dh : vrow.data();
      const int64_t ldv = direct ? D3 : Dhp;
      for (int64_t i0 = 0; i0 < d.S; i0 += kR) {
        const int64_t rows = std::min(kR, d.S - i0);
        const int64_t n = d.P + i0 + rows, n16 = round_up(n, kV);  // keys any row of the block sees
        const int64_t ahead = std::max<int64_t>(0, std::min(kR, d.S - i0 - kR));
        const float* qbase = qkv + (b * d.S + i0) * D3 + h * Dh;
        float* obase = out + (b * d.S + i0) * D + h * Dh;
        const bool in_place = direct && rows == kR;
        if (in_place) {
          for (int64_t r = 0; r < ahead; ++r) prefetch_row(qbase + (r + kR) * D3, Dh);
          tile_abt(qbase, D3, kt.data(), Lp, Dh, n16, s.data(), Lp);
        } else {
          load_rows(qbase, D3, rows, Dh, Dhp, q.data(), ahead);
          tile_abt(q.data(), Dhp, kt.data(), Lp, Dh, n16, s.data(), Lp);
        }
        softmax_rows(s.data(), Lp, rows, d.P + i0 + 1, n16, lse + bh * d.S + i0);
        for (int64_t r = rows; r < kR; ++r) std::fill(s.data() + r * Lp, s.data() + r * Lp + n16, 0.f);
        if (in_place) {
          tile_pv<false>(s.data(), Lp, 1, v_rows, ldv, Dhp, n, obase, D);
        } else {
          tile_pv<false>(s.data(), Lp, 1, v_rows, ldv, Dhp, n, acc.data(), Dhp);
          for (int64_t r = 0; r < rows; ++r) copy_row(obase + r * D, acc.data() + r * Dhp, Dh);
        }
      }
    }
  }
}

// Backward. grad_out [B, S, H, Dh]; out and lse from the forward. Writes grad_qkv
// [B, S, 3, H, Dh] and, when P > 0, grad_k_past / grad_v_past [B, H, P, Dh].
inline void causal_attention_bwd_cpu(const AttnDims& d, const float* qkv, const float* k_past,
                                     const float* v_past, const float* out, const float* lse,
                                     const float* grad_out, float* grad_qkv, float* grad_k_past,
                                     float* grad_v_past) {
  using namespace attn_detail;
  const int64_t L = d.L(), Dh = d.Dh, D = d.D(), D3 = 3 * D, pairs = d.B * d.H;
  if (pairs == 0 || d.S == 0) {
    if (d.P > 0 && pairs > 0) {
      std::memset(grad_k_past, 0, sizeof(float) * pairs * d.P * Dh);
      std::memset(grad_v_past, 0, sizeof(float) * pairs * d.P * Dh);
    }
    return;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  const int64_t Lp = round_up(L, kV), Dhp = round_up(Dh, kV);
  const int64_t Lk = round_up(L, kR);  // key rows of the dK/dV accumulators (kR-key tiles)
  // As in the forward: without a cache, with whole vectors per head row and whole kR-row
  // blocks, q, k and dO are read where they are and dQ, dK, dV written in place into grad_qkv
  // (dK/dV of a key tile: written by the first query block that sees it, added to after).
  const bool direct = d.P == 0 && Dh == Dhp && d.S % kR == 0;
#pragma omp parallel if (pairs > 1 && pairs * d.S * d.L() * Dh > kParallelWork)
  {
    const size_t buffered = direct ? 0 : 1;  // the copies only the general path uses
    std::vector<float> kt(static_cast<size_t>(Dh * Lp), 0.f), vt(static_cast<size_t>(Dh * Lp), 0.f);
    std::vector<float> krow(buffered * std::max(Lp, Lk) * Dhp, 0.f);
    std::vector<float> dk(buffered * Lk * Dhp), dv(buffered * Lk * Dhp);
    // per block of kQB query rows: q and dO (rows [kQB, Dhp]), P and dS [kQB, Lp]
    std::vector<float> qraw(buffered * kQB * Dhp), go(buffered * kQB * Dhp);
    std::vector<float> pb(static_cast<size_t>(kQB * Lp)), dsb(static_cast<size_t>(kQB * Lp));
    std::vector<float> acc(static_cast<size_t>(kR * Dhp)), delta(kQB);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < pairs; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      gather(d, qkv, k_past, 1, b, h, Lp, Dhp, kt.data(), direct ? nullptr : krow.data(), scale);
      gather(d, qkv, v_past, 2, b, h, Lp, Dhp, vt.data(), nullptr);
      const float* q_all = qkv + b * d.S * D3 + h * Dh;  // row i: + i * D3 (direct path)
      const float* go_all = grad_out + b * d.S * D + h * Dh;
      float* gq_all = grad_qkv + b * d.S * D3 + h * Dh;
      if (!direct) {
        std::fill(dk.begin(), dk.end(), 0.f);
        std::fill(dv.begin(), dv.end(), 0.f);
      }
      for (int64_t qb0 = 0; qb0 < d.S; qb0 += kQB) {
        const int64_t qb1 = std::min(d.S, qb0 + kQB);
        const int64_t nb = d.P + qb1;  // keys the block's rows see
        for (int64_t i0 = qb0; i0 < qb1; i0 += kR) {
          const int64_t rows = std::min(kR, qb1 - i0), o = i0 - qb0;
          const int64_t n = d.P + i0 + rows, n16 = round_up(n, kV);
          const int64_t ahead = std::max<int64_t>(0, std::min(kR, d.S - i0 - kR));
          const float* qr = q_all + i0 * D3;
          const float* gor = go_all + i0 * D;
          int64_t ldq = D3, ldg = D;
          if (direct) {
            for (int64_t r = 0; r < ahead; ++r) {
              prefetch_row(qr + (r + kR) * D3, Dh);
              prefetch_row(gor + (r + kR) * D, Dh);
            }
          } else {
            load_rows(qr, D3, rows, Dh, Dhp, qraw.data() + o * Dhp, ahead);
            load_rows(gor, D, rows, Dh, Dhp, go.data() + o * Dhp, ahead);
            qr = qraw.data() + o * Dhp;
            gor = go.data() + o * Dhp;
            ldq = ldg = Dhp;
          }
          for (int64_t r = 0; r < ahead; ++r) prefetch_row(out + (b * d.S + i0 + kR + r) * D + h * Dh, Dh);
          float* pr = pb.data() + o * Lp;
          float* dsr = dsb.data() + o * Lp;
          tile_abt(qr, ldq, kt.data(), Lp, Dh, n16, pr, Lp);    // scores (kt holds k * scale)
          tile_abt(gor, ldg, vt.data(), Lp, Dh, n16, dsr, Lp);  // dP = dO V^T
          for (int64_t r = 0; r < kR; ++r) {
            if (r < rows) {
              const float dl = dot_row(gor + r * ldg, out + (b * d.S + i0 + r) * D + h * Dh, Dh);
              delta[o + r] = dl;
              score_grad_row(pr + r * Lp, dsr + r * Lp, d.P + i0 + r + 1, n16,
                             lse[bh * d.S + i0 + r], dl, scale);
            } else {  // rows past the end carry zeros (they join the dQ tile)
              std::fill(pr + r * Lp, pr + r * Lp + n16, 0.f);
              std::fill(dsr + r * Lp, dsr + r * Lp + n16, 0.f);
            }
          }
          // dQ = dS K  -> grad_qkv slot 0
          if (direct) {
            tile_pv<false>(dsr, Lp, 1, q_all + D, D3, Dhp, n, gq_all + i0 * D3, D3);
          } else {
            tile_pv<false>(dsr, Lp, 1, krow.data(), Dhp, Dhp, n, acc.data(), Dhp);
            for (int64_t r = 0; r < rows; ++r)
              copy_row(gq_all + (i0 + r) * D3, acc.data() + r * Dhp, Dh);
          }
        }
        // dK[j] += sum_i dS[i, j] q_i ; dV[j] += sum_i P[i, j] dO_i over the block's rows i
        // that see key j (i >= j - P; later columns of earlier rows hold zeros)
        for (int64_t j0 = 0; j0 < nb; j0 += kR) {
          const int64_t ib = std::max(qb0, j0 - d.P);
          if (ib >= qb1) continue;
          const int64_t o = ib - qb0;
          const float* ds_t = dsb.data() + o * Lp + j0;
          const float* p_t = pb.data() + o * Lp + j0;
          const int64_t m = qb1 - ib;  // query rows of the block that see the key tile
          if (!direct) {
            const float* q_o = qraw.data() + o * Dhp;
            tile_pv<true>(ds_t, 1, Lp, q_o, Dhp, Dhp, m, dk.data() + j0 * Dhp, Dhp);
            tile_pv<true>(p_t, 1, Lp, go.data() + o * Dhp, Dhp, Dhp, m, dv.data() + j0 * Dhp, Dhp);
            continue;
          }
          const float* q_i = q_all + ib * D3;
          const float* go_i = go_all + ib * D;
          float* gk = gq_all + j0 * D3 + D;
          if (j0 < qb0) {  // an earlier query block wrote this key tile
            tile_pv<true>(ds_t, 1, Lp, q_i, D3, Dhp, m, gk, D3);
            tile_pv<true>(p_t, 1, Lp, go_i, D, Dhp, m, gk + D, D3);
          } else {
            tile_pv<false>(ds_t, 1, Lp, q_i, D3, Dhp, m, gk, D3);
            tile_pv<false>(p_t, 1, Lp, go_i, D, Dhp, m, gk + D, D3);
          }
        }
      }
      if (direct) continue;
      for (int64_t j = 0; j < L; ++j) {
        float* gk = j < d.P ? grad_k_past + (bh * d.P + j) * Dh
                            : grad_qkv + (b * d.S + (j - d.P)) * D3 + D + h * Dh;
        float* gv = j < d.P ? grad_v_past + (bh * d.P + j) * Dh : gk + D;
        copy_row(gk, dk.data() + j * Dhp, Dh);
        copy_row(gv, dv.data() + j * Dhp, Dh);
      }
    }
  }
}

}  // namespace semoe
