// Native CPU kernel for fast feedforward (FFF) trees: conditional matrix multiplication.
//
// Contract (see ccli/kernels/fff.py): K trees of depth D and leaf width W over hidden size H.
// Per tree M = (2^D - 1) + 2^D * W neuron rows; tree k owns rows k*M ... k*M + M - 1 of w_in, b_in,
// w_out (w_out row r is the output vector of neuron r). A token walks D internal nodes (routing
// z >= 0 to the right child), then evaluates the W neurons of the leaf it reached; the last
// W - activated of them (`leaf_linear`) are linear: their pre-activation is used as is. Gated trees
// (w_up given, LLaMA-family FFNs) multiply every neuron's act(z) by x.w_up[row]; they have no linear
// leaf neurons. Wherever a w_in row is read for a token, the same w_up row is read next to it.
//
// Parallel over tokens with OpenMP (the same libgomp torch uses, so torch.set_num_threads applies);
// the dot/axpy loops over H are written for the vectoriser (omp simd).
//  - Routing: tokens go in blocks of four whose dot products/axpys are interleaved, so four
//    independent weight rows stream from memory at once (deep trees are memory-latency bound).
//  - Leaves: narrow leaves (W < 8, or few tokens per leaf) are evaluated per token right after
//    routing. Wide leaves shared by several tokens are evaluated in a second phase: per tree, tokens
//    are counting-sorted by leaf, and four tokens of a leaf at a time read each weight row once
//    (register-blocked 4 tokens x 2 rows dots, 4 tokens x 16 columns output accumulation).

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
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


template <Act A>
inline float act(float z) {
  if constexpr (A == Act::Gelu) {
    return 0.5f * z * (1.0f + std::erf(z * 0.70710678118654752440f));
  } else if constexpr (A == Act::GeluTanh) {
    const float u = 0.79788456080286535588f * (z + 0.044715f * z * z * z);
    return 0.5f * z * (1.0f + std::tanh(u));
  } else if constexpr (A == Act::Relu) {
    return z > 0.0f ? z : 0.0f;
  } else {
    return z / (1.0f + std::exp(-z));
  }
}

// ---- vector primitives (plain loops for the vectoriser) -------------------------------------------

// One x against four rows (the leaf rows of one token).
inline void dot_rows4(const float* __restrict x, const float* __restrict w0, const float* __restrict w1,
                      const float* __restrict w2, const float* __restrict w3, int64_t n, float* out) {
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    a0 += xi * w0[i];
    a1 += xi * w1[i];
    a2 += xi * w2[i];
    a3 += xi * w3[i];
  }
  out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

// Four tokens, each with its own row: four independent memory streams in flight (routing).
inline void dot_pairs4(const float* const* x, const float* const* w, int64_t n, float* out) {
  const float* __restrict x0 = x[0];
  const float* __restrict x1 = x[1];
  const float* __restrict x2 = x[2];
  const float* __restrict x3 = x[3];
  const float* __restrict w0 = w[0];
  const float* __restrict w1 = w[1];
  const float* __restrict w2 = w[2];
  const float* __restrict w3 = w[3];
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < n; ++i) {
    a0 += x0[i] * w0[i];
    a1 += x1[i] * w1[i];
    a2 += x2[i] * w2[i];
    a3 += x3[i] * w3[i];
  }
  out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

inline void axpy_pairs4(float* const* y, const float* a, const float* const* w, int64_t n) {
  float* __restrict y0 = y[0];
  float* __restrict y1 = y[1];
  float* __restrict y2 = y[2];
  float* __restrict y3 = y[3];
  const float* __restrict w0 = w[0];
  const float* __restrict w1 = w[1];
  const float* __restrict w2 = w[2];
  const float* __restrict w3 = w[3];
  const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y0[i] += a0 * w0[i];
    y1[i] += a1 * w1[i];
    y2[i] += a2 * w2[i];
    y3[i] += a3 * w3[i];
  }
}

