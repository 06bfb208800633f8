// Native CPU kernel for int8 linear layers (W8A8): the ccli::int8_linear op.
//
// Contract (see ccli/kernels/int8.py): weight int8 (out, in), per output channel scale float32 (out),
// bias float32 (out) or none. Per token q = clamp(round_half_even(x / sx), -127, 127) with
// sx = max(max|x| / 127, 1e-8) (ccli_quant.h, bit-identical to the PyTorch reference);
// acc[n, i] = sum_j q[n, j] * weight[i, j], exact in int32; y[n, i] = acc * sx[n] * scale[i] + bias[i].
//
// The integer product is torch's own `_int_mm` (oneDNN on x86: AMX or VNNI int8 instructions where the
// CPU has them), on the weight's transposed view, so no private weight copy is kept. What this file
// adds is the fusion around it: quantising the activations and the float epilogue are one pass each over
// the data, instead of the eight or so PyTorch ops (absmax, divide, round, clamp, cast, three products)
// whose per-call overhead dominates a small layer at a few tokens.

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
#endif

#include <algorithm>
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
    // _int_mm returns wrong sums for an inner dimension of 1 (torch 2.13 on x86, either weight layout):
    // that product is an outer product, computed as one.
    const at::Tensor acc = in > 1 ? at::_int_mm(q, weight.t()) : q.to(at::kInt).mul(weight.to(at::kInt).t()).contiguous();
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

}  // namespace

TORCH_LIBRARY_IMPL(ccli, CPU, m) {
  m.impl("int8_linear", &int8_cpu_kernel);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ccli native CPU kernel for int8 (W8A8) linear layers";
  m.def("int8_linear", &int8_linear_impl, "int8 linear (float32 x, int8 weights, CPU); no dispatcher",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("scale"), pybind11::arg("bias"));
  ccli_op::def_dispatch(m);
#if defined(CCLI_QUANT_AVX2)
  m.attr("simd") = "avx2";
#else
  m.attr("simd") = "scalar";
#endif
}
