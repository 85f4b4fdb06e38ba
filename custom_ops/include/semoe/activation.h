// Element-wise activations for the expert FFN, written so that GCC auto-vectorizes them
// (no libm calls, no branches in the inner loops); the GELU backward passes have an AVX-512
// form (gelu_grad16) computing the same formulas. Paddle-free; used by the CPU kernels.
//
// Accuracy (float32): exp ~2 ulp over its clamped range; erf absolute error < 1.5e-7
// (Abramowitz & Stegun 7.1.26, the backward) and < 3.3e-7 (rational_erf, the forward), so gelu
// and its derivative differ from exact fp32 ones by < 1e-6 * max(1, |x|) (measured over
// [-20, 20] in 1e-5 steps: 2.1e-7 and 2.8e-7).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "semoe/bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace semoe {

enum class Activation : int { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3 };

inline bool parse_activation(const std::string& name, Activation* out) {
  if (name == "gelu") { *out = Activation::kGelu; return true; }
  if (name == "gelu_tanh") { *out = Activation::kGeluTanh; return true; }
  if (name == "relu") { *out = Activation::kRelu; return true; }
  if (name == "silu") { *out = Activation::kSilu; return true; }
  return false;
}

// exp(x) for x in float32 range, branch-free: x = n*ln2 + r, |r| <= ln2/2, exp(r) by a
// degree-6 Taylor polynomial, 2^n spliced into the exponent bits. Clamped to [-87, 88].
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // round-to-nearest via the 1.5 * 2^23 trick (vectorizes, unlike roundf)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // ln2 split in a high part exact in float and a low correction (Cody-Waite).
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// erf(x), |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26), sign handled without branches;
// *gauss (if not null) receives the exp(-x^2) the formula computes on the way.
inline float fast_erf(float x, float* gauss = nullptr) {
  const float ax = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  p = p * t;
  const float e = fast_exp(-ax * ax);
  if (gauss != nullptr) *gauss = e;
  const float y = 1.0f - p * e;
  return x < 0.0f ? -y : y;
}

// erf(z) = z * P(z^2) / Q(z^2) for |z| <= 4 (z clamped there: erf(4) = 1 - 1.5e-8): a rational
// fit of our own (iteratively reweighted least squares on [0, 4] in float64), |error| < 2.2e-8
// in exact arithmetic and < 3.3e-7 evaluated in float32. One division and no exp: the forward
// GELU pass over a [1024, 2048] block runs as fast as a ReLU pass with it (memory-bound), ~30%
// faster than through fast_erf. The backward keeps fast_erf, whose exp(-z^2) the pdf reuses.
inline float rational_erf(float z) {
  z = z < -4.0f ? -4.0f : (z > 4.0f ? 4.0f : z);
  const float u = z * z;
  float p = 1.974716599e-06f;
  p = p * u + 2.880374794e-04f;
  p = p * u + 4.003763220e-03f;
  p = p * u + 5.346781570e-02f;
  p = p * u + 1.962526052e-01f;
  p = p * u + 1.128378977e+00f;
  float q = 3.747947660e-05f;
  q = q * u + 1.216376079e-03f;
  q = q * u + 1.544466155e-02f;
  q = q * u + 1.164777963e-01f;
  q = q * u + 5.072555025e-01f;
  q = q * u + 1.0f;
  return z * p / q;
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhC = 0.044715f;

inline float tanh_via_exp(float y) {
  // tanh(y) = 1 - 2 / (exp(2y) + 1); fast_exp clamps, so large |y| saturates to +-1.
  return 1.0f - 2.0f / (fast_exp(2.0f * y) + 1.0f);
}

// Forward: a = act(h).
template <Activation A>
inline float act_fwd(float h) {
  if constexpr (A == Activation::kGelu) {
    return 0.5f * h * (1.0f + rational_erf(h * kInvSqrt2));
  } else if constexpr (A == Activation::kGeluTanh) {
    const float u = kSqrt2OverPi * (h + kGeluTanhC * h * h * h);
    return 0.5f * h * (1.0f + tanh_via_exp(u));
  } else if constexpr (A == Activation::kRelu) {
    return h > 0.0f ? h : 0.0f;
  } else {
    return h / (1.0f + fast_exp(-h));
  }
}

// Writing an activation output as float32 or as bfloat16 bits (the bf16 GEMM operand mode):
// the same value, rounded by to_bf16 in the second case.
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = to_bf16(v); }