// Four tokens against two rows (a leaf shared by the tokens): 6 loads per 8 multiply-adds.
inline void dot_tokens4_rows2(const float* const* x, const float* __restrict w0,
                              const float* __restrict w1, int64_t n, float* out) {
  const float* __restrict x0 = x[0];
  const float* __restrict x1 = x[1];
  const float* __restrict x2 = x[2];
  const float* __restrict x3 = x[3];
  float a00 = 0.0f, a10 = 0.0f, a20 = 0.0f, a30 = 0.0f, a01 = 0.0f, a11 = 0.0f, a21 = 0.0f, a31 = 0.0f;
#pragma omp simd reduction(+ : a00, a10, a20, a30, a01, a11, a21, a31)
  for (int64_t i = 0; i < n; ++i) {
    const float u = w0[i], v = w1[i];
    a00 += x0[i] * u, a01 += x0[i] * v;
    a10 += x1[i] * u, a11 += x1[i] * v;
    a20 += x2[i] * u, a21 += x2[i] * v;
    a30 += x3[i] * u, a31 += x3[i] * v;
  }
  out[0] = a00, out[1] = a01, out[2] = a10, out[3] = a11;
  out[4] = a20, out[5] = a21, out[6] = a30, out[7] = a31;
}


// Ask for n floats from p to be brought into cache (one request per 64-byte line). Routing reads one
// row per level whose address depends on the previous level's result; inside a model, with other
// layers' weights evicting these, every level would otherwise wait for memory in turn.
inline void prefetch_floats(const float* p, int64_t n) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 3);
#else
  (void)p, (void)n;
#endif
}

// ---- the problem -------------------------------------------------------------------------------------

struct Problem {
  const float* x;
  const float* w_in;
  const float* b_in;
  const float* w_out;
  const float* w_up;   // gated trees: the up rows (like w_in), or nullptr
  const float* b_out;  // output bias (H) that starts every y row, or nullptr for none
  float* y;
  int64_t N, H, trees, depth, W;
  int64_t I;  // internal nodes per tree
  int64_t M;  // rows per tree
  int64_t activated;  // leaf neurons 0 .. activated-1 take the activation, activated .. W-1 are linear
};

// The up factor of neuron `row` for the token x: x.w_up[row] in gated trees, else 1.
inline float up(const Problem& p, const float* __restrict x, int64_t row) {
  return p.w_up != nullptr ? dot(x, p.w_up + row * p.H, p.H) : 1.0f;
}

// The activation of leaf neuron q (its index inside the leaf).
template <Act A>
inline float leaf_act(const Problem& p, float z, int64_t q) {
  return q < p.activated ? act<A>(z) : z;
}

// `W` consecutive leaf neurons of one token: leaf neurons first ... first+W-1, whose rows start at row0.
template <Act A>
void leaf_rows(const Problem& p, const float* __restrict x, float* __restrict y, int64_t row0, int64_t first,
               int64_t W) {
  const int64_t H = p.H;
  int64_t j = 0;
  for (; j + 4 <= W; j += 4) {
    const int64_t r = row0 + j;
    float a[4];
    const float* wi = p.w_in + r * H;
    dot_rows4(x, wi, wi + H, wi + 2 * H, wi + 3 * H, H, a);
    for (int q = 0; q < 4; ++q) a[q] = leaf_act<A>(p, a[q] + p.b_in[r + q], first + j + q);
    if (p.w_up != nullptr) {
      float u[4];
      const float* wu = p.w_up + r * H;
      dot_rows4(x, wu, wu + H, wu + 2 * H, wu + 3 * H, H, u);
      for (int q = 0; q < 4; ++q) a[q] *= u[q];
    }
    const float* wo = p.w_out + r * H;
    axpy_rows4(y, a, wo, wo + H, wo + 2 * H, wo + 3 * H, H);
  }
  for (; j < W; ++j) {
    const int64_t r = row0 + j;
    const float z = dot(x, p.w_in + r * H, H) + p.b_in[r];
    axpy(y, leaf_act<A>(p, z, first + j) * up(p, x, r), p.w_out + r * H, H);
  }
}

// The W leaf neurons of one token, leaf rows starting at row0.
template <Act A>
void leaf_token(const Problem& p, const float* __restrict x, float* __restrict y, int64_t row0) {
  leaf_rows<A>(p, x, y, row0, 0, p.W);
}

