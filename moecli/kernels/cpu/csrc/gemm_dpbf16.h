// The bfloat16 matrix product behind csrc/grouped_gemm.cc on CPUs with AVX512-BF16 but no AMX
// (AMD Zen 4 and later, Intel Cooper Lake), for bfloat16 weights.
//
// VDPBF16PS multiplies 16 pairs of bfloat16 values by 16 other pairs and adds each pair's two
// products to one float32 lane: 32 multiply-adds per instruction, where a float32 FMA does 16 (on
// the Zen 4 development VM, measured ~1.7x the float32 engine on the experts, ~2x on dense products). Both operands hold
// pairs (k, k + 1) side by side, the "VNNI" layout that AMX uses for its B tiles too:
//   - A (the tokens' rows, rounded to bfloat16) is packed in slivers of kRows rows as
//     [K / 2][kRows] pairs, so the micro-kernel broadcasts one row's pair with one 32-bit load;
//   - B (the weights) is packed per block of kKC rows into 16-column groups of pairs
//     (pack_pairs, shared with gemm_amx.h; quantized weights: csrc/quant_pack.h's, dequantized
//     and rounded to bfloat16 there);
//   - the micro-kernel keeps a kRows x 32 tile of C in 24 of the 32 vector registers, as the
//     float32 engine does (gemm_fp32.h), with one VDPBF16PS per vector and step of two k.
// Products accumulate in float32; activations are rounded to bfloat16 first, as a bfloat16
// model's activations already are (and as the AMX engine does).
#pragma once

#ifdef __AVX512BW__
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define MOECLI_HAS_DPBF16 1
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"
#include "gemm_fp32.h"  // kExpertCols

namespace moecli {

inline uint16_t to_bfloat16(float v) {  // round to nearest even (inputs are finite)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// Packs rows k0 .. k0 + 2 * pairs of w [K, N] (bfloat16, row-major; rows past K are zeros), columns
// n0 .. n0 + width (zeros past them), as `groups` groups of 16 columns [groups][pairs][16][2]:
// group g, pair p, column j holds (w[k0 + 2p, n0 + 16g + j], w[k0 + 2p + 1, ...]).
inline void pack_pairs(const uint16_t* w, int64_t N, int64_t K, int64_t k0, int64_t pairs, int64_t n0, int64_t width,
                       int64_t groups, uint16_t* out) {
#ifdef __AVX512BW__
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
#endif
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t k = k0 + 2 * p;
    const uint16_t* r0 = w + k * N + n0;
    const uint16_t* r1 = k + 1 < K ? r0 + N : nullptr;  // past K: zeros
    // Rows are N apart (a page or more): the hardware prefetcher does not cross pages, so ask ahead.
    for (int64_t j = 0; j < width; j += 32) __builtin_prefetch(r0 + 16 * N + j), __builtin_prefetch(r0 + 17 * N + j);
    for (int64_t g = 0; g < groups; ++g) {
      uint16_t* dst = out + (g * pairs + p) * 32;
#ifdef __AVX512BW__
      if (k < K && r1 && 16 * g + 16 <= width) {  // interleave 16 columns of two rows: one permute
        const __m512i both = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 16 * g))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + 16 * g)), 1);
        _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(interleave, both));
        continue;
      }
#endif
      for (int64_t j = 0; j < 16; ++j) {
        const bool in = 16 * g + j < width;
        dst[2 * j] = in && k < K ? r0[16 * g + j] : 0;
        dst[2 * j + 1] = in && r1 ? r1[16 * g + j] : 0;
      }
    }
  }
}

struct Dpbf16Engine {
  static constexpr int kRows = 12;                       // rows per sliver: the register tile's
  static constexpr int64_t kExpertCols = moecli::kExpertCols;
  static constexpr int64_t kKC = 256;                    // rows of w per packed block (16 KB per 32 columns)
  using A = uint16_t;
  static int64_t row_size(int64_t K) { return round_up(K, 2); }  // packed A: whole pairs

