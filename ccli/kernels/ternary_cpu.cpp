// Native CPU kernel for ternary (BitNet b1.58) linear layers: the ccli::ternary_linear op.
//
// Contract (see ccli/kernels/ternary.py): packed uint8 (out, ceil(in/4)) holds 4 weights per byte
// (weight j at bits 2*(j%4) of byte j/4; code 0 = 0, 1 = +1, 2 = -1, 3 read as 0), scale float32
// (out, G) one scale per row and group of group_size input columns (G = ceil(in / group_size)).
//  - act_bits = 8: per token q = clamp(round_half_even(x / sx), -127, 127), sx = max(max|x| / 127,
//    1e-8) (float32, true division: bit-identical to the PyTorch reference); acc[n,i,g] = sum over j
//    in g of t[i,j] * q[n,j] in int32 (exact); y = sx[n] * (sum_g scale[i,g] * acc[n,i,g]) + bias[i].
//  - act_bits = 16: y = sum_g scale[i,g] * (sum over j in g of +-x[n,j]) + bias[i], in float32: the
//    inner sums only add/subtract activations (see the float path below).
//
// Private weight layouts, built on first use from the packed tensor and cached (keyed on the packed
// tensor's TensorImpl, held by a weak reference, its data pointer and version counter):
//  - int8 path ("I2"): every group is padded to a multiple of 32 weights ("chunks"); a row is a run of
//    32-byte blocks of 4 chunks: byte b of block k holds u = t + 1 in {0, 1, 2} of chunk 4k+s at bits
//    2s..2s+1 for the weight at offset b of that chunk. Decoding a chunk to 32 bytes u is one shift and
//    one mask; the quantised activations are stored with the same per-group padding (zeros), so chunk
//    c pairs with the 32 activations at 32c. `_mm256_maddubs_epi16(u, q)` (u unsigned, q signed) gives
//    pair sums of u*q (|.| <= 508) that are accumulated in int16 for up to 64 chunks, then widened
//    with `_mm256_madd_epi16(., 1)` into int32; sum(t*q) = sum(u*q) - sum(q) per group (the group
//    sums of q are computed while quantising).
//  - float path ("P3"): rows in blocks of 8, every group padded to a multiple of 3 weights; per block
//    and triple of columns, one byte per row: the subset of +1 weights in bits 0-2, of -1 weights in
//    bits 3-5. Per token, a table of the 8 subset sums of each triple of activations is built once;
//    `_mm256_permutevar8x32_ps` then looks up eight rows' sums at a time (one lookup per sign), which
//    are added to / subtracted from float accumulators (additions only, no multiplication by weights).
//
//  - int8 path on CPUs with AVX-512 VNNI ("V16", the default there): 16 rows in the lanes of a vector,
//    `_mm512_dpbusd_epi32` straight into int32, and per-group scales applied vertically (see the
//    section below). "i2" stays selectable (`use_int8_kernel`), so that such a machine tests both.
//
// Work is split into items of (token block x row block), run in parallel with OpenMP (the libgomp
// torch uses, so torch.set_num_threads applies). Within an item, register tiles (int8: 4 tokens x 2 rows,
// or 1 token x 8 rows; float: 4 tokens x 8 rows, or 1 token x 32 rows) reuse every decoded weight
// vector across tokens. Without AVX2 (or with CCLI_TERNARY_SCALAR defined) a portable scalar path reads
// the same layouts and computes the same values (identical integers, floats up to summation order).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <omp.h>

#if defined(__AVX2__) && !defined(CCLI_TERNARY_SCALAR)
#include <immintrin.h>
#define CCLI_TERNARY_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(CCLI_TERNARY_NO_VNNI)
#define CCLI_TERNARY_VNNI 1
#endif
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef CCLI_TERNARY_AVX2
#define CCLI_QUANT_AVX2 1
#endif
#include "ccli_op.h"
#include "ccli_quant.h"

namespace {

using ccli_op::without_gil;

constexpr int64_t kFlush = 64;  // int8 path: chunks accumulated in int16 before widening
#ifndef CCLI_TERNARY_NRM
#define CCLI_TERNARY_NRM 2  // int8 path: rows per register tile of 4 tokens
#endif

// ---- geometry --------------------------------------------------------------------------------------

struct Geometry {
  int64_t in, gs, G, out;
  int64_t cpg;        // int8 path: 32-weight chunks per group
  int64_t kc;         // int8 path: chunks per row (G * cpg)
  int64_t row_bytes;  // int8 path: bytes per row (ceil(kc / 4) blocks of 32)
  int64_t tcpg;       // float path: 3-weight triples per group
  int64_t tkc;        // float path: triples per row (G * tcpg)
  int64_t rblocks;    // float path: blocks of 8 rows
  int64_t vblocks;    // int8 VNNI path: blocks of 16 rows

  Geometry(int64_t in_, int64_t gs_, int64_t out_) : in(in_), gs(gs_), out(out_) {
    G = (in + gs - 1) / gs;
    const int64_t span = std::min(gs, in);  // G == 1 when gs >= in
    cpg = (span + 31) / 32;
    kc = G * cpg;
    row_bytes = (kc + 3) / 4 * 32;
    tcpg = (span + 2) / 3;
    tkc = G * tcpg;
    rblocks = (out + 7) / 8;
    vblocks = (out + 15) / 16;
  }
  int64_t glen(int64_t g) const { return std::min(gs, in - g * gs); }
  int64_t qstride() const { return kc * 32; }
  int64_t block_bytes() const { return tkc * 8; }  // float path: bytes per block of 8 rows
  int64_t tstride() const { return tkc * 8; }      // float path: table floats per token
  int64_t vblock_bytes() const { return kc * 128; }  // int8 VNNI path: bytes per block of 16 rows
};

inline int weight_of(const uint8_t* row, int64_t j) {
  const int code = (row[j >> 2] >> (2 * (j & 3))) & 3;
  return code == 1 ? 1 : code == 2 ? -1 : 0;
}

// Calls place(g, p, w) for every weight w in {-1, 0, 1} of one packed row: group g, position p in it.
template <typename Place>
void for_each_weight(const uint8_t* src, const Geometry& geo, Place&& place) {
  for (int64_t g = 0; g < geo.G; ++g) {
    const int64_t len = geo.glen(g);
    for (int64_t p = 0; p < len; ++p) place(g, p, weight_of(src, g * geo.gs + p));
  }
}

void build_i2(const uint8_t* packed, int64_t nb, const Geometry& geo, uint8_t* dst) {
  at::parallel_for(0, geo.out, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      uint8_t* row = dst + i * geo.row_bytes;
      std::memset(row, 0, geo.row_bytes);
      for_each_weight(packed + i * nb, geo, [&](int64_t g, int64_t p, int w) {
        const int64_t c = g * geo.cpg + p / 32;
        row[(c >> 2) * 32 + (p & 31)] |= static_cast<uint8_t>((w + 1) << (2 * (c & 3)));
      });
    }
  });
}

