// Block-FP8 weights (DeepSeek-V3 / Qwen3-FP8 experts, moecli/model/fp8.py) as the CPU kernels read
// them: the inner loop of csrc/fp8.cc's moecli_expert_matvec_fp8, on AVX-512, AVX2 (+F16C) or any CPU.
//
// The layout, the checkpoint's own: a matrix [k, n] in moecli's [in, out] convention is stored
// output-major, so output j is one dot product over contiguous bytes:
//   weight uint8 [n, k]:                     output j's float8_e4m3fn codes, inputs in order;
//   scale float32 [ceil(n / bo), ceil(k / bi)]: one factor per (bo outputs x bi inputs) block, the
//                                            last block row and column possibly partial.
//
// Unpacking, exact and without a table: an e4m3 byte b (sign, 4 exponent bits of bias 7, 3 mantissa
// bits) has the float16 bits ((b & 0x80) << 8) | ((b & 0x7f) << 7): the same sign, exponent and
// mantissa bits in float16's wider fields, whose bias is 15, so the float16 is b's value times 2^-8,
// normals and subnormals alike (NaN, 0x7f and 0xff, never occurs in a weight). Vectors build those
// bits by sign-extending the byte to 16 bits, shifting left by 7 and masking with 0xbf80 (bit 14 is
// a copy of the sign), then convert 16 (AVX-512) or 8 (F16C) of them to float32 at once; the 2^8 is
// put back once an output, on its sum (a power of two: exact).
//
// The loop, per output j: for each input block, the codes times x summed in a vector (one
// multiply-add a weight), the block's sum scaled once by its factor into the output's accumulator
// (one multiply-add a block); a block's inputs past its last whole vector (a partial block, or a
// block size that is no multiple of the vector) go through a 256-entry table, scalar. R outputs at
// a time, interleaved vector by vector (independent chains, and x loaded once for all of them), for
// X rows of x (a prompt's tokens on one expert: the weights read once for all of them).
//
// Speed: the conversion costs two shuffle-port operations a vector (the widening and half of
// vcvtph2ps) where bfloat16's widening costs one, so with few cores a matrix in cache streams at
// ~15 G weights/s (2 cores of an AMX-era Xeon VM, AVX-512), below bfloat16's memory-bound rate there;
// the bytes are half, so the more cores share the memory bus, the more that wins.
//
// Accuracy: every code times x is exact in float32 (a code has 4 significant bits), the sums round
// once a lane: float32's level, as the dequantize-then-multiply reference (tests/test_fp8_kernels.py).
#pragma once

#include <algorithm>
#include <cstdint>

#include "quant_unpack.h"

