// Weight-only int8 and int4 grouped expert FFN on the CPU (inference forward only). Paddle-free.
// (int4: see the int4 section below.)
//
// Expert weights are int8 with one float32 scale per output channel:
//   W1[e] ~ q1[e] * s1[e][None, :]  ([D, F], s1 [F]),   W2[e] ~ q2[e] * s2[e][None, :]  ([F, D], s2 [D])
// The GEMMs read the int8 weights directly (a quarter of float32's bytes) and apply the scale
// to each output once:  (x @ q)[r, n] * s[n]  ==  x @ (q * s)  up to float32 rounding.
// For expert e over its rows:  h = (x_e @ q1[e]) * s1[e] + b1[e];  a = act(h);
//                              y_e = (a @ q2[e]) * s2[e] + b2[e].
// Each output row is a fixed-order float32 sum over k of its own input row (no dependence on
// how many rows an expert has or on the other rows): batch-invariant and deterministic.
// One thread: on the 2-vCPU serving machine, splitting the work over two OpenMP threads (by
// column blocks or by experts) was slower at every size measured (one-token and 8-sequence
// decode steps, 64 rows per expert); the expert loader threads and the model share the cores.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "semoe/activation.h"

namespace semoe {

namespace detail {

// 4 rows x 32 columns: 16 accumulator vectors of 8 floats (GCC's preferred 256-bit width),
// registers to spare for the converted weights; the conversion of a weight row is shared by 4 rows.
constexpr int64_t kInt8ColBlock = 32;  // output columns per block
constexpr int64_t kInt8RowBlock = 4;   // rows sharing one int8 -> float conversion

// out[r, n0:n0+W] = (x[r] @ q[:, n0:n0+W]) * scale + bias for RB rows, W = kInt8ColBlock;
// the accumulators stay in registers across the k loop.
template <int64_t RB>
inline void int8_block(const float* x, int64_t ldx, const int8_t* q, int64_t K, int64_t N,
                       int64_t n0, const float* scale, const float* bias, float* out, int64_t ldo) {
  constexpr int64_t W = kInt8ColBlock;
  float acc[RB][W];
  for (int64_t r = 0; r < RB; ++r)
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) acc[r][j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* qk = q + k * N + n0;
    float w[W];
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) w[j] = static_cast<float>(qk[j]);
    for (int64_t r = 0; r < RB; ++r) {
      const float xv = x[r * ldx + k];
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) acc[r][j] += xv * w[j];
    }
  }
  for (int64_t r = 0; r < RB; ++r) {
    float* o = out + r * ldo + n0;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) o[j] = acc[r][j] * scale[n0 + j] + bias[n0 + j];
  }
}

// The same for one row and a column range of any width (the tail past the last full block;
// a column is always computed by the same one of the two, so rows stay batch-invariant).
inline void int8_tail(const float* x, const int8_t* q, int64_t K, int64_t N, int64_t n0,
                      int64_t n1, const float* scale, const float* bias, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += x[k] * static_cast<float>(q[k * N + n]);
    out[n] = acc * scale[n] + bias[n];
  }
}

}  // namespace detail

// out[r, :] = (x[r, :] @ q) * scale + bias for rows r < M: x [M, K] float32 (row stride ldx),
// q [K, N] int8 row-major, scale/bias [N], out [M, N] (row stride ldo).
inline void int8_linear(const float* x, int64_t ldx, int64_t M, const int8_t* q, int64_t K,
                        int64_t N, const float* scale, const float* bias, float* out, int64_t ldo) {
  constexpr int64_t W = detail::kInt8ColBlock, RB = detail::kInt8RowBlock;
  const int64_t full = N / W;
  for (int64_t b = 0; b < full; ++b) {
    int64_t r = 0;
    for (; r + RB <= M; r += RB)
      detail::int8_block<RB>(x + r * ldx, ldx, q, K, N, b * W, scale, bias, out + r * ldo, ldo);
    for (; r < M; ++r)
      detail::int8_block<1>(x + r * ldx, ldx, q, K, N, b * W, scale, bias, out + r * ldo, ldo);
  }
  if (full * W < N)  // partial last block: row by row
    for (int64_t r = 0; r < M; ++r)
      detail::int8_tail(x + r * ldx, q, K, N, full * W, N, scale, bias, out + r * ldo);
}