// A layout of blocks of `rows` rows, `block_bytes` each: zeroes every block, then calls
// place(block, l, g, p, w) for every weight w of its row l (group g, position p in it).
template <typename Place>
void build_row_blocks(const uint8_t* packed, int64_t nb, const Geometry& geo, int64_t rows, int64_t block_bytes,
                      uint8_t* dst, Place&& place) {
  const int64_t blocks = (geo.out + rows - 1) / rows;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t* blk = dst + b * block_bytes;
      std::memset(blk, 0, block_bytes);
      for (int64_t l = 0; l < rows && rows * b + l < geo.out; ++l) {
        for_each_weight(packed + (rows * b + l) * nb, geo, [&](int64_t g, int64_t p, int w) { place(blk, l, g, p, w); });
      }
    }
  });
}

void build_p3(const uint8_t* packed, int64_t nb, const Geometry& geo, uint8_t* dst) {
  build_row_blocks(packed, nb, geo, 8, geo.block_bytes(), dst, [&](uint8_t* blk, int64_t l, int64_t g, int64_t p, int w) {
    if (w == 0) return;
    const int64_t c = g * geo.tcpg + p / 3;
    blk[c * 8 + l] |= static_cast<uint8_t>((w > 0 ? 1u : 8u) << (p % 3));
  });
}

void build_v16(const uint8_t* packed, int64_t nb, const Geometry& geo, uint8_t* dst) {
  build_row_blocks(packed, nb, geo, 16, geo.vblock_bytes(), dst, [&](uint8_t* blk, int64_t r, int64_t g, int64_t p, int w) {
    const int64_t c = g * geo.cpg + p / 32, k = p % 32;  // chunk, and offset in it
    const int64_t half = k / 16, quad = (k % 16) / 4, j = k % 4;
    blk[(c * 2 + half) * 64 + 4 * r + j] |= static_cast<uint8_t>((w + 1) << (2 * quad));
  });
}

// The scales (out, G) as the V16 kernel reads them: (vblocks, G, 16), scale[16b + r, g] at
// (b * G + g) * 16 + r, 0 past the last row.
void build_scales_v16(const float* scale, const Geometry& geo, float* dst) {
  for (int64_t b = 0; b < geo.vblocks; ++b)
    for (int64_t g = 0; g < geo.G; ++g)
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t row = 16 * b + r;
        dst[(b * geo.G + g) * 16 + r] = row < geo.out ? scale[row * geo.G + g] : 0.0f;
      }
}

// ---- layout cache -------------------------------------------------------------------------------------

// What get_layout builds: a weight layout from the packed weights, or (ScalesV16) the V16 kernel's
// copy of the scales from the scale tensor, cached like the weights so that no call redoes it.
enum class Layout { I2 = 0, P3 = 1, V16 = 2, ScalesV16 = 3 };

struct CacheEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> owner;
  const c10::TensorImpl* impl;
  const void* data;
  int64_t version, in, gs, out, stride0, stride1;
  Layout kind;
  at::Tensor bytes;
};

std::mutex g_cache_mutex;
std::vector<CacheEntry> g_cache;

int64_t version_of(const at::Tensor& t) { return t.is_inference() ? -1 : t._version(); }

// The cached `kind` layout of `packed`: the packed weights, or the scale tensor for ScalesV16.
at::Tensor get_layout(const at::Tensor& packed, const Geometry& geo, Layout kind) {
  const c10::TensorImpl* impl = packed.unsafeGetTensorImpl();
  const void* data = packed.data_ptr();
  const int64_t version = version_of(packed);
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  for (const CacheEntry& e : g_cache) {
    if (e.impl == impl && e.kind == kind && !e.owner.expired() && e.data == data && e.version == version &&
        e.in == geo.in && e.gs == geo.gs && e.out == geo.out && e.stride0 == packed.stride(0) &&
        e.stride1 == packed.stride(1)) {
      return e.bytes;
    }
  }
  // Drop entries of dead tensors and stale versions of this one.
  g_cache.erase(std::remove_if(g_cache.begin(), g_cache.end(),
                               [&](const CacheEntry& e) {
                                 return e.owner.expired() || (e.impl == impl && e.kind == kind);
                               }),
                g_cache.end());
  const at::Tensor src = packed.contiguous();
  const int64_t nb = src.size(1);
  at::Tensor bytes;
  if (kind == Layout::I2) {
    bytes = at::empty({geo.out * geo.row_bytes}, src.options());
    build_i2(src.const_data_ptr<uint8_t>(), nb, geo, bytes.mutable_data_ptr<uint8_t>());
  } else if (kind == Layout::V16) {
    bytes = at::empty({geo.vblocks * geo.vblock_bytes()}, src.options());
    build_v16(src.const_data_ptr<uint8_t>(), nb, geo, bytes.mutable_data_ptr<uint8_t>());
  } else if (kind == Layout::ScalesV16) {
    bytes = at::empty({geo.vblocks * geo.G * 16}, src.options());
    build_scales_v16(src.const_data_ptr<float>(), geo, bytes.mutable_data_ptr<float>());
  } else {
    bytes = at::empty({geo.rblocks * geo.block_bytes()}, src.options());
    build_p3(src.const_data_ptr<uint8_t>(), nb, geo, bytes.mutable_data_ptr<uint8_t>());
  }
  g_cache.push_back(CacheEntry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                   packed.getIntrusivePtr()),
                               impl, data, version, geo.in, geo.gs, geo.out, packed.stride(0), packed.stride(1),
                               kind, bytes});
  return bytes;
}

