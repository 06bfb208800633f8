// Per-token absmax int8 quantisation of float32 activations, shared by the native kernels that take
// int8 activations (ternary_cpu.cpp, int8_cpu.cpp). It reproduces the PyTorch reference bit for bit
// (ccli/kernels/ternary_format.py, quantize_activations): sx = max(max|x| / 127, 1e-8) in float32,
// q = clamp(round_half_even(x / sx), -127, 127) with a true division.
//
// The includer defines CCLI_QUANT_AVX2 (and includes <immintrin.h>) where the AVX2 paths may be used;
// without it the scalar loops compute the same values. Internal linkage, as in ccli_op.h.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ccli_quant {
namespace {

constexpr float kActEps = 1e-8f;

float absmax(const float* x, int64_t n) {
  float m = 0.0f;
  int64_t k = 0;
#ifdef CCLI_QUANT_AVX2
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    v0 = _mm256_max_ps(v0, _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask));
    v1 = _mm256_max_ps(v1, _mm256_and_ps(_mm256_loadu_ps(x + k + 8), abs_mask));
  }
  v0 = _mm256_max_ps(v0, v1);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v0), _mm256_extractf128_ps(v0, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  m = _mm_cvtss_f32(h);
#endif
  for (; k < n; ++k) m = std::max(m, std::fabs(x[k]));
  return m;
}

inline float token_scale(const float* x, int64_t n) {
  const float sx = absmax(x, n) / 127.0f;
  return sx < kActEps ? kActEps : sx;  // NaN stays NaN, like clamp_min
}

inline int8_t quantize_one(float v, float sx) {
  float r = std::nearbyint(v / sx);  // default rounding mode: half to even, like torch.round
  r = r < -127.0f ? -127.0f : r;
  r = r > 127.0f ? 127.0f : r;
  return static_cast<int8_t>(r);
}

// q[k] = clamp(round(x[k] / sx), -127, 127) for k < n.
void quantize_span(const float* x, int64_t n, float sx, int8_t* q) {
  int64_t k = 0;
#ifdef CCLI_QUANT_AVX2
  const __m256 vs = _mm256_set1_ps(sx), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto q8 = [&](const float* p) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
    return _mm256_cvtps_epi32(r);
  };
  for (; k + 32 <= n; k += 32) {
    const __m256i a = _mm256_packs_epi32(q8(x + k), q8(x + k + 8));
    const __m256i b = _mm256_packs_epi32(q8(x + k + 16), q8(x + k + 24));
    const __m256i p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), p);
  }
#endif
  for (; k < n; ++k) q[k] = quantize_one(x[k], sx);
}

}  // namespace
}  // namespace ccli_quant