// ---------------------------------------------------------------------------- int4
// Weight-only int4: q [K, N] values in [-7, 7], two per byte along N (byte [k, m] holds column
// 2m in its low nibble and 2m+1 in its high nibble, two's complement), one float32 scale per
// group of G consecutive k and output column: scale [ceil(K / G), N], W[k, n] ~ q[k, n] * scale[k / G, n].
// out[r, n] = sum over groups g of (sum_{k in g} x[r, k] q[k, n]) * scale[g, n] + bias[n]:
// a fixed order per row, so rows are batch-invariant as in int8_linear.
namespace detail {

constexpr int64_t kInt4ColBlock = 32;  // output columns per block (16 bytes of a weight row)

inline int8_t int4_lo(uint8_t b) { return static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4; }
inline int8_t int4_hi(uint8_t b) { return static_cast<int8_t>(b) >> 4; }

// RB rows, columns [n0, n0 + kInt4ColBlock); even and odd columns accumulate separately (the
// low and high nibbles of the same bytes), interleaved when written.
template <int64_t RB>
inline void int4_block(const float* x, int64_t ldx, const uint8_t* q, int64_t K, int64_t N,
                       int64_t G, int64_t n0, const float* scale, const float* bias, float* out,
                       int64_t ldo) {
  constexpr int64_t H = kInt4ColBlock / 2;
  const int64_t NB = N / 2;  // bytes per weight row
  float acc_e[RB][H], acc_o[RB][H];
  for (int64_t r = 0; r < RB; ++r)
#pragma omp simd
    for (int64_t m = 0; m < H; ++m) acc_e[r][m] = acc_o[r][m] = 0.f;
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
    const int64_t k1 = k0 + G < K ? k0 + G : K;
    float ge[RB][H], go[RB][H];
    for (int64_t r = 0; r < RB; ++r)
#pragma omp simd
      for (int64_t m = 0; m < H; ++m) ge[r][m] = go[r][m] = 0.f;
    for (int64_t k = k0; k < k1; ++k) {
      const uint8_t* qk = q + k * NB + n0 / 2;
      float we[H], wo[H];
#pragma omp simd
      for (int64_t m = 0; m < H; ++m) {
        we[m] = static_cast<float>(int4_lo(qk[m]));
        wo[m] = static_cast<float>(int4_hi(qk[m]));
      }
      for (int64_t r = 0; r < RB; ++r) {
        const float xv = x[r * ldx + k];
#pragma omp simd
        for (int64_t m = 0; m < H; ++m) {
          ge[r][m] += xv * we[m];
          go[r][m] += xv * wo[m];
        }
      }
    }
    const float* sg = scale + g * N + n0;
    for (int64_t r = 0; r < RB; ++r)
#pragma omp simd
      for (int64_t m = 0; m < H; ++m) {
        acc_e[r][m] += ge[r][m] * sg[2 * m];
        acc_o[r][m] += go[r][m] * sg[2 * m + 1];
      }
  }
  for (int64_t r = 0; r < RB; ++r) {
    float* o = out + r * ldo + n0;
    for (int64_t m = 0; m < H; ++m) {
      o[2 * m] = acc_e[r][m] + bias[n0 + 2 * m];
      o[2 * m + 1] = acc_o[r][m] + bias[n0 + 2 * m + 1];
    }
  }
}

// One row, columns [n0, n1) (the tail past the last full block; n0 and n1 even).
inline void int4_tail(const float* x, const uint8_t* q, int64_t K, int64_t N, int64_t G,
                      int64_t n0, int64_t n1, const float* scale, const float* bias, float* out) {
  const int64_t NB = N / 2;
  for (int64_t n = n0; n < n1; ++n) {
    float acc = 0.f;
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
      const int64_t k1 = k0 + G < K ? k0 + G : K;
      float part = 0.f;
      for (int64_t k = k0; k < k1; ++k) {
        const uint8_t b = q[k * NB + n / 2];
        part += x[k] * static_cast<float>(n % 2 ? int4_hi(b) : int4_lo(b));
      }
      acc += part * scale[g * N + n];
    }
    out[n] = acc + bias[n];
  }
}

}  // namespace detail