// ---- activation quantisation: ccli_quant.h ------------------------------------------------------------

using ccli_quant::kActEps;
using ccli_quant::quantize_span;
using ccli_quant::token_scale;

inline int32_t sum_i8(const int8_t* q, int64_t n) {
  int32_t s = 0;
  for (int64_t k = 0; k < n; ++k) s += q[k];
  return s;
}

// One token into the padded (per group) activation buffer of the int8 path, with its group sums.
void quantize_token_padded(const float* x, const Geometry& geo, int8_t* qrow, int32_t* qsum, float* sx_out) {
  const float sx = token_scale(x, geo.in);
  *sx_out = sx;
  for (int64_t g = 0; g < geo.G; ++g) {
    const int64_t len = geo.glen(g);
    int8_t* dst = qrow + g * geo.cpg * 32;
    quantize_span(x + g * geo.gs, len, sx, dst);
    std::memset(dst + len, 0, geo.cpg * 32 - len);
    qsum[g] = sum_i8(dst, len);
  }
}

// An already quantised token (ternary_int_matmul) into the padded buffer.
void copy_token_padded(const int8_t* q, const Geometry& geo, int8_t* qrow, int32_t* qsum) {
  for (int64_t g = 0; g < geo.G; ++g) {
    const int64_t len = geo.glen(g);
    int8_t* dst = qrow + g * geo.cpg * 32;
    std::memcpy(dst, q + g * geo.gs, len);
    std::memset(dst + len, 0, geo.cpg * 32 - len);
    qsum[g] = sum_i8(dst, len);
  }
}

// ---- the int8 path: tiles of MR tokens x NR rows --------------------------------------------------------

struct I8Problem {
  const uint8_t* w;     // I2 layout
  const int8_t* q;      // padded activations, qstride per token
  const int32_t* qsum;  // (N, G)
  const float* sx;      // (N)
  const float* scale;   // (out, G); for the V16 kernel, its ScalesV16 copy
  const float* bias;    // (out) or null
  float* y;             // (N, out), or null with iout
  int32_t* iout;        // (N, out, G) for ternary_int_matmul
  int64_t N;
  Geometry geo;
};

template <int MR, int NR>
inline void finish_i8(const I8Problem& p, int64_t n0, int64_t i0, int64_t g, const int32_t (&s)[MR][NR],
                      float (&facc)[MR][NR]) {
  const int64_t G = p.geo.G;
  for (int t = 0; t < MR; ++t) {
    const int32_t qs = p.qsum[(n0 + t) * G + g];
    for (int r = 0; r < NR; ++r) {
      const int32_t acc = s[t][r] - qs;
      if (p.iout != nullptr) {
        p.iout[((n0 + t) * p.geo.out + i0 + r) * G + g] = acc;
      } else {
        facc[t][r] += p.scale[(i0 + r) * G + g] * static_cast<float>(acc);
      }
    }
  }
}

template <int MR, int NR>
inline void store_i8(const I8Problem& p, int64_t n0, int64_t i0, const float (&facc)[MR][NR]) {
  if (p.iout != nullptr) return;
  for (int t = 0; t < MR; ++t) {
    const float sx = p.sx[n0 + t];
    float* yrow = p.y + (n0 + t) * p.geo.out + i0;
    for (int r = 0; r < NR; ++r) {
      const float v = sx * facc[t][r];
      yrow[r] = p.bias != nullptr ? v + p.bias[i0 + r] : v;
    }
  }
}

#ifdef CCLI_TERNARY_AVX2

// An empty asm that "modifies" v in a register: stops the compiler from reassociating the accumulator
// chains (which costs registers and spills in the tiles).
#define CCLI_PIN(v) __asm__("" : "+x"(v))

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// out[k] = sum of the 8 lanes of v[k], k < 8.
inline void hsum8_epi32(const __m256i* v, int32_t* out) {
  const __m256i h0 = _mm256_hadd_epi32(v[0], v[1]), h1 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i h2 = _mm256_hadd_epi32(v[4], v[5]), h3 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i a = _mm256_hadd_epi32(h0, h1), b = _mm256_hadd_epi32(h2, h3);
  const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), sums);
}

template <int MR, int NR, int S>
inline void i8_sub(const __m256i (&blk)[NR], const int8_t* const (&Q)[MR], int64_t c, __m256i (&acc)[MR][NR]) {
  const __m256i m3 = _mm256_set1_epi8(3);
  __m256i w[NR];
  for (int r = 0; r < NR; ++r) {
    w[r] = S == 0 ? _mm256_and_si256(blk[r], m3) : _mm256_and_si256(_mm256_srli_epi16(blk[r], 2 * S), m3);
  }
  for (int t = 0; t < MR; ++t) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Q[t] + (c + S) * 32));
    for (int r = 0; r < NR; ++r) {
      acc[t][r] = _mm256_add_epi16(acc[t][r], _mm256_maddubs_epi16(w[r], a));
      CCLI_PIN(acc[t][r]);
    }
  }
}

template <int MR, int NR>
inline void i8_chunk(const uint8_t* const (&W)[NR], const int8_t* const (&Q)[MR], int64_t c,
                     __m256i (&acc)[MR][NR]) {
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(2 * (c & 3)));
  __m256i w[NR];
  for (int r = 0; r < NR; ++r) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W[r] + (c >> 2) * 32));
    w[r] = _mm256_and_si256(_mm256_srl_epi16(b, shift), m3);
  }
  for (int t = 0; t < MR; ++t) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Q[t] + c * 32));
    for (int r = 0; r < NR; ++r) {
      acc[t][r] = _mm256_add_epi16(acc[t][r], _mm256_maddubs_epi16(w[r], a));
      CCLI_PIN(acc[t][r]);
    }
  }
}

