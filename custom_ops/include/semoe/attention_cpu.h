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
// Work is split over the B*H (batch, head) pairs. Each thread copies its pair's keys and
// values into padded tiles (K transposed [Dh, Lp], V and K as rows [Lp, Dhp]; Lp, Dhp rounded
// up to 16 floats, the padding zero) and walks the queries in blocks of kQ rows: one block's
// scores against its causal prefix of keys ([kQ, Lp], per-thread scratch, never kept) come
// from register-blocked kQ x 16 micro-kernels. Deterministic: every sum has a fixed order
// independent of the thread count. Paddle-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "semoe/activation.h"

namespace semoe {

struct AttnDims {
  int64_t B, S, H, Dh, P;
  int64_t L() const { return P + S; }
  int64_t D() const { return H * Dh; }
};

namespace attn_detail {

constexpr int64_t kQ = 8;   // query rows per block
constexpr int64_t kV = 16;  // floats per vector chunk
constexpr int64_t kParallelWork = 1 << 15;  // multiply-adds below which one thread does it all

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Per-thread tiles of one (batch, head) pair.
struct Tiles {
  int64_t Lp, Dhp;
  std::vector<float> kt, krow, vt, vrow;  // [Dh, Lp], [Lp, Dhp], [Dh, Lp], [Lp, Dhp]
  std::vector<float> q, go, s, dp, acc;   // [kQ, Dhp], [kQ, Dhp], [kQ, Lp], [kQ, Lp], [kQ, Dhp]
  Tiles(const AttnDims& d, bool backward)
      : Lp(round_up(d.L(), kV)), Dhp(round_up(d.Dh, kV)) {
    kt.assign(static_cast<size_t>(d.Dh * Lp), 0.f);
    vrow.assign(static_cast<size_t>(Lp * Dhp), 0.f);
    q.assign(static_cast<size_t>(kQ * Dhp), 0.f);
    s.assign(static_cast<size_t>(kQ * Lp), 0.f);
    acc.assign(static_cast<size_t>(kQ * Dhp), 0.f);
    if (backward) {
      vt.assign(static_cast<size_t>(d.Dh * Lp), 0.f);
      krow.assign(static_cast<size_t>(Lp * Dhp), 0.f);
      go.assign(static_cast<size_t>(kQ * Dhp), 0.f);
      dp.assign(static_cast<size_t>(kQ * Lp), 0.f);
    }
  }
};

// Row j of the pair's keys (slot 1) or values (slot 2): from the cache for j < P.
inline const float* kv_row(const AttnDims& d, const float* qkv, const float* past, int slot,
                           int64_t b, int64_t h, int64_t j) {
  if (j < d.P) return past + ((b * d.H + h) * d.P + j) * d.Dh;
  return qkv + (b * d.S + (j - d.P)) * 3 * d.D() + slot * d.D() + h * d.Dh;
}

// Fill the transposed tile t [Dh, Lp] and/or the row tile r [Lp, Dhp] of slot 1 (k) or 2 (v).
inline void gather(const AttnDims& d, const float* qkv, const float* past, int slot, int64_t b,
                   int64_t h, int64_t Lp, int64_t Dhp, float* t, float* r) {
  for (int64_t j = 0; j < d.L(); ++j) {
    const float* src = kv_row(d, qkv, past, slot, b, h, j);
    if (t != nullptr)
      for (int64_t c = 0; c < d.Dh; ++c) t[c * Lp + j] = src[c];
    if (r != nullptr) std::memcpy(r + j * Dhp, src, sizeof(float) * d.Dh);
  }
}

// out[r, j] = sum_c a[r, c] * bt[c, j] for r < kQ, j < n (rounded up to kV; bt is [Dh, Lp]).
inline void rows_times_t(const float* a, int64_t Dhp, const float* bt, int64_t Lp, int64_t Dh,
                         int64_t n, float* out) {
  for (int64_t jj = 0; jj < n; jj += kV) {
    float acc[kQ][kV] = {};
    for (int64_t c = 0; c < Dh; ++c) {
      const float* br = bt + c * Lp + jj;
      for (int64_t r = 0; r < kQ; ++r) {
        const float av = a[r * Dhp + c];
#pragma omp simd
        for (int64_t u = 0; u < kV; ++u) acc[r][u] += av * br[u];
      }
    }
    for (int64_t r = 0; r < kQ; ++r) std::memcpy(out + r * Lp + jj, acc[r], sizeof(acc[r]));
  }
}

// out[r, c] = sum_{j < n} p[r, j] * rows[j, c] for r < kQ, c < Dhp (rows is [Lp, Dhp]).
inline void p_times_rows(const float* p, int64_t Lp, const float* rows, int64_t Dhp, int64_t n,
                         float* out) {
  for (int64_t cc = 0; cc < Dhp; cc += kV) {
    float acc[kQ][kV] = {};
    for (int64_t j = 0; j < n; ++j) {
      const float* vr = rows + j * Dhp + cc;
      for (int64_t r = 0; r < kQ; ++r) {
        const float pv = p[r * Lp + j];
#pragma omp simd
        for (int64_t u = 0; u < kV; ++u) acc[r][u] += pv * vr[u];
      }
    }
    for (int64_t r = 0; r < kQ; ++r) std::memcpy(out + r * Dhp + cc, acc[r], sizeof(acc[r]));
  }
}

// Copy rows i0..i0+kQ of slot `slot` of qkv (or of a [B, S, H, Dh] tensor when stride == D)
// into a [kQ, Dhp] block scaled by `scale`; rows past S are zero.
inline void load_rows(const float* base, int64_t stride, int64_t rows, int64_t Dh, int64_t Dhp,
                      float scale, float* dst) {
  std::fill(dst, dst + kQ * Dhp, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < Dh; ++c) dst[r * Dhp + c] = base[r * stride + c] * scale;
}

}  // namespace attn_detail

// Forward: out and lse. k_past / v_past may be null when P == 0.
inline void causal_attention_fwd_cpu(const AttnDims& d, const float* qkv, const float* k_past,
                                     const float* v_past, float* out, float* lse) {
  using namespace attn_detail;
  const int64_t Dh = d.Dh, D = d.D(), D3 = 3 * D, pairs = d.B * d.H;
  if (pairs == 0 || d.S == 0) return;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  // small problems (decoding one token) run on the calling thread: a thread team costs more
#pragma omp parallel if (pairs > 1 && pairs * d.S * d.L() * Dh > kParallelWork)
  {
    Tiles t(d, false);
    const int64_t Lp = t.Lp, Dhp = t.Dhp;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < pairs; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      gather(d, qkv, k_past, 1, b, h, Lp, Dhp, t.kt.data(), nullptr);
      gather(d, qkv, v_past, 2, b, h, Lp, Dhp, nullptr, t.vrow.data());
      for (int64_t i0 = 0; i0 < d.S; i0 += kQ) {
        const int64_t rows = std::min(kQ, d.S - i0);
        const int64_t n = d.P + i0 + rows;  // keys any row of the block sees
        load_rows(qkv + (b * d.S + i0) * D3 + h * Dh, D3, rows, Dh, Dhp, scale, t.q.data());
        rows_times_t(t.q.data(), Dhp, t.kt.data(), Lp, Dh, n, t.s.data());
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = t.s.data() + r * Lp;
          const int64_t nr = d.P + i0 + r + 1;
          float m = -INFINITY;
#pragma omp simd reduction(max : m)
          for (int64_t j = 0; j < nr; ++j) m = sr[j] > m ? sr[j] : m;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < nr; ++j) {
            const float p = fast_exp(sr[j] - m);
            sr[j] = p;
            sum += p;
          }
          const float inv = 1.0f / sum;
#pragma omp simd
          for (int64_t j = 0; j < nr; ++j) sr[j] *= inv;
          for (int64_t j = nr; j < n; ++j) sr[j] = 0.f;  // causal mask inside the block
          lse[bh * d.S + i0 + r] = m + std::log(sum);
        }
        for (int64_t r = rows; r < kQ; ++r) std::fill(t.s.data() + r * Lp, t.s.data() + r * Lp + n, 0.f);
        p_times_rows(t.s.data(), Lp, t.vrow.data(), Dhp, n, t.acc.data());
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(out + (b * d.S + i0 + r) * D + h * Dh, t.acc.data() + r * Dhp, sizeof(float) * Dh);
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
#pragma omp parallel if (pairs > 1 && pairs * d.S * d.L() * Dh > kParallelWork)
  {
    Tiles t(d, true);
    const int64_t Lp = t.Lp, Dhp = t.Dhp;
    std::vector<float> dk(static_cast<size_t>(Lp * Dhp)), dv(static_cast<size_t>(Lp * Dhp));
    std::vector<float> qraw(static_cast<size_t>(kQ * Dhp)), delta(kQ);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < pairs; ++bh) {
      const int64_t b = bh / d.H, h = bh % d.H;
      gather(d, qkv, k_past, 1, b, h, Lp, Dhp, t.kt.data(), t.krow.data());
      gather(d, qkv, v_past, 2, b, h, Lp, Dhp, t.vt.data(), nullptr);
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      for (int64_t i0 = 0; i0 < d.S; i0 += kQ) {
        const int64_t rows = std::min(kQ, d.S - i0);
        const int64_t n = d.P + i0 + rows;
        const float* qbase = qkv + (b * d.S + i0) * D3 + h * Dh;
        load_rows(qbase, D3, rows, Dh, Dhp, scale, t.q.data());
        load_rows(qbase, D3, rows, Dh, Dhp, 1.0f, qraw.data());
        load_rows(grad_out + (b * d.S + i0) * D + h * Dh, D, rows, Dh, Dhp, 1.0f, t.go.data());
        for (int64_t r = 0; r < kQ; ++r) {
          float acc = 0.f;
          if (r < rows) {
            const float* o = out + (b * d.S + i0 + r) * D + h * Dh;
            for (int64_t c = 0; c < Dh; ++c) acc += t.go[r * Dhp + c] * o[c];
          }
          delta[r] = acc;
        }
        rows_times_t(t.q.data(), Dhp, t.kt.data(), Lp, Dh, n, t.s.data());      // scores
        rows_times_t(t.go.data(), Dhp, t.vt.data(), Lp, Dh, n, t.dp.data());    // dP = dO V^T
        for (int64_t r = 0; r < kQ; ++r) {
          float* pr = t.s.data() + r * Lp;
          float* dsr = t.dp.data() + r * Lp;
          const int64_t nr = r < rows ? d.P + i0 + r + 1 : 0;
          const float l = r < rows ? lse[bh * d.S + i0 + r] : 0.f;
          const float dl = delta[r];
#pragma omp simd
          for (int64_t j = 0; j < nr; ++j) {
            const float p = fast_exp(pr[j] - l);
            pr[j] = p;
            dsr[j] = p * (dsr[j] - dl) * scale;
          }
          for (int64_t j = nr; j < n; ++j) pr[j] = dsr[j] = 0.f;
        }
        // dQ = dS K  -> grad_qkv slot 0
        p_times_rows(t.dp.data(), Lp, t.krow.data(), Dhp, n, t.acc.data());
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(grad_qkv + (b * d.S + i0 + r) * D3 + h * Dh, t.acc.data() + r * Dhp, sizeof(float) * Dh);
        // dK_j += sum_r dS[r, j] q_r ; dV_j += sum_r P[r, j] dO_r
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t cc = 0; cc < Dhp; cc += kV) {
            float ak[kV], av[kV];
            std::memcpy(ak, dk.data() + j * Dhp + cc, sizeof(ak));
            std::memcpy(av, dv.data() + j * Dhp + cc, sizeof(av));
            for (int64_t r = 0; r < kQ; ++r) {  // rows past the block's end carry zeros
              const float ds = t.dp[r * Lp + j], p = t.s[r * Lp + j];
              const float* qr = qraw.data() + r * Dhp + cc;
              const float* gr = t.go.data() + r * Dhp + cc;
#pragma omp simd
              for (int64_t u = 0; u < kV; ++u) {
                ak[u] += ds * qr[u];
                av[u] += p * gr[u];
              }
            }
            std::memcpy(dk.data() + j * Dhp + cc, ak, sizeof(ak));
            std::memcpy(dv.data() + j * Dhp + cc, av, sizeof(av));
          }
        }
      }
      for (int64_t j = 0; j < L; ++j) {
        float* gk = j < d.P ? grad_k_past + (bh * d.P + j) * Dh
                            : grad_qkv + (b * d.S + (j - d.P)) * D3 + D + h * Dh;
        float* gv = j < d.P ? grad_v_past + (bh * d.P + j) * Dh : gk + D;
        std::memcpy(gk, dk.data() + j * Dhp, sizeof(float) * Dh);
        std::memcpy(gv, dv.data() + j * Dhp, sizeof(float) * Dh);
      }
    }
  }
}

}  // namespace semoe
