// Vector primitives, activation names and argument checks shared by the native CPU kernels (fff_cpu.cpp,
// moe_cpu.cpp).
//
// Plain loops written for the vectoriser (omp simd), and GCC/Clang vector types of 8 and 16 floats
// for the register-blocked loops (the FFF kernel's four-token output rows below, the MoE kernel's
// blocks). Inline functions with internal linkage, like ccli_op.h: each extension is its own shared
// library.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace ccli_cpu {
namespace {

enum class Act { Gelu, GeluTanh, Relu, Silu };

// `op` names the op in the error ("fff: unknown activation ...").
Act parse_act(std::string_view name, const char* op) {
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "relu") return Act::Relu;
  if (name == "silu") return Act::Silu;
  TORCH_CHECK_VALUE(false, op, ": unknown activation '", std::string(name), "' (gelu, gelu_tanh, relu, silu)");
}

// Argument checks of the ops' optional tensors: given at all, and a float32 CPU tensor (or absent).
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
inline bool is_float_cpu(const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; }
inline bool is_float_cpu(const std::optional<at::Tensor>& t) { return !present(t) || is_float_cpu(*t); }

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float* __restrict y, float a, const float* __restrict w, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * w[i];
}

// y += a[0] w0 + a[1] w1 + a[2] w2 + a[3] w3: four rows of one token in one pass over y.
inline void axpy_rows4(float* __restrict y, const float* a, const float* __restrict w0,
                       const float* __restrict w1, const float* __restrict w2,
                       const float* __restrict w3, int64_t n) {
  const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a0 * w0[i] + a1 * w1[i] + a2 * w2[i] + a3 * w3[i];
}

// Unaligned load / store of a lane type: one float, or one of the vector types below.
template <typename V>
inline V loadu(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
inline void storeu(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

#if defined(__GNUC__) || defined(__clang__)
#define CCLI_VECTOR_EXT 1
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
// 16 floats: one 512-bit register where the CPU has them, split in two by the compiler where not
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v8f loadu8(const float* p) { return loadu<v8f>(p); }
inline void storeu8(float* p, v8f v) { storeu(p, v); }
inline v16f loadu16(const float* p) { return loadu<v16f>(p); }
inline void storeu16(float* p, v16f v) { storeu(p, v); }
#endif

// ys[t] += sum_q z[t * W + q] * w_out[q] for four tokens t, where w_out holds W rows of H floats:
// 4 tokens x 16 columns accumulated in registers, so each row of w_out is read once for all four.
inline void add_rows_tokens4(float* const* ys, const float* z, int64_t W, const float* w_out, int64_t H) {
  int64_t i0 = 0;
#ifdef CCLI_VECTOR_EXT
  for (; i0 + 16 <= H; i0 += 16) {
    v8f acc[4][2];
    for (int t = 0; t < 4; ++t) acc[t][0] = acc[t][1] = v8f{};
    const float* wo = w_out + i0;
    for (int64_t q = 0; q < W; ++q, wo += H) {
      const v8f u = loadu8(wo), v = loadu8(wo + 8);
      for (int t = 0; t < 4; ++t) {
        const float s = z[t * W + q];
        acc[t][0] += s * u;
        acc[t][1] += s * v;
      }
    }
    for (int t = 0; t < 4; ++t) {
      storeu8(ys[t] + i0, loadu8(ys[t] + i0) + acc[t][0]);
      storeu8(ys[t] + i0 + 8, loadu8(ys[t] + i0 + 8) + acc[t][1]);
    }
  }
#endif
  if (i0 < H) {
    const int64_t rest = H - i0;
    for (int64_t q = 0; q < W; ++q) {
      const float* wo = w_out + q * H + i0;
      for (int t = 0; t < 4; ++t) axpy(ys[t] + i0, z[t * W + q], wo, rest);
    }
  }
}

}  // namespace
}  // namespace ccli_cpu
