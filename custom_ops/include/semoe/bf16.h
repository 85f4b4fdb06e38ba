// float32 -> bfloat16 rounding shared by the CPU kernels: round to nearest even, a NaN stays a
// quiet NaN. Scalar and 16-lane AVX-512 forms give the same bits. Paddle-free.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace semoe {

// bfloat16 bits of v.
inline uint16_t to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// rows x cols block with row stride ld (ld >= cols) -> dense bf16 copy with row stride cols,
// on the calling thread.
inline void rows_to_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld,
                         uint16_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld;
    uint16_t* o = dst + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) o[c] = to_bf16(s[c]);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SEMOE_BF16X16 1
// to_bf16 of 16 lanes.
inline __m256i to_bf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}
#else
#define SEMOE_BF16X16 0
#endif

}  // namespace semoe