// An output row starts as the output bias (or zeros); every visited neuron then adds to it.
inline void start_row(const Problem& p, float* __restrict y) {
  if (p.b_out != nullptr) {
    std::copy(p.b_out, p.b_out + p.H, y);
  } else {
    std::fill(y, y + p.H, 0.0f);
  }
}

// Routing phase for one token over all trees. With W == 1 the leaf is one more row (row = base +
// node), handled as a last level; otherwise the leaf is evaluated here unless leaf_out is given,
// in which case the leaf index of tree k is stored in leaf_out[k] for the grouped leaf phase.
template <Act A>
void route_token(const Problem& p, int64_t n, int32_t* leaf_out) {
  const int64_t H = p.H;
  const float* __restrict x = p.x + n * H;
  float* __restrict y = p.y + n * H;
  start_row(p, y);
  const bool leaf_as_level = p.W == 1 && p.activated == 1 && leaf_out == nullptr;
  for (int64_t k = 0; k < p.trees; ++k) {
    const int64_t base = k * p.M;
    int64_t node = 0;
    const int64_t levels = p.depth + (leaf_as_level ? 1 : 0);
    for (int64_t d = 0; d < levels; ++d) {
      const int64_t row = base + node;
      prefetch_floats(p.w_out + row * H, H);
      if (p.w_up != nullptr) prefetch_floats(p.w_up + row * H, H);
      // both children are adjacent rows (2n+1, 2n+2): fetch them while this level computes
      if (d + 1 < levels) prefetch_floats(p.w_in + (base + 2 * node + 1) * H, 2 * H);
      const float z = dot(x, p.w_in + row * H, H) + p.b_in[row];
      axpy(y, act<A>(z) * up(p, x, row), p.w_out + row * H, H);
      node = 2 * node + 1 + (z >= 0.0f ? 1 : 0);
    }
    if (leaf_as_level) continue;
    if (leaf_out != nullptr) {
      leaf_out[k] = static_cast<int32_t>(node - p.I);
    } else {
      leaf_token<A>(p, x, y, base + p.I + (node - p.I) * p.W);
    }
  }
}

// Routing phase for four consecutive tokens n0..n0+3 (same semantics as route_token).
template <Act A>
void route_tokens4(const Problem& p, int64_t n0, int32_t* leaf_out) {
  const int64_t H = p.H;
  const float* xs[4];
  float* ys[4];
  for (int t = 0; t < 4; ++t) {
    xs[t] = p.x + (n0 + t) * H;
    ys[t] = p.y + (n0 + t) * H;
    start_row(p, ys[t]);
  }
  const bool leaf_as_level = p.W == 1 && p.activated == 1 && leaf_out == nullptr;
  for (int64_t k = 0; k < p.trees; ++k) {
    const int64_t base = k * p.M;
    int64_t node[4] = {0, 0, 0, 0};
    const int64_t levels = p.depth + (leaf_as_level ? 1 : 0);
    for (int64_t d = 0; d < levels; ++d) {
      const float* wi[4];
      const float* wo[4];
      int64_t row[4];
      for (int t = 0; t < 4; ++t) {
        row[t] = base + node[t];
        wi[t] = p.w_in + row[t] * H;
        wo[t] = p.w_out + row[t] * H;
        prefetch_floats(wo[t], H);
        if (p.w_up != nullptr) prefetch_floats(p.w_up + row[t] * H, H);
        if (d + 1 < levels) prefetch_floats(p.w_in + (base + 2 * node[t] + 1) * H, 2 * H);
      }
      float z[4], a[4];
      dot_pairs4(xs, wi, H, z);
      for (int t = 0; t < 4; ++t) {
        z[t] += p.b_in[row[t]];
        a[t] = act<A>(z[t]);
        node[t] = 2 * node[t] + 1 + (z[t] >= 0.0f ? 1 : 0);
      }
      if (p.w_up != nullptr) {
        const float* wu[4];
        float u[4];
        for (int t = 0; t < 4; ++t) wu[t] = p.w_up + row[t] * H;
        dot_pairs4(xs, wu, H, u);
        for (int t = 0; t < 4; ++t) a[t] *= u[t];
      }
      axpy_pairs4(ys, a, wo, H);
    }
    if (leaf_as_level) continue;
    for (int t = 0; t < 4; ++t) {
      if (leaf_out != nullptr) {
        leaf_out[t * p.trees + k] = static_cast<int32_t>(node[t] - p.I);
      } else {
        leaf_token<A>(p, xs[t], ys[t], base + p.I + (node[t] - p.I) * p.W);
      }
    }
  }
}

