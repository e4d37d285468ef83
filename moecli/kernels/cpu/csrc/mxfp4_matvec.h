// MXFP4 weights (gpt-oss's experts, moecli/model/mxfp4.py) as the CPU kernels read them: the inner
// loop of csrc/mxfp4.cc's moecli_expert_matvec_mxfp4, on AVX-512, AVX2 or any other CPU.
//
// The layout, the checkpoint's own (OCP Microscaling, 2023): a matrix [k, n] in moecli's [in, out]
// convention is stored output-major, so output j is one dot product over contiguous bytes:
//   blocks uint8 [n, k / 2]:  block b of output j (inputs 32b .. 32b + 31) is 16 bytes, input
//                             32b + 2i in byte i's low nibble and 32b + 2i + 1 in its high one, each
//                             an E2M1 code: bit 3 the sign, then 0, 0.5, 1, 1.5, 2, 3, 4, 6;
//   scales uint8 [n, k / 32]: the block's E8M0 exponent s, the scale 2^(s - 127).
//
// The loop, per output j: for each block, the 32 codes become floats by a 16-entry table lookup in
// registers (AVX-512: one permute a 16 codes, as the permute reads only an index's low 4 bits;
// AVX2: an 8-entry permute of the magnitude and the sign bit xor-ed in), are multiplied by x, and
// the block's sum is scaled once by its power of two (a scalar from a 256-entry table, broadcast)
// into the output's accumulator: two multiply-adds a weight's pair and one a block. x is taken
// "deinterleaved" per block (mxfp4_deinterleave: its even inputs, then its odd ones), so the low and
// high nibbles each meet a contiguous vector of x and no shuffle is needed. R outputs at a time
// (independent sums, and x loaded once for all of them) for X rows of x (a prompt's tokens on
// one expert: the weights read once for all of them).
//
// Accuracy: every code times x is exact in float32 (a code has at most two significant bits), the
// block sums round once a lane, scales are exact powers of two: float32's level, as the
// dequantize-then-multiply reference (tests/test_mxfp4.py). Subnormal scales (s = 0, 1) meet XLA's
// flush-to-zero as the reference does.
#pragma once

#include <cmath>
#include <cstdint>

#include "quant_unpack.h"

namespace moecli {

constexpr int64_t kMxBlock = 32;                 // weights a scale
constexpr int kMxVecs = kMxBlock / kQLanes;      // QVecs a block: 2 (AVX-512) or 4 (AVX2, generic)
// Outputs at a time: R * X sums in registers (AVX-512: 16 of 32 registers at X = 4; AVX2 8 of 16).
constexpr int kMxRows = kQLanes == 16 ? 4 : 2;
constexpr int kMxTokens = 4;                      // rows of x at a time, at most

alignas(64) inline constexpr float kFp4Values[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                                     -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

// 2^(s - 127) for every E8M0 byte (s = 255, the spec's NaN, gives +inf: transformers' ldexp does too).
struct E8m0Table {
  float value[256];
  E8m0Table() {
    for (int s = 0; s < 256; ++s) value[s] = std::ldexp(1.f, s - 127);
  }
};
inline const float* e8m0_scales() {
  static const E8m0Table table;
  return table.value;
}

// x[0 : k] as the loop takes it: per block of 32, inputs 0, 2, .., 30, then 1, 3, .., 31 (k % 32 == 0).
inline void mxfp4_deinterleave(const float* x, int64_t k, float* out) {
  for (int64_t b = 0; b < k; b += kMxBlock)
    for (int i = 0; i < kMxBlock / 2; ++i) {
      out[b + i] = x[b + 2 * i];
      out[b + kMxBlock / 2 + i] = x[b + 2 * i + 1];
    }
}

// One block's 32 weights (16 bytes at p) without their scale, as kMxVecs vectors in the order of
// mxfp4_deinterleave's x: v[i] meets x_deinterleaved[i * kQLanes ..].
#if defined(__AVX512F__)
inline void mxfp4_unpack(const uint8_t* p, QVec v[kMxVecs]) {
  const __m512 table = _mm512_load_ps(kFp4Values);
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v[0] = _mm512_permutexvar_ps(bytes, table);                         // low nibbles: the index's low 4 bits
  v[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);  // high nibbles
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline __m256 fp4_lookup8(__m256i codes) {  // 8 codes 0..15: the magnitude by permute, the sign (bit 3) by xor
  const __m256 magnitude = _mm256_permutevar8x32_ps(_mm256_load_ps(kFp4Values), codes);  // low 3 bits
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(codes, _mm256_set1_epi32(8)), 28);
  return _mm256_xor_ps(magnitude, _mm256_castsi256_ps(sign));
}
inline void mxfp4_unpack(const uint8_t* p, QVec v[kMxVecs]) {
  for (int half = 0; half < 2; ++half) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * half)));
    v[half] = fp4_lookup8(bytes);
    v[2 + half] = fp4_lookup8(_mm256_srli_epi32(bytes, 4));
  }
}
#else
inline void mxfp4_unpack(const uint8_t* p, QVec v[kMxVecs]) {
  for (int i = 0; i < kMxBlock / 2; ++i) {
    v[i / kQLanes][i % kQLanes] = kFp4Values[p[i] & 15];
    v[(kMxBlock / 2 + i) / kQLanes][i % kQLanes] = kFp4Values[p[i] >> 4];
  }
}
#endif

