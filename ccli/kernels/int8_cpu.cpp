// Native CPU kernel for int8 linear layers (W8A8): the ccli::int8_linear op.
//
// Contract (see ccli/kernels/int8.py): weight int8 (out, in), per output channel scale float32 (out),
// bias float32 (out) or none. Per token q = clamp(round_half_even(x / sx), -127, 127) with
// sx = max(max|x| / 127, 1e-8) (ccli_quant.h, bit-identical to the PyTorch reference);
// acc[n, i] = sum_j q[n, j] * weight[i, j], exact in int32; y[n, i] = acc * sx[n] * scale[i] + bias[i].
//
// The integer product, for more than a few tokens, is torch's own `_int_mm` (oneDNN on x86: AMX or VNNI
// int8 instructions where the CPU has them), on the weight's transposed view, so no private weight copy
// is kept. What this file adds around it is the fusion: quantising the activations and the float
// epilogue are one pass each over the data, instead of the eight or so PyTorch ops (absmax, divide,
// round, clamp, cast, three products) whose per-call overhead dominates a small layer.
//
// For a few tokens (decoding: one) oneDNN's call costs ~60-90 us whatever the size (one 576 x 1536
// layer: 89 us for 1 token against 42 us for torch's dynamic int8), so up to `g_small_m` tokens a
// row-by-row kernel of its own runs instead, on CPUs with AVX-512 VNNI (31 us there): `vpdpbusd` takes
// unsigned x signed bytes, so the activations go in as u = q + 128 and sum(q * w) = sum(u * w) -
// 128 * sum(w), the row sum taken in the same pass (a dpbusd by ones). Every row is read once per group
// of up to 4 tokens, from L1 after the first. The int32 sums are exact for rows of up to 65,536 inputs
// (255 * 127 * 65,536 < 2^31); longer rows go to _int_mm.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#if defined(__AVX2__) && !defined(CCLI_INT8_SCALAR)
#include <immintrin.h>
#define CCLI_QUANT_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define CCLI_INT8_VNNI 1
#endif
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "ccli_op.h"
#include "ccli_quant.h"

namespace {

using ccli_op::without_gil;
using ccli_quant::quantize_span;
using ccli_quant::token_scale;

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0,
                    "int8_linear: x must be 2-D float32 (tokens, in) with in > 0, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == x.size(1),
                    "int8_linear: weight must be int8 (out, ", x.size(1), "), got ", weight.scalar_type(), " ",
                    weight.sizes());
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.numel() == weight.size(0),
                    "int8_linear: scale must be float32 with one value per output (", weight.size(0), "), got ",
                    scale.scalar_type(), " ", scale.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->numel() == weight.size(0),
                      "int8_linear: bias must be float32 (", weight.size(0), "), got ", bias->scalar_type(), " ",
                      bias->sizes());
  }
}

// Up to this many tokens the row-by-row VNNI kernel runs instead of _int_mm (0: never); see the top.
constexpr int64_t kSmallM = 4;  // measured: at 8 tokens _int_mm is as fast or faster
constexpr int64_t kSmallMaxIn = 65536;
std::atomic<int64_t> g_small_m{kSmallM};

#ifdef CCLI_INT8_VNNI
// acc[g * out] for the G tokens of u (rows of kp bytes, q + 128, zero beyond `in`) and weight row w.
// The first group also sums the row (a dpbusd by ones, in the same pass) into *rowsum.
template <int G, bool FIRST>
inline void row_times_tokens(const int8_t* w, int64_t in, const uint8_t* u, int64_t kp, int32_t* rowsum,
                             int32_t* acc, int64_t out) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i a[G];
  __m512i s = _mm512_setzero_si512();
  for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_si512();
  for (int64_t k = 0; k < in; k += 64) {
    const __mmask64 m = in - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (in - k)) - 1;
    const __m512i wv = _mm512_maskz_loadu_epi8(m, w + k);
    if (FIRST) s = _mm512_dpbusd_epi32(s, ones, wv);
    for (int g = 0; g < G; ++g) a[g] = _mm512_dpbusd_epi32(a[g], _mm512_loadu_si512(u + g * kp + k), wv);
  }
  if (FIRST) *rowsum = _mm512_reduce_add_epi32(s);
  for (int g = 0; g < G; ++g) acc[g * out] = _mm512_reduce_add_epi32(a[g]) - 128 * *rowsum;
}

template <bool FIRST>
inline void row_times_group(int64_t group, const int8_t* w, int64_t in, const uint8_t* u, int64_t kp,
                            int32_t* rowsum, int32_t* acc, int64_t out) {
  switch (group) {
    case 4: row_times_tokens<4, FIRST>(w, in, u, kp, rowsum, acc, out); break;
    case 3: row_times_tokens<3, FIRST>(w, in, u, kp, rowsum, acc, out); break;
    case 2: row_times_tokens<2, FIRST>(w, in, u, kp, rowsum, acc, out); break;
    default: row_times_tokens<1, FIRST>(w, in, u, kp, rowsum, acc, out); break;
  }
}