// z[t*W + r] = x_t . w[r] for four tokens and W rows of H floats: each row is read once for the four.
inline void dots_tokens4(const float* const* xs, const float* w, int64_t W, int64_t H, float* __restrict z) {
  int64_t r = 0;
  for (; r + 2 <= W; r += 2) {
    float o[8];
    const float* wr = w + r * H;
    dot_tokens4_rows2(xs, wr, wr + H, H, o);
    for (int t = 0; t < 4; ++t) {
      z[t * W + r] = o[2 * t];
      z[t * W + r + 1] = o[2 * t + 1];
    }
  }
  for (; r < W; ++r) {
    for (int t = 0; t < 4; ++t) z[t * W + r] = dot(xs[t], w + r * H, H);
  }
}

// Leaf phase for four tokens that reached the same leaf (rows row0 ... row0+W-1): every weight row
// is loaded once for the four tokens. z holds 8*W floats of scratch (the second half for w_up).
template <Act A>
void leaf_tokens4(const Problem& p, const int32_t* tok, int64_t row0, float* __restrict z) {
  const int64_t H = p.H, W = p.W;
  const float* xs[4];
  float* ys[4];
  for (int t = 0; t < 4; ++t) {
    xs[t] = p.x + int64_t(tok[t]) * H;
    ys[t] = p.y + int64_t(tok[t]) * H;
  }
  dots_tokens4(xs, p.w_in + row0 * H, W, H, z);  // then z[t*W + q] = act(z + b) (times x_t . w_up)
  for (int t = 0; t < 4; ++t) {
    for (int64_t q = 0; q < W; ++q) z[t * W + q] = leaf_act<A>(p, z[t * W + q] + p.b_in[row0 + q], q);
  }
  if (p.w_up != nullptr) {
    float* __restrict u = z + 4 * W;
    dots_tokens4(xs, p.w_up + row0 * H, W, H, u);
    for (int64_t i = 0; i < 4 * W; ++i) z[i] *= u[i];
  }
  add_rows_tokens4(ys, z, W, p.w_out + row0 * H, H);
}


// A leaf reached by many tokens, as two matrix products (ATen's BLAS, which uses all threads itself):
// Z = act(X_leaf W_in_leaf^T + b), y_leaf += Z W_out_leaf. The leaf's weights are read once per
// block of tokens instead of once per four tokens, which is what makes wide leaves fast at many tokens.
template <Act A>
void leaf_gemm(const Problem& p, const int32_t* tokens, int64_t count, int64_t row0) {
  c10::InferenceMode no_autograd;  // temporaries only; the op itself is inference-only
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto view = [&](const float* data, at::IntArrayRef sizes) {  // read-only ATen view of our buffers
    return at::from_blob(const_cast<float*>(data), sizes, f32);
  };
  std::vector<int64_t> ids(tokens, tokens + count);
  const at::Tensor index = at::from_blob(ids.data(), {count}, at::TensorOptions().dtype(at::kLong));
  const at::Tensor xs = at::index_select(view(p.x, {p.N, p.H}), 0, index);
  at::Tensor z = at::addmm(view(p.b_in + row0, {p.W}), xs, view(p.w_in + row0 * p.H, {p.W, p.H}).t());
  // ATen's vectorised activations (the same functions as act<A>, which is scalar), on the activated
  // neurons only: the linear ones keep z.
  at::Tensor activated = p.activated < p.W ? z.narrow(1, 0, p.activated) : z;
  if (p.activated == 0) {
  } else if constexpr (A == Act::Gelu) {
    at::gelu_(activated);
  } else if constexpr (A == Act::GeluTanh) {
    at::gelu_(activated, "tanh");
  } else if constexpr (A == Act::Relu) {
    at::relu_(activated);
  } else {
    at::silu_(activated);
  }
  if (p.w_up != nullptr) z.mul_(at::mm(xs, view(p.w_up + row0 * p.H, {p.W, p.H}).t()));
  const at::Tensor out = at::mm(z, view(p.w_out + row0 * p.H, {p.W, p.H}));
  const float* op = out.const_data_ptr<float>();
  for (int64_t i = 0; i < count; ++i) {
    float* __restrict yr = p.y + ids[i] * p.H;
    const float* __restrict orow = op + i * p.H;
#pragma omp simd
    for (int64_t h = 0; h < p.H; ++h) yr[h] += orow[h];
  }
}

