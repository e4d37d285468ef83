// Quantized weights in a prompt's matrix products (csrc/grouped_gemm.cc's moecli_matmul_q and
// moecli_grouped_experts_q): the engines pack blocks of B (the weights) before multiplying, and
// these packers dequantize while they pack, so the products run on the unchanged float32,
// AVX512-BF16 or AMX engine (gemm_fp32.h, gemm_dpbf16.h, gemm_amx.h) at their usual speed.
//
// A packed block is reused by every row of A (all of a prompt's tokens, or all of an expert's),
// so dequantizing costs a few operations a weight once, against two multiply-adds a weight and
// row of A; each packed byte and scale is still read once a call.
//
// They are overloads of the engines' pack_b (float32 panels) and pack_pairs (bfloat16 pairs) for
// QuantWeights, which the engines' templates find by argument-dependent lookup (QuantWeights is
// in namespace moecli), so the engines need not know about quantization.
//   float32 panels: q * scale, exact in float32 (an int8 by an 11-bit float16 mantissa);
//   bfloat16 pairs: q * scale rounded to bfloat16 (to nearest even), as a bfloat16 model's
//                   weights are; the engines round the activations to bfloat16 too.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "gemm_dpbf16.h"  // to_bfloat16
#include "gemm_fp32.h"    // kNR
#include "quant_unpack.h"

namespace moecli {

static_assert(kNR % kQLanes == 0, "a float32 panel's sliver is whole vectors of dequantized weights");

// Asks for the bytes of row `k` (of w's rows), columns n0 .. n0 + width, 8 rows ahead: rows are
// N bytes apart, often a page or more, and the hardware prefetcher does not cross pages.
template <bool Q4>
inline void prefetch_rows_ahead(QuantWeights<Q4> w, int64_t N, int64_t k, int64_t n0, int64_t width) {
  const auto* row = w.q + ((Q4 ? k / 2 : k) + 8) * N + n0;
  for (int64_t j = 0; j < width; j += 64) __builtin_prefetch(row + j);
}

// gemm_fp32.h's pack_b for quantized w: rows k0..k0+kc and columns n0..n0+nc of w [K, N] as
// float32 slivers [nc / kNR][kc][kNR], zero past column N.
// Rows go two at a time (k0 is even: a multiple of the engine's kKC), one odd row last.
template <bool Q4>
void pack_b(QuantWeights<Q4> w, int64_t N, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* out) {
  for (int64_t k = 0; k < kc; k += 2) {
    const bool pair = k + 1 < kc;
    prefetch_rows_ahead(w, N, k0 + k, n0, std::min(nc, N - n0));
    if (!Q4 && pair) prefetch_rows_ahead(w, N, k0 + k + 1, n0, std::min(nc, N - n0));
    for (int64_t s = 0; s < nc; s += kNR) {
      float* dst = out + s * kc + k * kNR;  // row k; row k + 1 is kNR further
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kNR, N - n0 - s));
      if (valid == kNR && pair) {
        for (int64_t j = 0; j < kNR; j += kQLanes) {
          QVec row0, row1;
          dequantize_pair(w, N, k0 + k, n0 + s + j, row0, row1);
          qstore(dst + j, row0);
          qstore(dst + kNR + j, row1);
        }
        continue;
      }
      for (int64_t i = 0; i < (pair ? 2 : 1); ++i) {
        for (int64_t j = 0; j < valid; ++j) dst[i * kNR + j] = dequantize_one(w, N, k0 + k + i, n0 + s + j);
        for (int64_t j = valid; j < kNR; ++j) dst[i * kNR + j] = 0.f;
      }
    }
  }
}

// gemm_dpbf16.h's pack_pairs for quantized w: rows k0 .. k0 + 2 * pairs of w [K, N] (zeros past
// K), columns n0 .. n0 + width (zeros past them), as `groups` groups of 16 columns
// [groups][pairs][16][2] of bfloat16: group g, pair p, column j holds (w[k0 + 2p, n0 + 16g + j],
// w[k0 + 2p + 1, ...]).
template <bool Q4>
void pack_pairs(QuantWeights<Q4> w, int64_t N, int64_t K, int64_t k0, int64_t pairs, int64_t n0, int64_t width,
                int64_t groups, uint16_t* out) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  static_assert(kQLanes == 16, "a bfloat16 group is one vector of dequantized weights");
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
#endif
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t k = k0 + 2 * p;
    if (k < K) prefetch_rows_ahead(w, N, k, n0, width), prefetch_rows_ahead(w, N, k + 1, n0, Q4 ? 0 : width);
    for (int64_t g = 0; g < groups; ++g) {
      uint16_t* dst = out + (g * pairs + p) * 32;
      const int64_t col = n0 + 16 * g;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
      if (k + 1 < K && 16 * g + 16 <= width) {  // two rows of 16 columns: round both, interleave
        QVec row0, row1;
        dequantize_pair(w, N, k, col, row0, row1);
        const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(row1, row0));
        _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(interleave, both));
        continue;
      }
#endif
      for (int64_t j = 0; j < 16; ++j) {
        const bool in = 16 * g + j < width;
        dst[2 * j] = in && k < K ? to_bfloat16(dequantize_one(w, N, k, col + j)) : 0;
        dst[2 * j + 1] = in && k + 1 < K ? to_bfloat16(dequantize_one(w, N, k + 1, col + j)) : 0;
      }
    }
  }
}

}  // namespace moecli