// out[x][r] = x_x @ w[:, j + r] for R outputs j.. and X rows of x: w's rows of bytes and scales
// start at `blocks` and `scales` (output j's), `k` inputs; xs[x] is a deinterleaved row of x.
template <int R, int X>
inline void mxfp4_outputs(const float* const* xs, const uint8_t* blocks, const uint8_t* scales, int64_t k,
                          float out[X][R]) {
  const float* scale_of = e8m0_scales();
  const int64_t n_blocks = k / kMxBlock, row_bytes = k / 2;
  QVec acc[X][R];
#pragma GCC unroll 16
  for (int x = 0; x < X; ++x)
    for (int r = 0; r < R; ++r) acc[x][r] = qzero();
  for (int64_t b = 0; b < n_blocks; ++b) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = blocks + r * row_bytes + b * (kMxBlock / 2);
      if (b % 4 == 0) __builtin_prefetch(p + 512);  // a line (4 blocks) at a time, 8 lines ahead
      QVec v[kMxVecs];
      mxfp4_unpack(p, v);
      const QVec scale = qset(scale_of[scales[r * n_blocks + b]]);
#pragma GCC unroll 8
      for (int x = 0; x < X; ++x) {
        const float* xb = xs[x] + b * kMxBlock;
        QVec sum = qmul(v[0], qload(xb));
        for (int i = 1; i < kMxVecs; ++i) sum = qfma(v[i], qload(xb + i * kQLanes), sum);
        acc[x][r] = qfma(sum, scale, acc[x][r]);
      }
    }
  }
  for (int x = 0; x < X; ++x)
    for (int r = 0; r < R; ++r) out[x][r] = qsum(acc[x][r]);
}

// ys[x][j0 : j1] = xs[x] @ w[:, j0 : j1] for X rows of x, R outputs at a time (then one at a time).
template <int X>
inline void mxfp4_rows(const float* const* xs, float* const* ys, const uint8_t* blocks, const uint8_t* scales,
                       int64_t k, int64_t j0, int64_t j1) {
  const int64_t row_bytes = k / 2, row_scales = k / kMxBlock;
  int64_t j = j0;
  for (; j + kMxRows <= j1; j += kMxRows) {
    float out[X][kMxRows];
    mxfp4_outputs<kMxRows, X>(xs, blocks + j * row_bytes, scales + j * row_scales, k, out);
    for (int x = 0; x < X; ++x)
      for (int r = 0; r < kMxRows; ++r) ys[x][j + r] = out[x][r];
  }
  for (; j < j1; ++j) {
    float out[X][1];
    mxfp4_outputs<1, X>(xs, blocks + j * row_bytes, scales + j * row_scales, k, out);
    for (int x = 0; x < X; ++x) ys[x][j] = out[x][0];
  }
}

}  // namespace moecli