namespace moecli {

constexpr int kFp8Rows = 4;  // the most outputs a row kernel takes at a time (fp8_rows_for)

// Every e4m3 code's value times 2^-8, as the vector paths produce it (the scalar tails and the
// generic CPU's loop).
struct E4m3Table {
  float value[256];
  E4m3Table() {
    for (int b = 0; b < 256; ++b) value[b] = half_to_float(uint16_t(((b & 0x80) << 8) | ((b & 0x7f) << 7)));
  }
};
inline const float* e4m3_values() {
  static const E4m3Table table;
  return table.value;
}

// kQLanes codes at p as floats, each its value times 2^-8.
#if defined(__AVX512F__)
inline QVec fp8_load(const uint8_t* p) {
  const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i bits = _mm256_and_si256(_mm256_slli_epi16(wide, 7), _mm256_set1_epi16(int16_t(0xbf80)));
  return _mm512_cvtph_ps(bits);
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline QVec fp8_load(const uint8_t* p) {
  const __m128i wide = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i bits = _mm_and_si128(_mm_slli_epi16(wide, 7), _mm_set1_epi16(int16_t(0xbf80)));
  return _mm256_cvtph_ps(bits);
}
#else
inline QVec fp8_load(const uint8_t* p) {
  const float* table = e4m3_values();
  QVec v;
  for (int i = 0; i < kQLanes; ++i) v[i] = table[p[i]];
  return v;
}
#endif

// One matrix's shape and blocks: k inputs a row, blocks of bo outputs x bi inputs.
struct Fp8Shape {
  int64_t k, bo, bi;
  int64_t col_blocks() const { return (k + bi - 1) / bi; }
};

// Outputs at a time for X rows of x: R * X block sums and as many accumulators in registers (AVX-512:
// at most 16 + 16 of 32; AVX2 at most 8 + 8 of 16), R rows interleaved so that R * X multiply-add
// chains run at once (one chain waits out the multiply-add's latency every vector).
constexpr int fp8_rows_for(int x) { return kQLanes == 16 ? (x <= 2 ? 4 : x <= 4 ? 2 : 1) : (x == 1 ? 4 : x == 2 ? 2 : 1); }

// out[x][r] = x_x @ w[:, j + r] for R outputs j.. and X rows of x: `weight` points at output j's row
// of codes, `scale` at the matrix's block grid.
template <int R, int X>
inline void fp8_outputs(const float* const* xs, const uint8_t* weight, const float* scale, int64_t j, Fp8Shape s,
                        float out[X][R]) {
  const float* table = e4m3_values();
  const float* scale_row[R];
  for (int r = 0; r < R; ++r) scale_row[r] = scale + (j + r) / s.bo * s.col_blocks();
  QVec acc[X][R];
  float tail_acc[X][R];
#pragma GCC unroll 16
  for (int x = 0; x < X; ++x)
    for (int r = 0; r < R; ++r) acc[x][r] = qzero(), tail_acc[x][r] = 0.f;
  for (int64_t b0 = 0, c = 0; b0 < s.k; b0 += s.bi, ++c) {
    const int64_t len = std::min(s.bi, s.k - b0), whole = len / kQLanes * kQLanes;
    const uint8_t* p[R];
    QVec sum[X][R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      p[r] = weight + r * s.k + b0;
      for (int64_t line = 0; line < len; line += 64) __builtin_prefetch(p[r] + line + 1024);  // 16 lines ahead
      for (int x = 0; x < X; ++x) sum[x][r] = qzero();
    }
    for (int64_t i = 0; i < whole; i += kQLanes) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const QVec v = fp8_load(p[r] + i);
#pragma GCC unroll 8
        for (int x = 0; x < X; ++x) sum[x][r] = qfma(v, qload(xs[x] + b0 + i), sum[x][r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float factor = scale_row[r][c];
      for (int64_t i = whole; i < len; ++i)
        for (int x = 0; x < X; ++x) tail_acc[x][r] += table[p[r][i]] * xs[x][b0 + i] * factor;
      for (int x = 0; x < X; ++x) acc[x][r] = qfma(sum[x][r], qset(factor), acc[x][r]);
    }
  }
  for (int x = 0; x < X; ++x)
    for (int r = 0; r < R; ++r) out[x][r] = (qsum(acc[x][r]) + tail_acc[x][r]) * 256.f;
}

// ys[x][j0 : j1] = xs[x] @ w[:, j0 : j1] for X rows of x, fp8_rows_for(X) outputs at a time (then one at a time).
template <int X>
inline void fp8_rows(const float* const* xs, float* const* ys, const uint8_t* weight, const float* scale, Fp8Shape s,
                     int64_t j0, int64_t j1) {
  constexpr int R = fp8_rows_for(X);
  int64_t j = j0;
  for (; j + R <= j1; j += R) {
    float out[X][R];
    fp8_outputs<R, X>(xs, weight + j * s.k, scale, j, s, out);
    for (int x = 0; x < X; ++x)
      for (int r = 0; r < R; ++r) ys[x][j + r] = out[x][r];
  }
  for (; j < j1; ++j) {
    float out[X][1];
    fp8_outputs<1, X>(xs, weight + j * s.k, scale, j, s, out);
    for (int x = 0; x < X; ++x) ys[x][j] = out[x][0];
  }
}

}  // namespace moecli
