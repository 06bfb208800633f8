// Native CPU kernel for mixtures of experts: grouped expert computation (the ccli::moe op).
//
// Contract (see ccli/kernels/moe.py): E experts of W neurons over hidden size H. Expert e's input
// weights are w_in[e] (H x W: column r is neuron e*W + r's input row; w_gate likewise), its biases
// b_in[e*W ...], its output vectors rows e*W ... e*W + W - 1 of w_out (E*W x H). The (token, expert)
// pairs to run come grouped by expert: expert e's tokens are tokens[offsets[e] .. offsets[e+1]). Per
// pair: h_r = act(x.w_in[e][:, r] + b_in[e*W + r]) (gated: act(x.w_gate[e][:, r]) * (...)),
// y[token] += gate * sum_r h_r w_out[e*W + r]; y starts as b_out.
//
// Only the pairs given are computed: at one token, only the chosen experts' rows are read.
//  - Each expert runs on its own tokens eight at a time (then 4, 3, 2 or 1 for the rest), register-
//    blocked as outer products: the tokens x a block of up to 48 neurons on the input side (the
//    H x W layout: no horizontal sums), the tokens x 32 to 128 output columns on the output side;
//    every weight is loaded once per block of tokens. Activations run in vector registers too.
//  - Threads (OpenMP, the libgomp torch uses, so torch.set_num_threads applies): with many tokens,
//    each thread owns a range of output rows and runs every expert on its tokens in that range (tokens
//    ascending within each expert, as ccli.kernels.moe.group_by_expert makes them: a binary search per
//    expert finds them; no two threads write the same row). With few tokens (the latency case) the
//    work items are (expert, block of its tokens), shared out statically (the same split on every
//    call, so results are reproducible bit for bit), each thread adding into a private output buffer;
//    the buffers are summed at the end, in thread order.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ccli_cpu.h"
#include "ccli_op.h"