  // One sliver: kRows rows (nullptr = a zero row) as pairs [K / 2][kRows][2], rounded to bfloat16.
  static void pack(const float* const* rows, int64_t K, A* out) {
    uint32_t* pairs = reinterpret_cast<uint32_t*>(out);
    const int64_t kp = row_size(K);
    for (int i = 0; i < kRows; ++i) {
      int64_t k = 0;
#ifdef MOECLI_HAS_DPBF16
      for (; rows[i] && k + 32 <= K; k += 32) {  // 32 at a time, rounding to nearest even: 16 pairs
        const __m512i both = reinterpret_cast<__m512i>(
            _mm512_cvtne2ps_pbh(_mm512_loadu_ps(rows[i] + k + 16), _mm512_loadu_ps(rows[i] + k)));
        alignas(64) uint32_t lanes[16];
        _mm512_store_si512(lanes, both);
        for (int p = 0; p < 16; ++p) pairs[(k / 2 + p) * kRows + i] = lanes[p];
      }
#endif
      for (; k < kp; k += 2) {
        const uint16_t lo = rows[i] && k < K ? to_bfloat16(rows[i][k]) : 0;
        const uint16_t hi = rows[i] && k + 1 < K ? to_bfloat16(rows[i][k + 1]) : 0;
        pairs[k / 2 * kRows + i] = uint32_t(lo) | uint32_t(hi) << 16;
      }
    }
  }

#ifdef MOECLI_HAS_DPBF16
  // C[:, n0:n0+width] = A @ w[:, n0:n0+width] for `slivers` packed slivers of K, w [K, N] bfloat16,
  // C [slivers * kRows, ldc] with room for whole 32-column tiles. (Or w quantized: QuantWeights.)
  template <typename Weights>
  static void gemm(const A* a, int64_t slivers, int64_t K, Weights w, int64_t N, int64_t n0, int64_t width, float* c,
                   int64_t ldc) {
    width = std::min(width, N - n0);
    const int64_t groups = round_up(width, 32) / 16, kp = row_size(K);
    uint16_t* b = static_cast<uint16_t*>(thread_buffer<Dpbf16Engine>(kKC * groups * 16 * sizeof(uint16_t)));
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t pairs = (std::min(kKC, K - k0) + 1) / 2;
      pack_pairs(w, N, K, k0, pairs, n0, width, groups, b);
      for (int64_t g = 0; g < groups; g += 2)
        for (int64_t r = 0; r < slivers; ++r)
          tile(pairs, a + r * kRows * kp + k0 * kRows, b + g * pairs * 32, b + (g + 1) * pairs * 32,
               c + r * kRows * ldc + n0 + 16 * g, ldc, k0 > 0);
    }
  }

 private:
  // C[kRows, 32] (+)= A[kRows, 2 pairs] @ B over `pairs` pairs of k; B's two 16-column groups at b0, b1.
  static void tile(int64_t pairs, const A* __restrict a, const uint16_t* __restrict b0, const uint16_t* __restrict b1,
                   float* __restrict c, int64_t ldc, bool accumulate) {
    __m512 acc[kRows][2];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      acc[i][0] = accumulate ? _mm512_loadu_ps(c + i * ldc) : _mm512_setzero_ps();
      acc[i][1] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16) : _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < pairs; ++p, a += 2 * kRows) {
      const __m512bh v0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b0 + 32 * p));
      const __m512bh v1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b1 + 32 * p));
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) {
        int32_t pair;
        std::memcpy(&pair, a + 2 * i, sizeof pair);
        const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, v0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, v1);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      _mm512_storeu_ps(c + i * ldc, acc[i][0]);
      _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
    }
  }
#else
  template <typename Weights>
  static void gemm(const A*, int64_t, int64_t, Weights, int64_t, int64_t, int64_t, float*, int64_t) {
    std::abort();
  }
#endif
};

}  // namespace moecli