// acc (N, out) int32 of q (N, in) int8 and weight (out, in) int8, for a few tokens N.
void small_m_int_mm(const int8_t* q, int64_t N, int64_t in, const int8_t* weight, int64_t out, int32_t* acc) {
  const int64_t kp = (in + 63) / 64 * 64;
  std::vector<uint8_t> u(N * kp, 128);  // q + 128; the padding is never paired with a weight
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < in; ++k) u[n * kp + k] = static_cast<uint8_t>(q[n * in + k] + 128);
  at::parallel_for(0, out, std::max<int64_t>(1, 32768 / kp), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const int8_t* w = weight + i * in;
      int32_t rowsum = 0;
      for (int64_t n = 0; n < N; n += 4) {
        const int64_t group = std::min<int64_t>(4, N - n);
        if (n == 0) {
          row_times_group<true>(group, w, in, u.data(), kp, &rowsum, acc + i, out);
        } else {
          row_times_group<false>(group, w, in, u.data() + n * kp, kp, &rowsum, acc + n * out + i, out);
        }
      }
    }
  });
}
#endif

at::Tensor int8_linear_impl(const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& scale_,
                            const std::optional<at::Tensor>& bias_) {
  check_args(x_, weight_, scale_, bias_);
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), scale = scale_.contiguous();
  const bool has_bias = bias_.has_value() && bias_->defined();
  const at::Tensor bias = has_bias ? bias_->contiguous() : at::Tensor();
  const int64_t N = x.size(0), in = x.size(1), out = weight.size(0);
  at::Tensor y = at::empty({N, out}, x.options());
  if (N == 0 || out == 0) return y;

  without_gil([&] {
    at::Tensor q = at::empty({N, in}, x.options().dtype(at::kChar));
    std::vector<float> sx(N);
    const float* xp = x.const_data_ptr<float>();
    int8_t* qp = q.mutable_data_ptr<int8_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(in, 1)), [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        sx[n] = token_scale(xp + n * in, in);
        quantize_span(xp + n * in, in, sx[n], qp + n * in);
      }
    });
    at::Tensor acc;
#ifdef CCLI_INT8_VNNI
    if (N <= g_small_m.load(std::memory_order_relaxed) && in <= kSmallMaxIn) {
      acc = at::empty({N, out}, x.options().dtype(at::kInt));
      small_m_int_mm(qp, N, in, weight.const_data_ptr<int8_t>(), out, acc.mutable_data_ptr<int32_t>());
    }
#endif
    if (!acc.defined()) {
      // _int_mm returns wrong sums for an inner dimension of 1 (torch 2.13 on x86, either weight layout):
      // that product is an outer product, computed as one.
      acc = in > 1 ? at::_int_mm(q, weight.t()) : q.to(at::kInt).mul(weight.to(at::kInt).t()).contiguous();
    }
    const int32_t* ap = acc.const_data_ptr<int32_t>();
    const float* sp = scale.const_data_ptr<float>();
    const float* bp = has_bias ? bias.const_data_ptr<float>() : nullptr;
    float* yp = y.mutable_data_ptr<float>();
    const int64_t astride = acc.stride(0);
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / out), [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        const int32_t* arow = ap + n * astride;
        float* yrow = yp + n * out;
        const float s = sx[n];
        // the reference's order: (acc * sx) * scale, then + bias
        if (bp != nullptr) {
          for (int64_t i = 0; i < out; ++i) yrow[i] = static_cast<float>(arow[i]) * s * sp[i] + bp[i];
        } else {
          for (int64_t i = 0; i < out; ++i) yrow[i] = static_cast<float>(arow[i]) * s * sp[i];
        }
      }
    });
  });
  return y;
}

// --- the CPU kernel of the ccli::int8_linear op ---------------------------------------------------------
// Registered with the dispatcher when this extension loads (glue: ccli_op.h). When the Python side
// selects anything but this kernel, or for inputs it does not handle, calls go to its Python kernel.

bool native_supported(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      const std::optional<at::Tensor>& bias) {
  if (!x.device().is_cpu() || x.scalar_type() != at::kFloat || x.dim() != 2) return false;
  if (!weight.device().is_cpu() || weight.scalar_type() != at::kChar) return false;
  if (!scale.device().is_cpu() || scale.scalar_type() != at::kFloat) return false;
  if (bias.has_value() && bias->defined() && (!bias->device().is_cpu() || bias->scalar_type() != at::kFloat)) return false;
  return true;
}

at::Tensor int8_cpu_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                           const std::optional<at::Tensor>& bias) {
  if (ccli_op::native_enabled() && native_supported(x, weight, scale, bias)) {
    return int8_linear_impl(x, weight, scale, bias);
  }
  return ccli_op::call_fallback("ccli::int8_linear", x, weight, scale, bias);
}

// How many tokens at most take the small-token kernel (tests set 0 to force _int_mm, or a large value).
void set_small_m(int64_t tokens) { g_small_m.store(tokens, std::memory_order_relaxed); }
int64_t small_m() {
#ifdef CCLI_INT8_VNNI
  return g_small_m.load(std::memory_order_relaxed);
#else
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(ccli, CPU, m) {
  m.impl("int8_linear", &int8_cpu_kernel);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ccli native CPU kernel for int8 (W8A8) linear layers";
  m.def("int8_linear", &int8_linear_impl, "int8 linear (float32 x, int8 weights, CPU); no dispatcher",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("scale"), pybind11::arg("bias"));
  ccli_op::def_dispatch(m);
  m.def("set_small_m", &set_small_m, pybind11::arg("tokens"), "tokens at most for the small-token kernel (tests)");
  m.def("small_m", &small_m, "tokens at most for the small-token kernel (0: this build has none)");
  m.attr("default_small_m") = kSmallM;
#if defined(CCLI_INT8_VNNI)
  m.attr("simd") = "avx512-vnni";
#elif defined(CCLI_QUANT_AVX2)
  m.attr("simd") = "avx2";
#else
  m.attr("simd") = "scalar";
#endif
}