namespace {

using namespace ccli_cpu;


// Activations, written once for a lane type V: one float, or (GCC/Clang) a vector of 8 or 16 floats,
// so that the loops over neurons run in vector registers and their tails on single floats. exp by
// range reduction and a polynomial (Cephes expf, ~1e-7 relative), erf by Abramowitz & Stegun 7.1.26
// (|error| < 1.5e-7). A scalar std::erf per neuron costs as much as the neuron's multiply-accumulates
// at these widths (the loop did not vectorise by itself: ~40% of a layer at 128 tokens).
inline int32_t to_int(float x) { return static_cast<int32_t>(x); }  // truncation, like the vector ones
inline float to_float(int32_t x) { return static_cast<float>(x); }
#ifdef CCLI_VECTOR_EXT
inline v8i to_int(v8f x) { return __builtin_convertvector(x, v8i); }
inline v16i to_int(v16f x) { return __builtin_convertvector(x, v16i); }
inline v8f to_float(v8i x) { return __builtin_convertvector(x, v8f); }
inline v16f to_float(v16i x) { return __builtin_convertvector(x, v16f); }
#endif

template <typename V>
inline V exp_approx(V x) {
  x = x < -87.3f ? V{} - 87.3f : x;
  x = x > 88.3f ? V{} + 88.3f : x;
  const V t = x * 1.44269504088896341f + 0.5f;
  V fx = to_float(to_int(t));  // truncation, then floor:
  fx = fx > t ? fx - 1.0f : fx;
  x -= fx * 0.693359375f;
  x -= fx * -2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  const auto bits = (to_int(fx) + 127) << 23;  // 2^fx, fx in [-126, 128]
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

template <Act A, typename V>
inline V act(V z) {
  if constexpr (A == Act::Gelu) {  // 0.5 z (1 + erf(z / sqrt 2))
    const V u = z * 0.70710678118654752440f;
    const V au = u < 0.0f ? -u : u;
    const V t = 1.0f / (1.0f + 0.3275911f * au);
    V poly = V{} + 1.061405429f;
    poly = poly * t - 1.453152027f;
    poly = poly * t + 1.421413741f;
    poly = poly * t - 0.284496736f;
    poly = poly * t + 0.254829592f;
    const V r = 1.0f - poly * t * exp_approx(-au * au);
    return 0.5f * z * (1.0f + (u < 0.0f ? -r : r));
  } else if constexpr (A == Act::GeluTanh) {  // 0.5 z (1 + tanh(u)) = z / (1 + exp(-2u))
    const V u = 0.79788456080286535588f * (z + 0.044715f * z * z * z);
    return z / (1.0f + exp_approx(-2.0f * u));
  } else if constexpr (A == Act::Relu) {
    return z > 0.0f ? z : V{};
  } else {
    return z / (1.0f + exp_approx(-z));
  }
}

// h[i] = act(z[i] + b[i]) (b may be null), or act(g[i]) * (z[i] + b[i]) when g (gate pre-activations)
// is given, times `scale`, for i in [i, n) in lanes of V while whole ones fit; returns where it stopped.
template <Act A, typename V>
inline int64_t neurons_from(float* __restrict z, const float* __restrict b, const float* __restrict g, float scale,
                            int64_t i, int64_t n) {
  constexpr int64_t width = sizeof(V) / sizeof(float);
  for (; i + width <= n; i += width) {
    V pre = loadu<V>(z + i);
    if (b != nullptr) pre += loadu<V>(b + i);
    storeu(z + i, scale * (g == nullptr ? act<A>(pre) : act<A>(loadu<V>(g + i)) * pre));
  }
  return i;
}

// The same over all n values: 16, then 8 at a time in vector registers, the rest one by one.
template <Act A>
inline void neurons(float* __restrict z, const float* __restrict b, const float* __restrict g, float scale,
                    int64_t n) {
  int64_t i = 0;
#ifdef CCLI_VECTOR_EXT
  i = neurons_from<A, v16f>(z, b, g, scale, i, n);
  i = neurons_from<A, v8f>(z, b, g, scale, i, n);
#endif
  neurons_from<A, float>(z, b, g, scale, i, n);
}

// ---- the problem -------------------------------------------------------------------------------------

constexpr int kMaxTokens = 8;                // tokens per register block
constexpr int64_t kScratch = 2 * kMaxTokens;  // scratch floats per expert neuron: z and the gate's z

struct Problem {
  const float* x;
  const int64_t* tokens;
  const int64_t* offsets;
  const float* w_in;
  const float* b_in;    // or nullptr
  const float* w_gate;  // or nullptr (not gated)
  const float* w_out;
  const float* gates;  // per pair, or nullptr (1)
  const float* b_out;  // or nullptr
  float* y;
  int64_t N, H, E, W;
};

// ---- register-blocked micro-kernels ----------------------------------------------------------------
// T tokens at a time (up to kMaxTokens; an expert's last tokens are blocked too, which matters when
// experts get a few tokens each), accumulators for T tokens x a block of columns in registers: each weight row is
// loaded once for the T tokens, and there are enough independent accumulators to keep the FMA units
// busy (fewer than 8 chains would wait on the FMA latency, so small blocks split the reduction in
// two). Columns go 16 at a time (a 512-bit register where the CPU has them; the compiler splits the
// vector type in two where it does not) plus one block of 8, so that widths such as 24 fill registers.

#ifdef CCLI_VECTOR_EXT
// z[t * ldz + j] = sum_h xs[t][h] * wT[h * W + j], t < T, j < 16 * N16 + 8 * N8 (wT: the block's
// first column).
template <int T, int N16, int N8>
inline void input_block(const float* const* xs, const float* __restrict wT, int64_t H, int64_t W,
                        float* __restrict z, int64_t ldz) {
  constexpr int U = T * (N16 + N8) < 8 ? 2 : 1;  // independent partial sums per accumulator
  v16f a16[U][T][N16 > 0 ? N16 : 1];
  v8f a8[U][T][N8 > 0 ? N8 : 1];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < T; ++t) {
      for (int v = 0; v < N16; ++v) a16[u][t][v] = v16f{};
      for (int v = 0; v < N8; ++v) a8[u][t][v] = v8f{};
    }
  auto step = [&](int u, int64_t h) {
    const float* w = wT + h * W;
    v16f w16[N16 > 0 ? N16 : 1];
    v8f w8[N8 > 0 ? N8 : 1];
    for (int v = 0; v < N16; ++v) w16[v] = loadu16(w + 16 * v);
    for (int v = 0; v < N8; ++v) w8[v] = loadu8(w + 16 * N16 + 8 * v);
    for (int t = 0; t < T; ++t) {
      const float s = xs[t][h];
      for (int v = 0; v < N16; ++v) a16[u][t][v] += s * w16[v];
      for (int v = 0; v < N8; ++v) a8[u][t][v] += s * w8[v];
    }
  };
  int64_t h = 0;
  for (; h + U <= H; h += U)
    for (int u = 0; u < U; ++u) step(u, h + u);
  for (; h < H; ++h) step(0, h);
  for (int t = 0; t < T; ++t) {
    for (int v = 0; v < N16; ++v) {
      v16f sum = a16[0][t][v];
      for (int u = 1; u < U; ++u) sum += a16[u][t][v];
      storeu16(z + t * ldz + 16 * v, sum);
    }
    for (int v = 0; v < N8; ++v) {
      v8f sum = a8[0][t][v];
      for (int u = 1; u < U; ++u) sum += a8[u][t][v];
      storeu8(z + t * ldz + 16 * N16 + 8 * v, sum);
    }
  }
}

// ys[t][i0 + c] += sum_q z[t * W + q] * w_out[q * H + i0 + c], t < T, c < 16 * NC.
template <int T, int NC>
inline void output_block(float* const* ys, const float* __restrict z, int64_t W, const float* __restrict w_out,
                         int64_t H, int64_t i0) {
  v16f acc[T][NC];
  for (int t = 0; t < T; ++t)
    for (int c = 0; c < NC; ++c) acc[t][c] = v16f{};
  const float* wo = w_out + i0;
  for (int64_t q = 0; q < W; ++q, wo += H) {
    v16f wv[NC];
    for (int c = 0; c < NC; ++c) wv[c] = loadu16(wo + 16 * c);
    for (int t = 0; t < T; ++t) {
      const float s = z[t * W + q];
      for (int c = 0; c < NC; ++c) acc[t][c] += s * wv[c];
    }
  }
  for (int t = 0; t < T; ++t)
    for (int c = 0; c < NC; ++c) storeu16(ys[t] + i0 + 16 * c, loadu16(ys[t] + i0 + 16 * c) + acc[t][c]);
}
#endif

// z[t * W + j] = x_t . (an expert's H x W input block wT)[:, j] for T tokens and every j.
template <int T>
inline void expert_inputs(const float* const* xs, const float* __restrict wT, int64_t H, int64_t W,
                          float* __restrict z) {
  int64_t j0 = 0;
#ifdef CCLI_VECTOR_EXT
  for (; j0 + 48 <= W; j0 += 48) input_block<T, 3, 0>(xs, wT + j0, H, W, z + j0, W);
  switch ((W - j0) / 8) {
    case 5: input_block<T, 2, 1>(xs, wT + j0, H, W, z + j0, W); j0 += 40; break;
    case 4: input_block<T, 2, 0>(xs, wT + j0, H, W, z + j0, W); j0 += 32; break;
    case 3: input_block<T, 1, 1>(xs, wT + j0, H, W, z + j0, W); j0 += 24; break;
    case 2: input_block<T, 1, 0>(xs, wT + j0, H, W, z + j0, W); j0 += 16; break;
    case 1: input_block<T, 0, 1>(xs, wT + j0, H, W, z + j0, W); j0 += 8; break;
    default: break;
  }
#endif
  if (j0 < W) {
    const int64_t n = W - j0;
    for (int t = 0; t < T; ++t) std::fill(z + t * W + j0, z + t * W + W, 0.0f);
    for (int64_t h = 0; h < H; ++h) {
      const float* __restrict w = wT + h * W + j0;
      for (int t = 0; t < T; ++t) axpy(z + t * W + j0, xs[t][h], w, n);
    }
  }
}

// ys[t] += z_t . w_out (W rows of H floats) for T tokens: 8 to 16 accumulators in registers.
template <int T>
inline void expert_outputs(float* const* ys, const float* __restrict z, int64_t W, const float* __restrict w_out,
                           int64_t H) {
  constexpr int NC = T == 1 ? 8 : T == 2 ? 6 : T <= 4 ? 4 : 2;
  int64_t i0 = 0;
#ifdef CCLI_VECTOR_EXT
  for (; i0 + 16 * NC <= H; i0 += 16 * NC) output_block<T, NC>(ys, z, W, w_out, H, i0);
  for (; i0 + 16 <= H; i0 += 16) output_block<T, 1>(ys, z, W, w_out, H, i0);
#endif
  if (i0 < H) {
    const int64_t rest = H - i0;
    for (int64_t q = 0; q < W; ++q) {
      const float* wo = w_out + q * H + i0;
      for (int t = 0; t < T; ++t) axpy(ys[t] + i0, z[t * W + q], wo, rest);
    }
  }
}

// Expert e on T tokens (pairs i .. i+T-1 of the grouped list), adding into rows of `out`.
// scratch: kScratch * W floats.
template <Act A, int T>
void expert_tokens(const Problem& p, int64_t e, int64_t i, float* out, float* __restrict scratch) {
  const int64_t H = p.H, W = p.W, row0 = e * W;
  const float* xs[T];
  float* ys[T];
  float g[T];
  for (int t = 0; t < T; ++t) {
    const int64_t tok = p.tokens[i + t];
    xs[t] = p.x + tok * H;
    ys[t] = out + tok * H;
    g[t] = p.gates != nullptr ? p.gates[i + t] : 1.0f;
  }
  float* z = scratch;
  float* zg = scratch + kMaxTokens * W;
  expert_inputs<T>(xs, p.w_in + e * H * W, H, W, z);
  if (p.w_gate != nullptr) expert_inputs<T>(xs, p.w_gate + e * H * W, H, W, zg);
  const float* bias = p.b_in != nullptr ? p.b_in + row0 : nullptr;
  for (int t = 0; t < T; ++t) neurons<A>(z + t * W, bias, p.w_gate != nullptr ? zg + t * W : nullptr, g[t], W);
  expert_outputs<T>(ys, z, W, p.w_out + row0 * H, H);
}

// Expert e on pairs [begin, end) of the grouped list.
template <Act A>
void expert_pairs(const Problem& p, int64_t e, int64_t begin, int64_t end, float* out, float* scratch) {
  int64_t i = begin;
  for (; i + kMaxTokens <= end; i += kMaxTokens) expert_tokens<A, kMaxTokens>(p, e, i, out, scratch);
  if (i + 4 <= end) {
    expert_tokens<A, 4>(p, e, i, out, scratch);
    i += 4;
  }
  switch (end - i) {
    case 3: expert_tokens<A, 3>(p, e, i, out, scratch); break;
    case 2: expert_tokens<A, 2>(p, e, i, out, scratch); break;
    case 1: expert_tokens<A, 1>(p, e, i, out, scratch); break;
    default: break;
  }
}

template <Act A>
void moe_all(const Problem& p, bool ascending) {
  const int64_t N = p.N, H = p.H, E = p.E;
  for (int64_t n = 0; n < N; ++n) {
    float* y = p.y + n * H;
    if (p.b_out != nullptr) {
      std::copy(p.b_out, p.b_out + H, y);
    } else {
      std::fill(y, y + H, 0.0f);
    }
  }
  const int64_t pairs = p.offsets[E];
  const int nthreads = at::get_num_threads();
  if (pairs == 0) return;
  if (nthreads <= 1 || pairs == 1) {
    std::vector<float> scratch(kScratch * p.W);
    for (int64_t e = 0; e < E; ++e) expert_pairs<A>(p, e, p.offsets[e], p.offsets[e + 1], p.y, scratch.data());
    return;
  }
  if (ascending && N >= 8 * int64_t(nthreads)) {
    // Each thread owns the output rows [lo, hi) and runs every expert on its tokens there.
#pragma omp parallel num_threads(nthreads)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      const int64_t lo = N * t / T, hi = N * (t + 1) / T;
      std::vector<float> scratch(kScratch * p.W);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t* first = p.tokens + p.offsets[e];
        const int64_t* last = p.tokens + p.offsets[e + 1];
        const int64_t b = std::lower_bound(first, last, lo) - p.tokens;
        const int64_t f = std::lower_bound(first, last, hi) - p.tokens;
        if (f > b) expert_pairs<A>(p, e, b, f, p.y, scratch.data());
      }
    }
    return;
  }
  // Few tokens: (expert, block of its tokens) work items, private output buffers summed at the end.
  const int64_t chunk = 16;
  std::vector<int64_t> items;  // (expert, begin, end) triples
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t b = p.offsets[e]; b < p.offsets[e + 1]; b += chunk) {
      items.push_back(e);
      items.push_back(b);
      items.push_back(std::min(b + chunk, p.offsets[e + 1]));
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size()) / 3;
  const int T = static_cast<int>(std::min<int64_t>(nthreads, n_items));
  std::vector<float> partial(size_t(T) * N * H, 0.0f);
