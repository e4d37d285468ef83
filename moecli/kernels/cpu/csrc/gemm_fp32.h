// The float32 matrix product behind csrc/grouped_gemm.cc: BLIS-style packing and register tiles
// (Goto & van de Geijn 2008, "Anatomy of high-performance matrix multiplication"):
//   - A (the activations) is packed once into slivers of kMR rows, stored column by column, so
//     the micro-kernel reads it as one sequential stream;
//   - B (the weights) is packed in blocks of kKC x width, slivers of kNR columns, so a sliver stays
//     in the L1 cache while every A sliver goes past it; bfloat16 weights are widened here, and
//     quantized ones dequantized (csrc/quant_pack.h's pack_b, found for QuantWeights by
//     argument-dependent lookup: the weights are `const W*` or a QuantWeights view);
//   - the micro-kernel keeps a kMR x kNR tile of C in vector registers (24 of the 32 on AVX-512)
//     and does one broadcast and two fused multiply-adds per row and step of k.
// Measured ~80% of one core's float32 FMA peak with its data in cache (100-108 of 125-131 GFLOP/s),
// and ~9% slower with the weights packed from memory (BENCHMARKS.md).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>

#include "common.h"

namespace moecli {

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector register
constexpr int kMR = 12;     // rows of the register tile
#else
constexpr int kLanes = 8;   // AVX2 (16 registers): a 6 x 16 tile
constexpr int kMR = 6;
#endif
constexpr int kNR = 2 * kLanes;  // columns of the register tile: two vectors
constexpr int64_t kKC = 256;    // depth of a packed block of B: a kKC x kNR sliver fills ~32 KB of L1
constexpr int64_t kNC = 128;     // columns per work item of a dense product
// Columns per work item of the grouped experts: whole rows of an expert's [d, f] matrix, so its
// weights are read front to back (rows of 128 columns are 512-byte pieces a page apart, which the
// hardware prefetcher does not follow; measured 4-22% faster on one core while memory is
// contended, equal when it is not). The packed block, kKC x 512, stays in the 2 MB L2.
constexpr int64_t kExpertCols = 512;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

// Scratch arrays for one call, carved out of the calling thread's kept buffer (see thread_buffer),
// each aligned for vector loads.
class Workspace {
 public:
  explicit Workspace(int64_t floats) : next_(static_cast<float*>(thread_buffer<Workspace>(floats * 4))) {}
  float* take(int64_t floats) {  // the caller sized the workspace for everything it takes
    float* out = next_;
    next_ += round_up(floats, 16);
    return out;
  }

 private:
  float* next_;
};

// C[kMR, kNR] (+)= A[kMR, kc] @ B[kc, kNR], A packed as [kc][kMR], B as [kc][kNR], C row-major.
inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, float* __restrict c,
                         int64_t ldc, bool accumulate) {
  Vec acc[kMR][2];
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
    acc[i][0] = accumulate ? *reinterpret_cast<const Vec*>(c + i * ldc) : Vec{};
    acc[i][1] = accumulate ? *reinterpret_cast<const Vec*>(c + i * ldc + kLanes) : Vec{};
  }
  for (int64_t k = 0; k < kc; ++k, a += kMR, b += kNR) {
    const Vec b0 = *reinterpret_cast<const Vec*>(b), b1 = *reinterpret_cast<const Vec*>(b + kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      acc[i][0] += a[i] * b0;
      acc[i][1] += a[i] * b1;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
    *reinterpret_cast<Vec*>(c + i * ldc) = acc[i][0];
    *reinterpret_cast<Vec*>(c + i * ldc + kLanes) = acc[i][1];
  }
}

// Packs rows k0..k0+kc and columns n0..n0+nc of w [K, N] (row-major) as slivers [nc / kNR][kc][kNR],
// in float32, zero past column N.
template <typename W>
void pack_b(const W* w, int64_t N, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* out) {
  for (int64_t k = 0; k < kc; ++k) {
    const W* row = w + (k0 + k) * N + n0;
    // Rows are N apart (a page or more): the hardware prefetcher does not cross pages, so ask ahead.
    for (int64_t j = 0; j < std::min(nc, N - n0); j += 64 / sizeof(W)) __builtin_prefetch(row + 8 * N + j);
    for (int64_t s = 0; s < nc; s += kNR) {
      float* dst = out + s * kc + k * kNR;
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kNR, N - n0 - s));
      for (int64_t j = 0; j < valid; ++j) dst[j] = to_float(row[s + j]);
      for (int64_t j = valid; j < kNR; ++j) dst[j] = 0.f;
    }
  }
}

// Packs kMR rows of length K (row i at rows[i], nullptr = a zero row) as one A sliver [K][kMR].
template <typename X>
void pack_a(const X* const* rows, int64_t K, float* out) {
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < kMR; ++i) out[k * kMR + i] = rows[i] ? to_float(rows[i][k]) : 0.f;
}

// C[:, n0:n0+width] = A @ w[:, n0:n0+width] for A packed as `slivers` slivers of K (see pack_a),
// w [K, N] row-major, C [slivers * kMR, ldc] with ldc a multiple of kNR.
template <typename Weights>
void gemm_columns(const float* a, int64_t slivers, int64_t K, Weights w, int64_t N, int64_t n0, int64_t width,
                  float* c, int64_t ldc) {
  const int64_t nc = round_up(std::min(width, N - n0), kNR);
  struct PackedB;
  float* b = static_cast<float*>(thread_buffer<PackedB>(kKC * nc * sizeof(float)));
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    pack_b(w, N, k0, kc, n0, nc, b);
    for (int64_t s = 0; s < nc; s += kNR)
      for (int64_t r = 0; r < slivers; ++r)
        micro_kernel(kc, a + r * K * kMR + k0 * kMR, b + s * kc, c + r * kMR * ldc + n0 + s, ldc, k0 > 0);
  }
}

// The float32 engine: A packed as slivers [K][kMR] of float32; any weights' dtype.
struct Fp32Engine {
  static constexpr int kRows = kMR;  // rows per sliver
  static constexpr int64_t kExpertCols = moecli::kExpertCols;
  using A = float;
  static int64_t row_size(int64_t K) { return K; }  // packed A elements per row
  static void pack(const float* const* rows, int64_t K, A* out) { pack_a(rows, K, out); }
  template <typename Weights>
  static void gemm(const A* a, int64_t slivers, int64_t K, Weights w, int64_t N, int64_t n0, int64_t width,
                   float* c, int64_t ldc) {
    gemm_columns(a, slivers, K, w, N, n0, width, c, ldc);
  }
};

}  // namespace moecli