// Chunks [c, end) (at most kFlush of them) of NR rows against MR tokens, accumulated in int16, then
// widened into acc32. Not inlined, so that the int16 accumulators own the registers.
template <int MR, int NR>
__attribute__((noinline)) void i8_run(const uint8_t* const (&W)[NR], const int8_t* const (&Q)[MR], int64_t c,
                                      int64_t end, __m256i (&acc32)[MR][NR]) {
  __m256i acc[MR][NR];
  for (int t = 0; t < MR; ++t)
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm256_setzero_si256();
  for (; c < end && (c & 3) != 0; ++c) i8_chunk<MR, NR>(W, Q, c, acc);
  for (; c + 4 <= end; c += 4) {
    __m256i blk[NR];
    for (int r = 0; r < NR; ++r) blk[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W[r] + c * 8));
    i8_sub<MR, NR, 0>(blk, Q, c, acc);
    i8_sub<MR, NR, 1>(blk, Q, c, acc);
    i8_sub<MR, NR, 2>(blk, Q, c, acc);
    i8_sub<MR, NR, 3>(blk, Q, c, acc);
  }
  for (; c < end; ++c) i8_chunk<MR, NR>(W, Q, c, acc);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int t = 0; t < MR; ++t)
    for (int r = 0; r < NR; ++r) acc32[t][r] = _mm256_add_epi32(acc32[t][r], _mm256_madd_epi16(acc[t][r], ones));
}

template <int MR, int NR>
void tile_i8(const I8Problem& p, int64_t n0, int64_t i0) {
  const Geometry& geo = p.geo;
  const uint8_t* W[NR];
  for (int r = 0; r < NR; ++r) W[r] = p.w + (i0 + r) * geo.row_bytes;
  const int8_t* Q[MR];
  for (int t = 0; t < MR; ++t) Q[t] = p.q + (n0 + t) * geo.qstride();
  float facc[MR][NR] = {};
  for (int64_t g = 0; g < geo.G; ++g) {
    __m256i acc32[MR][NR];
    for (int t = 0; t < MR; ++t)
      for (int r = 0; r < NR; ++r) acc32[t][r] = _mm256_setzero_si256();
    const int64_t cend = (g + 1) * geo.cpg;
    for (int64_t c = g * geo.cpg; c < cend; c += kFlush) i8_run<MR, NR>(W, Q, c, std::min(c + kFlush, cend), acc32);
    int32_t s[MR][NR];
    if constexpr (MR * NR == 8) {
      hsum8_epi32(&acc32[0][0], &s[0][0]);
    } else {
      for (int t = 0; t < MR; ++t)
        for (int r = 0; r < NR; ++r) s[t][r] = hsum_epi32(acc32[t][r]);
    }
    finish_i8<MR, NR>(p, n0, i0, g, s, facc);
  }
  store_i8<MR, NR>(p, n0, i0, facc);
}

#else  // portable scalar path

template <int MR, int NR>
void tile_i8(const I8Problem& p, int64_t n0, int64_t i0) {
  const Geometry& geo = p.geo;
  float facc[MR][NR] = {};
  for (int64_t g = 0; g < geo.G; ++g) {
    int32_t s[MR][NR] = {};
    for (int64_t c = g * geo.cpg; c < (g + 1) * geo.cpg; ++c) {
      const int shift = static_cast<int>(2 * (c & 3));
      for (int r = 0; r < NR; ++r) {
        const uint8_t* blk = p.w + (i0 + r) * geo.row_bytes + (c >> 2) * 32;
        for (int t = 0; t < MR; ++t) {
          const int8_t* a = p.q + (n0 + t) * geo.qstride() + c * 32;
          int32_t acc = 0;
          for (int b = 0; b < 32; ++b) acc += ((blk[b] >> shift) & 3) * a[b];
          s[t][r] += acc;
        }
      }
    }
    finish_i8<MR, NR>(p, n0, i0, g, s, facc);
  }
  store_i8<MR, NR>(p, n0, i0, facc);
}

#endif

// ---- the int8 path with AVX-512 VNNI: tiles of MR tokens x NB blocks of 16 rows ------------------------------
//
// The I2 path keeps input positions in the vector lanes, so every group ends in a horizontal sum per
// (token, row); with small groups (32 weights: one chunk) that reduction and the call around it cost
// more than the products. Here the 16 lanes are 16 rows: `_mm512_dpbusd_epi32(acc, u, a)` adds, for
// each row, its 4 weights u = t + 1 times 4 activations broadcast to every lane, straight into int32.
// A group ends with one subtract (sum(t*q) = sum(u*q) - sum(q)), convert and multiply-add by the 16
// rows' scales, all vertical. Layout "V16": per block of 16 rows and chunk of 32 weights, two 64-byte
// vectors (weights 0-15 and 16-31 of the chunk); byte 4r + j of a vector holds, at bits 2s..2s+1, u of
// row r at offset 4s + j of its half: one shift and one mask decode 4 weights of each of the 16 rows.
// 2 bits per weight, as I2. The integers are exactly I2's; the float epilogue is the same formula.

#ifdef CCLI_TERNARY_VNNI

template <int MR, int NB, int S>
inline void v16_quad(const __m512i (&v)[NB], const int8_t* const (&Q)[MR], int64_t off, __m512i (&acc)[MR][NB]) {
  const __m512i m3 = _mm512_set1_epi8(3);
  __m512i u[NB];
  for (int b = 0; b < NB; ++b) u[b] = _mm512_and_si512(S == 0 ? v[b] : _mm512_srli_epi16(v[b], 2 * S), m3);
  for (int t = 0; t < MR; ++t) {
    int32_t four;
    std::memcpy(&four, Q[t] + off + 4 * S, 4);
    const __m512i a = _mm512_set1_epi32(four);
    for (int b = 0; b < NB; ++b) acc[t][b] = _mm512_dpbusd_epi32(acc[t][b], u[b], a);
  }
}

inline __mmask16 rows_mask(int64_t rows_left) {
  return rows_left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rows_left) - 1);
}