// Tokens per leaf from which a wide leaf is computed as matrix products (leaf_gemm).
constexpr int64_t kGemmMinTokens = 16;
constexpr int64_t kGemmMinWidth = 32;

template <Act A>
void fff_all(const Problem& p) {
  const int64_t N = p.N, K = p.trees, L = p.I + 1;
  const int nthreads = at::get_num_threads();
  // Few tokens with wide leaves (latency case): route serially, then split each leaf's rows across
  // threads, each accumulating into its own buffer.
  if (N < nthreads && p.W >= 32 && p.W * p.H >= 8192) {
    std::vector<int32_t> leaf_of(N * K);
    for (int64_t n = 0; n < N; ++n) route_token<A>(p, n, leaf_of.data() + n * K);
    std::vector<float> partial(size_t(nthreads) * N * p.H, 0.0f);
#pragma omp parallel num_threads(nthreads)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      const int64_t j0 = p.W * t / T, j1 = p.W * (t + 1) / T;
      float* mine = partial.data() + size_t(t) * N * p.H;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row0 = k * p.M + p.I + int64_t(leaf_of[n * K + k]) * p.W;
          leaf_rows<A>(p, p.x + n * p.H, mine + n * p.H, row0 + j0, j0, j1 - j0);
        }
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N * p.H; ++i) {
        float acc = 0.0f;
        for (int q = 0; q < T; ++q) acc += partial[size_t(q) * N * p.H + i];
        p.y[i] += acc;
      }
    }
    return;
  }

  // Grouped leaf phase when leaves are wide and shared by several tokens on average.
  const bool grouped = p.W >= 8 && N >= 8 && L <= 4 * N;
  std::vector<int32_t> leaf_of(grouped ? N * K : 0);
  int32_t* leaves = grouped ? leaf_of.data() : nullptr;

  // Phase 1: routing (and the leaves, unless grouped), in blocks of four tokens.
  const int64_t blocks = (N + 3) / 4;
  auto route_block = [&](int64_t b) {
    const int64_t n0 = b * 4;
    if (n0 + 4 <= N) {
      route_tokens4<A>(p, n0, leaves ? leaves + n0 * K : nullptr);
    } else {
      for (int64_t n = n0; n < N; ++n) route_token<A>(p, n, leaves ? leaves + n * K : nullptr);
    }
  };
  if (blocks == 1 || nthreads <= 1) {
    for (int64_t b = 0; b < blocks; ++b) route_block(b);
  } else {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < blocks; ++b) route_block(b);
  }
  if (!grouped) return;

  // Phase 2: per tree, tokens sorted by leaf (counting sort), then work items of up to `chunk`
  // tokens of one leaf. Within a tree each token is in one item, so items never share an output row.
  // Tokens of one leaf per work item: large enough to reuse the leaf's weights from cache, small
  // enough to give every thread several items.
  const int64_t chunk = std::clamp<int64_t>((N / (4 * int64_t(nthreads)) + 3) / 4 * 4, 4, 64);
  std::vector<int32_t> order(N);
  std::vector<int64_t> start(L + 1);
  std::vector<int64_t> items;  // packed (leaf, begin, end) triples
  for (int64_t k = 0; k < K; ++k) {
    std::fill(start.begin(), start.end(), 0);
    for (int64_t n = 0; n < N; ++n) ++start[leaf_of[n * K + k] + 1];
    for (int64_t l = 0; l < L; ++l) start[l + 1] += start[l];
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t n = 0; n < N; ++n) order[fill[leaf_of[n * K + k]]++] = static_cast<int32_t>(n);
    }
    items.clear();
    const int64_t base = k * p.M;
    for (int64_t l = 0; l < L; ++l) {
      if (p.W >= kGemmMinWidth && start[l + 1] - start[l] >= kGemmMinTokens) {
        leaf_gemm<A>(p, order.data() + start[l], start[l + 1] - start[l], base + p.I + l * p.W);
        continue;
      }
      for (int64_t b = start[l]; b < start[l + 1]; b += chunk) {
        items.push_back(l);
        items.push_back(b);
        items.push_back(std::min(b + chunk, start[l + 1]));
      }
    }
    const int64_t n_items = static_cast<int64_t>(items.size()) / 3;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && n_items > 1)
    {
      std::vector<float> scratch(8 * p.W);
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < n_items; ++it) {
        const int64_t leaf = items[3 * it], b = items[3 * it + 1], e = items[3 * it + 2];
        const int64_t row0 = base + p.I + leaf * p.W;
        int64_t i = b;
        for (; i + 4 <= e; i += 4) leaf_tokens4<A>(p, order.data() + i, row0, scratch.data());
        for (; i < e; ++i) {
          const int64_t n = order[i];
          leaf_token<A>(p, p.x + n * p.H, p.y + n * p.H, row0);
        }
      }
    }
  }
}