// out[r, :] = sum_g (x[r, g] @ q[g, :]) * scale[g, :] + bias for rows r < M: x [M, K] float32
// (row stride ldx), q packed int4 [K, N / 2] bytes (N even), scale [ceil(K / G), N], bias [N].
inline void int4_linear(const float* x, int64_t ldx, int64_t M, const uint8_t* q, int64_t K,
                        int64_t N, int64_t G, const float* scale, const float* bias, float* out,
                        int64_t ldo) {
  constexpr int64_t W = detail::kInt4ColBlock, RB = detail::kInt8RowBlock;
  const int64_t full = N / W;
  for (int64_t b = 0; b < full; ++b) {
    int64_t r = 0;
    for (; r + RB <= M; r += RB)
      detail::int4_block<RB>(x + r * ldx, ldx, q, K, N, G, b * W, scale, bias, out + r * ldo, ldo);
    for (; r < M; ++r)
      detail::int4_block<1>(x + r * ldx, ldx, q, K, N, G, b * W, scale, bias, out + r * ldo, ldo);
  }
  if (full * W < N)
    for (int64_t r = 0; r < M; ++r)
      detail::int4_tail(x + r * ldx, q, K, N, G, full * W, N, scale, bias, out + r * ldo);
}

// Forward (both formats). x [n_rows, D] expert-major rows, counts [E] -> out [n_rows, D] (rows
// past sum(counts): zeros). linear1(e, x, n, out) and linear2(e, a, n, out) run expert e's
// two projections (bias included) on n rows. Scratch: 2 * max(counts) * F floats.
template <Activation A, typename L1, typename L2>
void grouped_ffn_quant_fwd_cpu(const float* x, const int32_t* counts, int64_t n_rows, int64_t E,
                               int64_t D, int64_t F, float* out, float* scratch, L1&& linear1,
                               L2&& linear2) {
  std::vector<int64_t> off(static_cast<size_t>(E) + 1, 0);
  int64_t most = 0;
  for (int64_t e = 0; e < E; ++e) {
    off[e + 1] = off[e] + counts[e];
    most = counts[e] > most ? counts[e] : most;
  }
  float* hidden = scratch;
  float* act = scratch + most * F;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = counts[e];
    if (n == 0) continue;
    linear1(e, x + off[e] * D, n, hidden);
    for (int64_t i = 0; i < n * F; ++i) act[i] = act_fwd<A>(hidden[i]);
    linear2(e, act, n, out + off[e] * D);
  }
  const int64_t used = off[E];
  if (n_rows > used) std::memset(out + used * D, 0, sizeof(float) * (n_rows - used) * D);
}

// int8: w1 int8 [E, D, F], s1 [E, F], b1 [E, F], w2 int8 [E, F, D], s2 [E, D], b2 [E, D].
template <Activation A>
void grouped_ffn_int8_fwd_cpu(const float* x, const int32_t* counts, const int8_t* w1,
                              const float* s1, const float* b1, const int8_t* w2, const float* s2,
                              const float* b2, int64_t n_rows, int64_t E, int64_t D, int64_t F,
                              float* out, float* scratch) {
  grouped_ffn_quant_fwd_cpu<A>(
      x, counts, n_rows, E, D, F, out, scratch,
      [&](int64_t e, const float* xe, int64_t n, float* h) {
        int8_linear(xe, D, n, w1 + e * D * F, D, F, s1 + e * F, b1 + e * F, h, F);
      },
      [&](int64_t e, const float* a, int64_t n, float* y) {
        int8_linear(a, F, n, w2 + e * F * D, F, D, s2 + e * D, b2 + e * D, y, D);
      });
}

// int4 (groups of G along the input dim): w1 packed [E, D, F/2], s1 [E, ceil(D/G), F], b1 [E, F],
// w2 packed [E, F, D/2], s2 [E, ceil(F/G), D], b2 [E, D]; D and F even.
template <Activation A>
void grouped_ffn_int4_fwd_cpu(const float* x, const int32_t* counts, const uint8_t* w1,
                              const float* s1, const float* b1, const uint8_t* w2, const float* s2,
                              const float* b2, int64_t n_rows, int64_t E, int64_t D, int64_t F,
                              int64_t G, float* out, float* scratch) {
  const int64_t g1 = (D + G - 1) / G, g2 = (F + G - 1) / G;
  grouped_ffn_quant_fwd_cpu<A>(
      x, counts, n_rows, E, D, F, out, scratch,
      [&](int64_t e, const float* xe, int64_t n, float* h) {
        int4_linear(xe, D, n, w1 + e * D * (F / 2), D, F, G, s1 + e * g1 * F, b1 + e * F, h, F);
      },
      [&](int64_t e, const float* a, int64_t n, float* y) {
        int4_linear(a, F, n, w2 + e * F * (D / 2), F, D, G, s2 + e * g2 * D, b2 + e * D, y, D);
      });
}

}  // namespace semoe