template <int MR, int NB>
void tile_v16(const I8Problem& p, int64_t n0, int64_t b0) {
  const Geometry& geo = p.geo;
  const int64_t G = geo.G;
  const uint8_t* W[NB];
  for (int b = 0; b < NB; ++b) W[b] = p.w + (b0 + b) * geo.vblock_bytes();
  const int8_t* Q[MR];
  for (int t = 0; t < MR; ++t) Q[t] = p.q + (n0 + t) * geo.qstride();
  __m512 facc[MR][NB];
  for (int t = 0; t < MR; ++t)
    for (int b = 0; b < NB; ++b) facc[t][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[MR][NB];
    for (int t = 0; t < MR; ++t)
      for (int b = 0; b < NB; ++b) acc[t][b] = _mm512_setzero_si512();
    for (int64_t c = g * geo.cpg; c < (g + 1) * geo.cpg; ++c) {
      for (int64_t half = 0; half < 2; ++half) {
        __m512i v[NB];
        for (int b = 0; b < NB; ++b) v[b] = _mm512_loadu_si512(W[b] + (c * 2 + half) * 64);
        const int64_t off = c * 32 + half * 16;
        v16_quad<MR, NB, 0>(v, Q, off, acc);
        v16_quad<MR, NB, 1>(v, Q, off, acc);
        v16_quad<MR, NB, 2>(v, Q, off, acc);
        v16_quad<MR, NB, 3>(v, Q, off, acc);
      }
    }
    for (int t = 0; t < MR; ++t) {
      const __m512i qs = _mm512_set1_epi32(p.qsum[(n0 + t) * G + g]);
      for (int b = 0; b < NB; ++b) {
        const __m512i exact = _mm512_sub_epi32(acc[t][b], qs);
        if (p.iout != nullptr) {
          alignas(64) int32_t lanes[16];
          _mm512_store_si512(lanes, exact);
          const int64_t row0 = 16 * (b0 + b);
          for (int64_t r = 0; r < 16 && row0 + r < geo.out; ++r) p.iout[((n0 + t) * geo.out + row0 + r) * G + g] = lanes[r];
        } else {
          const __m512 sc = _mm512_loadu_ps(p.scale + ((b0 + b) * G + g) * 16);
          facc[t][b] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(exact), facc[t][b]);
        }
      }
    }
  }
  if (p.iout != nullptr) return;
  for (int t = 0; t < MR; ++t) {
    const __m512 sx = _mm512_set1_ps(p.sx[n0 + t]);
    float* yrow = p.y + (n0 + t) * geo.out;
    for (int b = 0; b < NB; ++b) {
      const int64_t row0 = 16 * (b0 + b);
      const __mmask16 m = rows_mask(geo.out - row0);
      __m512 v = _mm512_mul_ps(sx, facc[t][b]);
      if (p.bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, p.bias + row0));
      _mm512_mask_storeu_ps(yrow + row0, m, v);
    }
  }
}

#endif  // CCLI_TERNARY_VNNI

// Which int8 kernel runs: the VNNI one where the CPU has it, unless a test asks for I2.
#ifdef CCLI_TERNARY_VNNI
std::atomic<bool> g_use_v16{true};
#else
std::atomic<bool> g_use_v16{false};
#endif

// ---- the float path (act_bits = 16) ---------------------------------------------------------------------
// Per token and triple c of (per group zero padded) activations x0, x1, x2, a table of the 8 subset sums
// T[c][m] = sum of x_k over the bits k of m. A weight byte of row l holds the subset of +1 weights in
// bits 0-2 and of -1 weights in bits 3-5, so eight rows at once add T[c][pos] and subtract T[c][neg]:
// one `_mm256_permutevar8x32_ps` per sign (it reads the low 3 bits of each index lane).

struct F16Problem {
  const uint8_t* w;    // P3 layout: (rblocks, tkc, 8) bytes
  const float* tab;    // subset-sum tables, tstride floats per token
  const float* scale;  // (out, G)
  const float* bias;   // (out) or null
  float* y;            // (N, out)
  int64_t N;
  Geometry geo;
};

void build_table(const float* x, const Geometry& geo, float* tab) {
  for (int64_t g = 0; g < geo.G; ++g) {
    const int64_t len = geo.glen(g);
    const float* xg = x + g * geo.gs;
    for (int64_t k = 0; k < geo.tcpg; ++k) {
      const int64_t p = 3 * k;
      const float x0 = p < len ? xg[p] : 0.0f;
      const float x1 = p + 1 < len ? xg[p + 1] : 0.0f;
      const float x2 = p + 2 < len ? xg[p + 2] : 0.0f;
      float* t = tab + (g * geo.tcpg + k) * 8;
      const float x01 = x0 + x1;
      t[0] = 0.0f, t[1] = x0, t[2] = x1, t[3] = x01;
      t[4] = x2, t[5] = x0 + x2, t[6] = x1 + x2, t[7] = x01 + x2;
    }
  }
}

// Scales of the 8 rows of block b for group g (0 for padding rows).
inline void block_scales(const F16Problem& p, int64_t b, int64_t g, float* out8) {
  for (int l = 0; l < 8; ++l) {
    const int64_t i = 8 * b + l;
    out8[l] = i < p.geo.out ? p.scale[i * p.geo.G + g] : 0.0f;
  }
}

inline void store_block(const F16Problem& p, int64_t n, int64_t b, const float* v8) {
  float* yrow = p.y + n * p.geo.out;
  for (int l = 0; l < 8; ++l) {
    const int64_t i = 8 * b + l;
    if (i < p.geo.out) yrow[i] = p.bias != nullptr ? v8[l] + p.bias[i] : v8[l];
  }
}

#ifdef CCLI_TERNARY_AVX2

#define CCLI_PIN_PS(v) __asm__("" : "+x"(v))

// Triples [c, end) of NB row blocks against MR tokens: diff = sum T[pos] - sum T[neg]. Not inlined, so
// that the accumulators own the registers.
template <int MR, int NB>
__attribute__((noinline)) void p3_run(const uint8_t* const (&W)[NB], const float* const (&T)[MR], int64_t c,
                                      int64_t end, __m256 (&diff)[MR][NB]) {
  __m256 pos[MR][NB], neg[MR][NB];
  for (int t = 0; t < MR; ++t)
    for (int b = 0; b < NB; ++b) pos[t][b] = neg[t][b] = _mm256_setzero_ps();
  for (; c < end; ++c) {
    __m256 tb[MR];
    for (int t = 0; t < MR; ++t) tb[t] = _mm256_loadu_ps(T[t] + c * 8);
    for (int b = 0; b < NB; ++b) {
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(W[b] + c * 8)));
      const __m256i vn = _mm256_srli_epi32(v, 3);
      for (int t = 0; t < MR; ++t) {
        pos[t][b] = _mm256_add_ps(pos[t][b], _mm256_permutevar8x32_ps(tb[t], v));
        neg[t][b] = _mm256_add_ps(neg[t][b], _mm256_permutevar8x32_ps(tb[t], vn));
        CCLI_PIN_PS(pos[t][b]);
        CCLI_PIN_PS(neg[t][b]);
      }
    }
  }
  for (int t = 0; t < MR; ++t)
    for (int b = 0; b < NB; ++b) diff[t][b] = _mm256_sub_ps(pos[t][b], neg[t][b]);
}