#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num();
    float* mine = partial.data() + size_t(t) * N * H;
    std::vector<float> scratch(kScratch * p.W);
    // static: the same items land in the same buffer on every call, so results are bit-reproducible
#pragma omp for schedule(static)
    for (int64_t it = 0; it < n_items; ++it) {
      expert_pairs<A>(p, items[3 * it], items[3 * it + 1], items[3 * it + 2], mine, scratch.data());
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N * H; ++i) {
      float acc = 0.0f;
      for (int q = 0; q < T; ++q) acc += partial[size_t(q) * N * H + i];
      p.y[i] += acc;
    }
  }
}


bool supported(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& offsets, const at::Tensor& w_in,
               const std::optional<at::Tensor>& b_in, const at::Tensor& w_out,
               const std::optional<at::Tensor>& w_gate, const std::optional<at::Tensor>& gates,
               const std::optional<at::Tensor>& b_out) {
  return is_float_cpu(x) && is_float_cpu(w_in) && is_float_cpu(w_out) && is_float_cpu(b_in) && is_float_cpu(w_gate) &&
         is_float_cpu(gates) && is_float_cpu(b_out) && tokens.device().is_cpu() && offsets.device().is_cpu();
}

at::Tensor moe_forward_impl(const at::Tensor& x_, const at::Tensor& tokens_, const at::Tensor& offsets_,
                            const at::Tensor& w_in_, const std::optional<at::Tensor>& b_in_, const at::Tensor& w_out_,
                            std::string_view activation, const std::optional<at::Tensor>& w_gate_,
                            const std::optional<at::Tensor>& gates_, const std::optional<at::Tensor>& b_out_) {
  const Act a = parse_act(activation, "moe");
  TORCH_CHECK_VALUE(x_.dim() == 2, "moe: x must be 2-D (N, H), got ", x_.sizes());
  TORCH_CHECK_VALUE(offsets_.dim() == 1 && offsets_.size(0) >= 2, "moe: offsets must be (E+1,) with E >= 1 experts, got ",
                    offsets_.sizes());
  TORCH_CHECK_VALUE(tokens_.dim() == 1, "moe: tokens must be 1-D (pairs,), got ", tokens_.sizes());
  TORCH_CHECK_VALUE(tokens_.scalar_type() == at::kLong && offsets_.scalar_type() == at::kLong,
                    "moe: tokens and offsets must be int64");
  const int64_t N = x_.size(0), H = x_.size(1), E = offsets_.size(0) - 1, pairs = tokens_.size(0);
  TORCH_CHECK_VALUE(w_in_.dim() == 3 && w_in_.size(0) == E && w_in_.size(1) == H && w_in_.size(2) > 0,
                    "moe: w_in must be (E, H, W) = (", E, ", ", H, ", W >= 1) for E=", E, " experts, got ", w_in_.sizes());
  const int64_t W = w_in_.size(2), rows = E * W;
  TORCH_CHECK_VALUE(w_out_.dim() == 2 && w_out_.size(0) == rows && w_out_.size(1) == H, "moe: w_out must be (",
                    rows, ", ", H, "), got ", w_out_.sizes());
  TORCH_CHECK_VALUE(!present(w_gate_) || w_gate_->sizes() == w_in_.sizes(), "moe: w_gate must be ", w_in_.sizes(),
                    " like w_in");
  TORCH_CHECK_VALUE(!present(b_in_) || (b_in_->dim() == 1 && b_in_->size(0) == rows), "moe: b_in must be (", rows,
                    ",)");
  TORCH_CHECK_VALUE(!present(gates_) || (gates_->dim() == 1 && gates_->size(0) == pairs), "moe: gates must be (",
                    pairs, ",) like tokens");
  TORCH_CHECK_VALUE(!present(b_out_) || (b_out_->dim() == 1 && b_out_->size(0) == H), "moe: b_out must be (", H, ",)");
  TORCH_CHECK(supported(x_, tokens_, offsets_, w_in_, b_in_, w_out_, w_gate_, gates_, b_out_),
              "moe native kernel: float32 CPU tensors only");
  const at::Tensor x = x_.contiguous(), tokens = tokens_.contiguous(), offsets = offsets_.contiguous(),
                   w_in = w_in_.contiguous(), w_out = w_out_.contiguous();
  const at::Tensor b_in = present(b_in_) ? b_in_->contiguous() : at::Tensor();
  const at::Tensor w_gate = present(w_gate_) ? w_gate_->contiguous() : at::Tensor();
  const at::Tensor gates = present(gates_) ? gates_->contiguous() : at::Tensor();
  const at::Tensor b_out = present(b_out_) ? b_out_->contiguous() : at::Tensor();
  // The routing, checked against the data: offsets from 0 to the pairs, never decreasing; tokens index x.
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[E] == pairs, "moe: offsets must start at 0, never decrease and end at the ",
                    pairs, " pairs");
  bool ascending = true;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(off[e + 1] >= off[e], "moe: offsets must start at 0, never decrease and end at the ", pairs,
                      " pairs");
    for (int64_t i = off[e]; i < off[e + 1]; ++i) {
      TORCH_CHECK_VALUE(tok[i] >= 0 && tok[i] < N, "moe: tokens must index the ", N, " rows of x");
      if (i > off[e] && tok[i] <= tok[i - 1]) ascending = false;
    }
  }
  at::Tensor y = at::empty({N, H}, x.options());
  if (N == 0 || H == 0) return y;
  const Problem p{x.const_data_ptr<float>(),
                  tok,
                  off,
                  w_in.const_data_ptr<float>(),
                  b_in.defined() ? b_in.const_data_ptr<float>() : nullptr,
                  w_gate.defined() ? w_gate.const_data_ptr<float>() : nullptr,
                  w_out.const_data_ptr<float>(),
                  gates.defined() ? gates.const_data_ptr<float>() : nullptr,
                  b_out.defined() ? b_out.const_data_ptr<float>() : nullptr,
                  y.mutable_data_ptr<float>(),
                  N,
                  H,
                  E,
                  W};
  auto run = [&] {
    switch (a) {
      case Act::Gelu: moe_all<Act::Gelu>(p, ascending); break;
      case Act::GeluTanh: moe_all<Act::GeluTanh>(p, ascending); break;
      case Act::Relu: moe_all<Act::Relu>(p, ascending); break;
      case Act::Silu: moe_all<Act::Silu>(p, ascending); break;
    }
  };
  ccli_op::without_gil(run);
  return y;
}