// h[i] += bias[i % cols]; a[i] = act(h[i]) over a [rows, cols] row-major block; a is float or
// uint16_t (bf16 bits).
template <Activation A, typename T>
inline void bias_act_rows(float* h, T* a, const float* bias, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* hr = h + r * cols;
    T* ar = a + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const float v = hr[c] + bias[c];
      hr[c] = v;
      put(ar + c, act_fwd<A>(v));
    }
  }
}

struct ActPair {
  float a;  // act(h)
  float d;  // act'(h)
};

// act(h) and act'(h) together, sharing the transcendental work.
template <Activation A>
inline ActPair act_fwd_grad(float h) {
  if constexpr (A == Activation::kGelu) {
    float gauss;  // exp(-h^2 / 2), shared by the cdf's erf and the pdf
    const float cdf = 0.5f * (1.0f + fast_erf(h * kInvSqrt2, &gauss));
    const float pdf = kInvSqrt2Pi * gauss;
    return {h * cdf, cdf + h * pdf};
  } else if constexpr (A == Activation::kGeluTanh) {
    const float u = kSqrt2OverPi * (h + kGeluTanhC * h * h * h);
    const float th = tanh_via_exp(u);
    const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhC * h * h);
    return {0.5f * h * (1.0f + th), 0.5f * (1.0f + th) + 0.5f * h * (1.0f - th * th) * du};
  } else if constexpr (A == Activation::kRelu) {
    return {h > 0.0f ? h : 0.0f, h > 0.0f ? 1.0f : 0.0f};
  } else {
    const float s = 1.0f / (1.0f + fast_exp(-h));
    return {h * s, s * (1.0f + h * (1.0f - s))};
  }
}

#if defined(__AVX512F__)
// fast_exp, 16 lanes at a time: the same clamping and polynomial.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 big = _mm512_set1_ps(12582912.0f);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, log2e, big), big);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// Natural log of 16 lanes of positive normal floats (error < 3 ulp): x = 2^e m with
// m in [sqrt(1/2), sqrt(2)], log m = 2 atanh(u) = 2 (u + u^3/3 + ... + u^9/9) with
// u = (m - 1) / (m + 1), |u| <= 0.172 (the next term is < 2.1e-9 of the sum), and e ln 2 in
// two parts (ln 2 = 0.693359375 - 2.12194440e-4, the first exact in few bits).
inline __m512 log16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 e = _mm512_getexp_ps(x);                                        // floor(log2 x)
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  // [1, 2)
  const __mmask16 high = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, high, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, high, e, one);
  const __m512 u = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
  const __m512 u2 = _mm512_mul_ps(u, u);
  __m512 p = _mm512_set1_ps(1.0f / 9.0f);
  p = _mm512_fmadd_ps(p, u2, _mm512_set1_ps(1.0f / 7.0f));
  p = _mm512_fmadd_ps(p, u2, _mm512_set1_ps(1.0f / 5.0f));
  p = _mm512_fmadd_ps(p, u2, _mm512_set1_ps(1.0f / 3.0f));
  p = _mm512_fmadd_ps(p, u2, one);
  const __m512 lm = _mm512_mul_ps(_mm512_add_ps(u, u), p);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f),
                         _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), lm));
}

// 1 / x for x >= 1: the 14-bit estimate refined by one Newton step (relative error ~2^-27,
// below float rounding) instead of a division, whose unit runs one 16-lane divide per ~10
// cycles: the GELU backward pass below was bound by it.
inline __m512 recip16(__m512 x) {
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.0f)), r);
}