// MR tokens x NB blocks of 8 rows, starting at token n0 and row block b0.
template <int MR, int NB>
void tile_f16(const F16Problem& p, int64_t n0, int64_t b0) {
  const Geometry& geo = p.geo;
  const uint8_t* W[NB];
  for (int b = 0; b < NB; ++b) W[b] = p.w + (b0 + b) * geo.block_bytes();
  const float* T[MR];
  for (int t = 0; t < MR; ++t) T[t] = p.tab + (n0 + t) * geo.tstride();
  __m256 facc[MR][NB];
  for (int t = 0; t < MR; ++t)
    for (int b = 0; b < NB; ++b) facc[t][b] = _mm256_setzero_ps();
  for (int64_t g = 0; g < geo.G; ++g) {
    __m256 diff[MR][NB];
    p3_run<MR, NB>(W, T, g * geo.tcpg, (g + 1) * geo.tcpg, diff);
    for (int b = 0; b < NB; ++b) {
      alignas(32) float sc[8];
      block_scales(p, b0 + b, g, sc);
      const __m256 s = _mm256_load_ps(sc);
      for (int t = 0; t < MR; ++t) facc[t][b] = _mm256_add_ps(facc[t][b], _mm256_mul_ps(s, diff[t][b]));
    }
  }
  for (int t = 0; t < MR; ++t) {
    for (int b = 0; b < NB; ++b) {
      alignas(32) float v[8];
      _mm256_store_ps(v, facc[t][b]);
      store_block(p, n0 + t, b0 + b, v);
    }
  }
}

#else

template <int MR, int NB>
void tile_f16(const F16Problem& p, int64_t n0, int64_t b0) {
  const Geometry& geo = p.geo;
  for (int t = 0; t < MR; ++t) {
    const float* T = p.tab + (n0 + t) * geo.tstride();
    for (int b = 0; b < NB; ++b) {
      const uint8_t* W = p.w + (b0 + b) * geo.block_bytes();
      float facc[8] = {};
      for (int64_t g = 0; g < geo.G; ++g) {
        float sc[8];
        block_scales(p, b0 + b, g, sc);
        for (int l = 0; l < 8; ++l) {
          float pos = 0.0f, neg = 0.0f;
          for (int64_t c = g * geo.tcpg; c < (g + 1) * geo.tcpg; ++c) {
            const uint8_t v = W[c * 8 + l];
            pos += T[c * 8 + (v & 7)];
            neg += T[c * 8 + ((v >> 3) & 7)];
          }
          facc[l] += sc[l] * (pos - neg);
        }
      }
      store_block(p, n0 + t, b0 + b, facc);
    }
  }
}

#endif

// ---- scheduling ------------------------------------------------------------------------------------------

constexpr int64_t kTokenBlock = 64;  // tokens per work item (their activations stay in L2)

template <int W>
using IC = std::integral_constant<int, W>;

// The tiles of one item: tokens [t0, t1) x row units [r0, r1). A single token takes tiles of NR1 units
// (then 4, 2, 1 for the rest); several tokens take tiles of 4 tokens (or the rest) x NRM units.
template <int NR1, int NRM, typename TileFn>
void run_item(int64_t t0, int64_t t1, int64_t r0, int64_t r1, TileFn&& tile) {
  if (t1 - t0 == 1) {
    int64_t i = r0;
    for (; i + NR1 <= r1; i += NR1) tile(IC<1>{}, IC<NR1>{}, t0, i);
    if constexpr (NR1 >= 8) {
      if (i + 4 <= r1) tile(IC<1>{}, IC<4>{}, t0, i), i += 4;
    }
    if constexpr (NR1 >= 4) {
      if (i + 2 <= r1) tile(IC<1>{}, IC<2>{}, t0, i), i += 2;
    }
    if constexpr (NR1 >= 2) {
      if (i < r1) tile(IC<1>{}, IC<1>{}, t0, i);
    }
    return;
  }
  for (int64_t n = t0; n < t1; n += 4) {
    auto rows = [&](auto MR) {
      int64_t i = r0;
      for (; i + NRM <= r1; i += NRM) tile(MR, IC<NRM>{}, n, i);
      if constexpr (NRM >= 2) {
        for (; i < r1; ++i) tile(MR, IC<1>{}, n, i);
      }
    };
    switch (std::min<int64_t>(4, t1 - n)) {
      case 4: rows(IC<4>{}); break;
      case 3: rows(IC<3>{}); break;
      case 2: rows(IC<2>{}); break;
      default: rows(IC<1>{}); break;
    }
  }
}

// Runs prepare(n) for every token, then the tiles of every (token block x block of `row_block` row
// units) item; `units` row units in all (rows, or blocks of 8 rows).
template <int NR1, int NRM, typename Prepare, typename TileFn>
void run_all(int64_t N, int64_t units, int64_t row_block, int64_t work, Prepare&& prepare, TileFn&& tile) {
  const int64_t tb = std::min(N, kTokenBlock);
  const int64_t n_tb = (N + tb - 1) / tb, n_rb = (units + row_block - 1) / row_block;
  const int64_t items = n_tb * n_rb;
  const int nthreads = at::get_num_threads();
  const bool parallel = nthreads > 1 && work >= (int64_t(1) << 16) && items > 1;
#pragma omp parallel num_threads(nthreads) if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) prepare(n);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t a = it / n_rb, b = it % n_rb;
      const int64_t t0 = a * tb, t1 = std::min(N, t0 + tb);
      const int64_t r0 = b * row_block, r1 = std::min(units, r0 + row_block);
      run_item<NR1, NRM>(t0, t1, r0, r1, tile);
    }
  }
}