// --- the CPU kernel of the ccli::moe op -----------------------------------------------------------
// Registered with the dispatcher when this extension loads (glue: ccli_op.h). When the Python side
// selects anything but this kernel, or for other dtypes, calls go to its Python kernel.

at::Tensor moe_cpu_kernel(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& offsets,
                          const at::Tensor& w_in, const std::optional<at::Tensor>& b_in, const at::Tensor& w_out,
                          c10::string_view activation, const std::optional<at::Tensor>& w_gate,
                          const std::optional<at::Tensor>& gates, const std::optional<at::Tensor>& b_out) {
  if (ccli_op::native_enabled() && supported(x, tokens, offsets, w_in, b_in, w_out, w_gate, gates, b_out)) {
    return moe_forward_impl(x, tokens, offsets, w_in, b_in, w_out,
                            std::string_view(activation.data(), activation.size()), w_gate, gates, b_out);
  }
  return ccli_op::call_fallback("ccli::moe", x, tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates, b_out);
}

at::Tensor moe_forward(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& offsets, const at::Tensor& w_in,
                       const std::optional<at::Tensor>& b_in, const at::Tensor& w_out, const std::string& activation,
                       const std::optional<at::Tensor>& w_gate, const std::optional<at::Tensor>& gates,
                       const std::optional<at::Tensor>& b_out) {
  return moe_forward_impl(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates, b_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(ccli, CPU, m) {
  m.impl("moe", &moe_cpu_kernel);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ccli native CPU kernel for mixtures of experts (grouped expert computation)";
  m.def("moe_forward", &moe_forward, "MoE grouped experts (float32, CPU); no dispatcher", pybind11::arg("x"),
        pybind11::arg("tokens"), pybind11::arg("offsets"), pybind11::arg("w_in"), pybind11::arg("b_in"),
        pybind11::arg("w_out"), pybind11::arg("activation"), pybind11::arg("w_gate") = pybind11::none(),
        pybind11::arg("gates") = pybind11::none(), pybind11::arg("b_out") = pybind11::none());
  ccli_op::def_dispatch(m);
}