// act_fwd_grad<kGelu> of 16 lanes: the same formulas (fast_erf's A&S 7.1.26, its exp(-z^2)
// shared with the pdf), with recip16 for the one division. *a = gelu(h), *d = gelu'(h).
inline void gelu_grad16(__m512 h, __m512* a, __m512* d) {
  const __m512 z = _mm512_mul_ps(h, _mm512_set1_ps(kInvSqrt2));
  const __m512 az = _mm512_abs_ps(z);
  // |z| capped at 10 for t alone (from |z| = 9.4 on, exp(-z^2) is clamped and erf(|z|) rounds
  // to 1 either way): recip16(inf) would be NaN where 1 / inf is 0
  const __m512 zt = _mm512_min_ps(az, _mm512_set1_ps(10.0f));
  const __m512 t = recip16(_mm512_fmadd_ps(zt, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 gauss = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), az), az));
  const __m512 y = _mm512_fnmadd_ps(p, gauss, _mm512_set1_ps(1.0f));  // erf(|z|)
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 erf = _mm512_mask_sub_ps(y, neg, _mm512_setzero_ps(), y);
  const __m512 cdf = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
  const __m512 pdf = _mm512_mul_ps(_mm512_set1_ps(kInvSqrt2Pi), gauss);
  *a = _mm512_mul_ps(h, cdf);
  *d = _mm512_fmadd_ps(h, pdf, cdf);
}

// Lane u of 16 is on when j + u < end (a row's tail: lanes_below(c, cols)).
inline __mmask16 lanes_below(int64_t j, int64_t end) {
  const int64_t k = end - j;
  return k >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : (k <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << k) - 1u));
}

// put() of the lanes in `on`.
inline void put16(float* p, __mmask16 on, __m512 v) { _mm512_mask_storeu_ps(p, on, v); }
#if SEMOE_BF16X16
inline void put16(uint16_t* p, __mmask16 on, __m512 v) {
  _mm256_mask_storeu_epi16(p, on, to_bf16x16(v));
}
#endif
#endif

// Whether the AVX-512 GELU backward pass can write outputs of type T.
template <typename T>
constexpr bool kGeluGrad16Out =
#if defined(__AVX512F__)
    std::is_same_v<T, float> || SEMOE_BF16X16;
#else
    false;
#endif

// Backward fused pass: given pre-activation h and upstream grad g (= dL/da), write
// a = act(h) (needed for the weight gradient) and overwrite g with dL/dh = g * act'(h).
template <Activation A>
inline void act_bwd_rows(const float* h, float* a, float* g, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (A == Activation::kGelu) {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 on = lanes_below(i, n);
      __m512 av, dv;
      gelu_grad16(_mm512_maskz_loadu_ps(on, h + i), &av, &dv);
      _mm512_mask_storeu_ps(a + i, on, av);
      _mm512_mask_storeu_ps(g + i, on, _mm512_mul_ps(_mm512_maskz_loadu_ps(on, g + i), dv));
    }
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const ActPair r = act_fwd_grad<A>(h[i]);
    a[i] = r.a;
    g[i] = g[i] * r.d;
  }
}

// act_bwd_rows over a [rows, cols] block that also adds each column of the new g (= dL/dh)
// into colsum[cols] (a bias gradient), rows in order: the same sums, in the same order, as a
// separate column_sum pass over g, without reading g again. The new g goes to gout (g itself
// when T is float; bf16 bits, with a, when T is uint16_t); colsum sums the float32 values.
template <Activation A, typename T>
inline void act_bwd_rows_colsum(const float* h, T* a, const float* g, T* gout, int64_t rows,
                                int64_t cols, float* colsum) {
#if defined(__AVX512F__)
  if constexpr (A == Activation::kGelu && kGeluGrad16Out<T>) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* hr = h + r * cols;
      T* ar = a + r * cols;
      const float* gr = g + r * cols;
      T* gor = gout + r * cols;
      for (int64_t c = 0; c < cols; c += 16) {
        const __mmask16 on = lanes_below(c, cols);
        __m512 av, dv;
        gelu_grad16(_mm512_maskz_loadu_ps(on, hr + c), &av, &dv);
        const __m512 gv = _mm512_mul_ps(_mm512_maskz_loadu_ps(on, gr + c), dv);
        put16(ar + c, on, av);
        put16(gor + c, on, gv);
        const __m512 cs = _mm512_maskz_loadu_ps(on, colsum + c);
        _mm512_mask_storeu_ps(colsum + c, on, _mm512_add_ps(cs, gv));
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const float* hr = h + r * cols;
    T* ar = a + r * cols;
    const float* gr = g + r * cols;
    T* gor = gout + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const ActPair p = act_fwd_grad<A>(hr[c]);
      const float gv = gr[c] * p.d;
      put(ar + c, p.a);
      put(gor + c, gv);
      colsum[c] += gv;
    }
  }
}

}  // namespace semoe