// Per-thread scratch reused across calls (grows to the largest call).
struct Scratch {
  std::vector<int8_t> q;
  std::vector<int32_t> qsum;
  std::vector<float> sx;
  std::vector<float> tab;
};
thread_local Scratch t_scratch;

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// Keep at most kKeepBytes of scratch per thread between calls (large batches free theirs).
constexpr size_t kKeepBytes = size_t(8) << 20;

template <typename T>
void trim(std::vector<T>& v) {
  if (v.capacity() * sizeof(T) > kKeepBytes) std::vector<T>().swap(v);
}

void trim_scratch() {
  Scratch& s = t_scratch;
  trim(s.q), trim(s.qsum), trim(s.sx), trim(s.tab);
}


// Runs every int8 tile of p (prepare(n) first fills token n's activations) with the V16 kernel or the
// I2 one; p.w and p.scale must be in that kernel's layouts. The caller reads the choice once, for both.
template <typename Prepare>
void run_int8([[maybe_unused]] bool v16, const I8Problem& p, int64_t work, Prepare&& prepare) {
#ifdef CCLI_TERNARY_VNNI
  if (v16) {
    run_all<4, 2>(p.N, p.geo.vblocks, 4, work, prepare, [&](auto MR, auto NB, int64_t n0, int64_t b0) {
      tile_v16<decltype(MR)::value, decltype(NB)::value>(p, n0, b0);
    });
    return;
  }
#endif
  run_all<8, CCLI_TERNARY_NRM>(p.N, p.geo.out, 64, work, prepare, [&](auto MR, auto NR, int64_t n0, int64_t i0) {
    tile_i8<decltype(MR)::value, decltype(NR)::value>(p, n0, i0);
  });
}

// ---- entry points ------------------------------------------------------------------------------------------

void check_common(const at::Tensor& packed, int64_t in, int64_t gs) {
  TORCH_CHECK_VALUE(in >= 1 && gs >= 1, "ternary_linear: need in_features >= 1 and group_size >= 1 (got ", in, ", ", gs, ")");
  TORCH_CHECK_VALUE(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.size(1) == (in + 3) / 4,
                    "ternary: packed weights must be uint8 (out, ceil(in_features / 4)) = (out, ", (in + 3) / 4,
                    "), got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(packed.device().is_cpu(), "ternary native kernel: CPU tensors only");
}

at::Tensor ternary_linear_impl(const at::Tensor& x_, const at::Tensor& packed, const at::Tensor& scale_,
                               const std::optional<at::Tensor>& bias_, int64_t in, int64_t gs, int64_t act_bits) {
  TORCH_CHECK_VALUE(act_bits == 8 || act_bits == 16,
                    "ternary_linear: act_bits must be 8 (int8 activations) or 16 (float activations), got ", act_bits);
  check_common(packed, in, gs);
  TORCH_CHECK_VALUE(x_.dim() == 2 && x_.size(1) == in, "ternary_linear: x must be (N, ", in, "), got shape ", x_.sizes());
  const int64_t N = x_.size(0), out = packed.size(0);
  const Geometry geo(in, gs, out);
  TORCH_CHECK_VALUE(scale_.dim() == 2 && scale_.size(0) == out && scale_.size(1) == geo.G,
                    "ternary_linear: scale must be (out, G) = (", out, ", ", geo.G, ") for in_features=", in,
                    ", group_size=", gs, ", got ", scale_.sizes());
  const bool has_bias = bias_.has_value() && bias_->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias_->dim() == 1 && bias_->size(0) == out, "ternary_linear: bias must be (", out, ",), got ",
                      bias_->sizes());
  }
  TORCH_CHECK(x_.scalar_type() == at::kFloat && scale_.scalar_type() == at::kFloat &&
                  (!has_bias || bias_->scalar_type() == at::kFloat),
              "ternary native kernel: float32 x, scale and bias only");
  TORCH_CHECK(x_.device().is_cpu() && scale_.device().is_cpu() && (!has_bias || bias_->device().is_cpu()),
              "ternary native kernel: CPU tensors only");
  const at::Tensor x = x_.contiguous(), scale = scale_.contiguous();
  const at::Tensor bias = has_bias ? bias_->contiguous() : at::Tensor();
  at::Tensor y = at::empty({N, out}, x.options());
  if (N == 0 || out == 0) return y;
  const float* xp = x.const_data_ptr<float>();
  const float* bp = has_bias ? bias.const_data_ptr<float>() : nullptr;
  const int64_t work = N * out * in;
  if (act_bits == 8) {
    const bool v16 = g_use_v16.load(std::memory_order_relaxed);
    const at::Tensor layout = get_layout(packed, geo, v16 ? Layout::V16 : Layout::I2);
    const at::Tensor scales = v16 ? get_layout(scale_, geo, Layout::ScalesV16) : scale;  // keyed on the caller's tensor
    without_gil([&] {
      Scratch& s = t_scratch;
      int8_t* q = grow(s.q, N * geo.qstride());
      int32_t* qsum = grow(s.qsum, N * geo.G);
      float* sx = grow(s.sx, N);
      const I8Problem p{layout.const_data_ptr<uint8_t>(), q, qsum, sx, scales.const_data_ptr<float>(), bp,
                        y.mutable_data_ptr<float>(), nullptr, N, geo};
      run_int8(v16, p, work, [&](int64_t n) { quantize_token_padded(xp + n * in, geo, q + n * geo.qstride(), qsum + n * geo.G, sx + n); });
    });
  } else {
    const at::Tensor layout = get_layout(packed, geo, Layout::P3);
    without_gil([&] {
      float* tab = grow(t_scratch.tab, N * geo.tstride());
      F16Problem p{layout.const_data_ptr<uint8_t>(), tab, scale.const_data_ptr<float>(), bp,
                   y.mutable_data_ptr<float>(), N, geo};
      run_all<4, 1>(
          N, geo.rblocks, 8, work, [&](int64_t n) { build_table(xp + n * in, geo, tab + n * geo.tstride()); },
          [&](auto MR, auto NB, int64_t n0, int64_t b0) { tile_f16<decltype(MR)::value, decltype(NB)::value>(p, n0, b0); });
    });
  }
  trim_scratch();
  return y;
}