bool all_float_cpu(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                   const at::Tensor& w_out, const std::optional<at::Tensor>& b_out,
                   const std::optional<at::Tensor>& w_up) {
  return is_float_cpu(x) && is_float_cpu(w_in) && is_float_cpu(b_in) && is_float_cpu(w_out) && is_float_cpu(b_out) &&
         is_float_cpu(w_up);
}

at::Tensor fff_forward_impl(const at::Tensor& x_, const at::Tensor& w_in_, const at::Tensor& b_in_,
                            const at::Tensor& w_out_, int64_t trees, int64_t depth,
                            int64_t leaf_width, std::string_view activation,
                            const std::optional<at::Tensor>& b_out_, int64_t leaf_linear,
                            const std::optional<at::Tensor>& w_up_) {
  const Act a = parse_act(activation, "fff");
  TORCH_CHECK_VALUE(x_.dim() == 2, "fff: x must be 2-D (N, H), got ", x_.sizes());
  TORCH_CHECK_VALUE(trees >= 1 && depth >= 0 && depth <= 30 && leaf_width >= 1,
                    "fff: need trees >= 1, 0 <= depth <= 30, leaf_width >= 1");
  TORCH_CHECK_VALUE(leaf_linear >= 0 && leaf_linear <= leaf_width, "fff: need 0 <= leaf_linear <= leaf_width (got ",
                    leaf_linear, " of ", leaf_width, ")");
  const int64_t N = x_.size(0), H = x_.size(1);
  const int64_t M = ((int64_t(1) << depth) - 1) + (int64_t(1) << depth) * leaf_width;
  TORCH_CHECK_VALUE(w_in_.dim() == 2 && w_in_.size(0) == trees * M && w_in_.size(1) == H,
                    "fff: w_in must be (", trees * M, ", ", H, "), got ", w_in_.sizes());
  TORCH_CHECK_VALUE(w_out_.dim() == 2 && w_out_.size(0) == trees * M && w_out_.size(1) == H,
                    "fff: w_out must be (", trees * M, ", ", H, "), got ", w_out_.sizes());
  TORCH_CHECK_VALUE(b_in_.dim() == 1 && b_in_.size(0) == trees * M, "fff: b_in must be (",
                    trees * M, ",), got ", b_in_.sizes());
  const bool gated = present(w_up_);
  TORCH_CHECK_VALUE(!gated || (w_up_->dim() == 2 && w_up_->size(0) == trees * M && w_up_->size(1) == H),
                    "fff: w_up must be (", trees * M, ", ", H, ") like w_in, got ", gated ? w_up_->sizes() : at::IntArrayRef());
  TORCH_CHECK_VALUE(!gated || leaf_linear == 0, "fff: gated trees (w_up given) have no linear leaf neurons; "
                    "need leaf_linear = 0 (got ", leaf_linear, ")");
  const bool has_b_out = present(b_out_);
  TORCH_CHECK_VALUE(!has_b_out || (b_out_->dim() == 1 && b_out_->size(0) == H), "fff: b_out must be (", H,
                    ",), got ", has_b_out ? b_out_->sizes() : at::IntArrayRef());
  TORCH_CHECK(all_float_cpu(x_, w_in_, b_in_, w_out_, b_out_, w_up_), "fff native kernel: float32 CPU tensors only");
  const at::Tensor x = x_.contiguous(), w_in = w_in_.contiguous(), b_in = b_in_.contiguous(),
                   w_out = w_out_.contiguous(), b_out = has_b_out ? b_out_->contiguous() : at::Tensor(),
                   w_up = gated ? w_up_->contiguous() : at::Tensor();
  at::Tensor y = at::empty({N, H}, x.options());
  if (N == 0 || H == 0) return y;
  const int64_t I = (int64_t(1) << depth) - 1;
  const Problem p{x.const_data_ptr<float>(), w_in.const_data_ptr<float>(), b_in.const_data_ptr<float>(),
                  w_out.const_data_ptr<float>(), gated ? w_up.const_data_ptr<float>() : nullptr,
                  has_b_out ? b_out.const_data_ptr<float>() : nullptr,
                  y.mutable_data_ptr<float>(),
                  N, H, trees, depth, leaf_width, I, M, leaf_width - leaf_linear};
  auto run = [&] {
    switch (a) {
      case Act::Gelu: fff_all<Act::Gelu>(p); break;
      case Act::GeluTanh: fff_all<Act::GeluTanh>(p); break;
      case Act::Relu: fff_all<Act::Relu>(p); break;
      case Act::Silu: fff_all<Act::Silu>(p); break;
    }
  };
  ccli_op::without_gil(run);
  return y;
}

// --- the CPU kernel of the ccli::fff op -----------------------------------------------------------
// Registered with the dispatcher when this extension loads (glue: ccli_op.h). When the Python side
// selects anything but this kernel (set_backend), or for other dtypes, calls go to its Python kernel.

at::Tensor fff_cpu_kernel(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                          const at::Tensor& w_out, int64_t trees, int64_t depth, int64_t leaf_width,
                          c10::string_view activation, const std::optional<at::Tensor>& b_out,
                          int64_t leaf_linear, const std::optional<at::Tensor>& w_up) {
  if (ccli_op::native_enabled() && all_float_cpu(x, w_in, b_in, w_out, b_out, w_up)) {
    return fff_forward_impl(x, w_in, b_in, w_out, trees, depth, leaf_width,
                            std::string_view(activation.data(), activation.size()), b_out, leaf_linear, w_up);
  }
  return ccli_op::call_fallback("ccli::fff", x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out,
                                leaf_linear, w_up);
}

at::Tensor fff_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                       const at::Tensor& w_out, int64_t trees, int64_t depth, int64_t leaf_width,
                       const std::string& activation, const std::optional<at::Tensor>& b_out,
                       int64_t leaf_linear, const std::optional<at::Tensor>& w_up) {
  return fff_forward_impl(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out, leaf_linear, w_up);
}

}  // namespace

TORCH_LIBRARY_IMPL(ccli, CPU, m) {
  m.impl("fff", &fff_cpu_kernel);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ccli native CPU kernel for fast feedforward (FFF) trees";
  m.def("fff_forward", &fff_forward, "FFF forward (float32, CPU); no dispatcher", pybind11::arg("x"),
        pybind11::arg("w_in"), pybind11::arg("b_in"), pybind11::arg("w_out"), pybind11::arg("trees"),
        pybind11::arg("depth"), pybind11::arg("leaf_width"), pybind11::arg("activation"),
        pybind11::arg("b_out") = pybind11::none(), pybind11::arg("leaf_linear") = 0,
        pybind11::arg("w_up") = pybind11::none());
  ccli_op::def_dispatch(m);
}