at::Tensor ternary_int_matmul(const at::Tensor& q_, const at::Tensor& packed, int64_t in, int64_t gs) {
  check_common(packed, in, gs);
  TORCH_CHECK_VALUE(q_.dim() == 2 && q_.size(1) == in && q_.scalar_type() == at::kChar,
                    "ternary_int_matmul: q must be int8 (N, ", in, "), got ", q_.scalar_type(), " ", q_.sizes());
  const at::Tensor q = q_.contiguous();
  const int64_t N = q.size(0), out = packed.size(0);
  const Geometry geo(in, gs, out);
  at::Tensor acc = at::empty({N, out, geo.G}, q.options().dtype(at::kInt));
  if (N == 0 || out == 0) return acc;
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const bool v16 = g_use_v16.load(std::memory_order_relaxed);
  const at::Tensor layout = get_layout(packed, geo, v16 ? Layout::V16 : Layout::I2);
  without_gil([&] {
    std::vector<int8_t> qbuf(N * geo.qstride());
    std::vector<int32_t> qsum(N * geo.G);
    const I8Problem p{layout.const_data_ptr<uint8_t>(), qbuf.data(), qsum.data(), nullptr, nullptr, nullptr, nullptr,
                      acc.mutable_data_ptr<int32_t>(), N, geo};
    run_int8(v16, p, N * out * in, [&](int64_t n) { copy_token_padded(qp + n * in, geo, qbuf.data() + n * geo.qstride(), qsum.data() + n * geo.G); });
  });
  return acc;
}

std::tuple<at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x_) {
  TORCH_CHECK_VALUE(x_.dim() == 2 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(),
                    "quantize_activations: x must be a 2-D float32 CPU tensor, got ", x_.scalar_type(), " ", x_.sizes());
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(0), in = x.size(1);
  at::Tensor q = at::empty({N, in}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({N, 1}, x.options());
  const float* xp = x.const_data_ptr<float>();
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* sp = sx.mutable_data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(in, 1)), [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const float s = in > 0 ? token_scale(xp + n * in, in) : kActEps;
      sp[n] = s;
      quantize_span(xp + n * in, in, s, qp + n * in);
    }
  });
  return {q, sx};
}

// --- the CPU kernel of the ccli::ternary_linear op ------------------------------------------------------
// Registered with the dispatcher when this extension loads (glue: ccli_op.h). When the Python side
// selects anything but this kernel (set_backend), or for unsupported dtypes, calls go to its Python kernel.

bool native_supported(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                      const std::optional<at::Tensor>& bias) {
  if (!x.device().is_cpu() || x.scalar_type() != at::kFloat) return false;
  if (!packed.device().is_cpu() || packed.scalar_type() != at::kByte) return false;
  if (!scale.device().is_cpu() || scale.scalar_type() != at::kFloat) return false;
  if (bias.has_value() && bias->defined() && (!bias->device().is_cpu() || bias->scalar_type() != at::kFloat)) return false;
  return true;
}

at::Tensor ternary_cpu_kernel(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                              const std::optional<at::Tensor>& bias, int64_t in, int64_t gs, int64_t act_bits) {
  if (ccli_op::native_enabled() && native_supported(x, packed, scale, bias)) {
    return ternary_linear_impl(x, packed, scale, bias, in, gs, act_bits);
  }
  return ccli_op::call_fallback("ccli::ternary_linear", x, packed, scale, bias, in, gs, act_bits);
}

at::Tensor ternary_linear_py(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                             const std::optional<at::Tensor>& bias, int64_t in, int64_t gs, int64_t act_bits) {
  return ternary_linear_impl(x, packed, scale, bias, in, gs, act_bits);
}

std::vector<std::string> int8_kernels() {
#ifdef CCLI_TERNARY_VNNI
  return {"vnni", "i2"};
#else
  return {"i2"};
#endif
}

// The int8 kernel later calls use: "vnni" (the default where compiled) or "i2" (AVX2 / scalar).
void use_int8_kernel(const std::string& name) {
  const std::vector<std::string> names = int8_kernels();
  std::string have;
  for (const std::string& n : names) have += (have.empty() ? "" : ", ") + n;
  TORCH_CHECK_VALUE(std::find(names.begin(), names.end(), name) != names.end(), "ternary: int8 kernel '", name,
                    "' is not in this build (it has: ", have, ")");
  g_use_v16.store(name == "vnni", std::memory_order_relaxed);
}

std::string int8_kernel() { return g_use_v16.load(std::memory_order_relaxed) ? "vnni" : "i2"; }

int64_t cache_size() {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  return static_cast<int64_t>(g_cache.size());
}

void clear_cache() {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  g_cache.clear();
}

}  // namespace

TORCH_LIBRARY_IMPL(ccli, CPU, m) {
  m.impl("ternary_linear", &ternary_cpu_kernel);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ccli native CPU kernel for ternary (BitNet b1.58) linear layers";
  m.def("ternary_linear", &ternary_linear_py, "ternary linear (float32 x, packed 2-bit weights, CPU); no dispatcher",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("scale"), pybind11::arg("bias"),
        pybind11::arg("in_features"), pybind11::arg("group_size"), pybind11::arg("act_bits"));
  m.def("ternary_int_matmul", &ternary_int_matmul, "int32 (N, out, G) accumulators of int8 q (N, in) and packed weights");
  m.def("quantize_activations", &quantize_activations, "per-token absmax int8 quantisation: (q int8 (N, in), sx (N, 1))");
  ccli_op::def_dispatch(m);
  m.def("int8_kernels", &int8_kernels, "the int8-activation kernels this build has, default first");
  m.def("use_int8_kernel", &use_int8_kernel, pybind11::arg("name"), "choose the int8-activation kernel (for tests)");
  m.def("int8_kernel", &int8_kernel, "the int8-activation kernel in use");
  m.def("cache_size", &cache_size, "number of cached private weight layouts");
  m.def("clear_cache", &clear_cache, "drop the cached private weight layouts");
#if defined(CCLI_TERNARY_VNNI)
  m.attr("simd") = "avx512-vnni";
#elif defined(CCLI_TERNARY_AVX2)
  m.attr("simd") = "avx2";
#else
  m.attr("simd") = "scalar";
#endif
}
