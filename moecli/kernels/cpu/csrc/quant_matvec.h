// The decoding loop of quantized weights (csrc/cpu_kernels.cc's moecli_matvec_q and
// moecli_experts_q): out[r, :] += x[r, k0:k1] @ w[k0:k1, :] for a few rows r, reading each packed
// byte and each scale once, in place.
//
// One group (G rows sharing a scale row) at a time, across all the columns: for each block of
// columns, the sums over the group's rows of x[r, k] * q[k, j] are kept in registers (unscaled)
// and multiplied by the scales once, at the end of the group: one fused multiply-add a weight and
// row of x, plus one a group, where scaling every weight first costs a multiply a weight (and a
// scale load a vector and row). The group's G rows (G / 2 byte rows in q4) are G streams of
// memory read side by side, a block of 64-128 bytes of each at a time, with software prefetches
// ahead (prefetch_block): the many streams in flight that the float32 / bfloat16 loop gets from
// its sixteen stretches (common.h, accumulate).
//
// Accuracy: every product x * q rounds once in float32 (q is a small integer), sums run over at
// most G terms before one multiply by the scale, then add into float32 partial sums as the
// float32 kernel's do. q4 adds two roundings of its own: the offset of 8 is taken off once a
// group (sum x * (nibble - 8) = sum x * nibble - 8 * sum x: an operation a weight saved, for a
// little cancellation), and x is folded so that no shift splits the nibbles (group_inputs). Both
// stay at float32's level: ~5e-7 of the largest output at most, tests/test_quant_kernels.py.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "quant_unpack.h"

namespace moecli {

// Vectors of columns per block of the R-row loop: R * V sums in registers (AVX-512: at most 16
// of 32; AVX2: at most 8 of 16), and at least four independent sums (one chain of dependent FMAs
// runs at a quarter of the speed). A block of q is V * kQLanes bytes of a row: with AVX-512, 128
// (two cache lines) for one or two rows of x measured as fast as 64 or up to ~10% faster, 256
// ~10% slower (streaming from memory, one row).
constexpr int quant_block_vectors(int R) {
  if (kQLanes == 16) return R <= 2 ? 8 : 4;
  return R == 1 ? 8 : R == 2 ? 4 : 2;
}

// The group's G rows are G streams of memory read a block at a time, which the hardware
// prefetcher follows badly, so each block asks for (prefetches) two sets of lines as it is read:
//   - kQuantPrefetch bytes further along its own row, into L1 (192 measured best of 0-2048:
//     0 was ~35% slower, 512 and more slower again);
//   - the same columns one group down (the next group's rows, read after this group's), into
//     L2: +10-25% on top, more with short rows (a 1024 x 512 expert: rows of 512 bytes), where
//     every group starts new streams.
constexpr int64_t kQuantPrefetch = 192;

// The prefetches for a block of `bytes` bytes at q, the next group's rows `group_bytes` further on.
template <typename Byte>
inline void prefetch_block(const Byte* q, int64_t bytes, int64_t group_bytes) {
  for (int64_t line = 0; line < bytes; line += 64) {
    __builtin_prefetch(q + line + kQuantPrefetch);
    __builtin_prefetch(q + line + group_bytes, 0, 2);
  }
}

// out[r, j : j + V * kQLanes] += x[r, g0 : g0 + G] @ w[g0 : g0 + G, same columns] for one group
// starting at row g0, whose scales start at scale_row. xg: the group's x, rows `xg_stride` apart;
// in q4, as group_inputs() makes it. xsum[r] = sum of x[r, g0 : g0 + G] (q4's offset).
template <int R, int V, bool Q4>
inline void group_block(const float* __restrict xg, int64_t xg_stride, QuantWeights<Q4> w, int64_t ldw, int64_t g0,
                        const uint16_t* scale_row, int64_t j, const float* xsum, float* __restrict out, int64_t n) {
  QVec acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = qzero();
  if constexpr (Q4) {
    const uint8_t* q = w.q + (g0 >> 1) * ldw + j;
    for (int64_t k = 0; k < w.group; k += 2, q += ldw) {  // one byte row: rows g0 + k and g0 + k + 1
      prefetch_block(q, V * kQLanes, w.group / 2 * ldw);
      QVec lo[V], whole[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) q4_load_bytes(q + v * kQLanes, lo[v], whole[v]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const QVec a = qset(xg[r * xg_stride + k]), b = qset(xg[r * xg_stride + k + 1]);
        for (int v = 0; v < V; ++v) acc[r][v] = qfma(b, whole[v], qfma(a, lo[v], acc[r][v]));
      }
    }
  } else {
    const int8_t* q = w.q + g0 * ldw + j;
    for (int64_t k = 0; k < w.group; ++k, q += ldw) {
      prefetch_block(q, V * kQLanes, w.group * ldw);
      QVec wv[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) wv[v] = q8_load(q + v * kQLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const QVec a = qset(xg[r * xg_stride + k]);
        for (int v = 0; v < V; ++v) acc[r][v] = qfma(a, wv[v], acc[r][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    const QVec scale = scale_load(scale_row + j + v * kQLanes);
    for (int r = 0; r < R; ++r) {
      float* o = out + r * n + j + v * kQLanes;
      const QVec sum = Q4 ? qsub(acc[r][v], qset(8.f * xsum[r])) : acc[r][v];
      qstore(o, qfma(scale, sum, qload(o)));
    }
  }
}

// q4's inputs for one group: xg[r, k], rows G apart, the pair (k, k + 1) of x[r, g0 + k] as
// (x0 - x1 / 16, x1 / 16): with a byte whole = lo + 16 hi, x0 lo + x1 hi = (x0 - x1 / 16) lo +
// (x1 / 16) whole, so the loop needs no shift to take the high nibbles apart (one rounding more,
// of x0 - x1 / 16: ~1e-7). Made once a group, for all its columns.
template <int R>
inline void group_inputs(const float* x, int64_t x_stride, int64_t g0, int64_t G, float* xg) {
  for (int r = 0; r < R; ++r)
    for (int64_t k = 0; k < G; k += 2) {
      const float x1 = x[r * x_stride + g0 + k + 1] * (1.f / 16);
      xg[r * G + k] = x[r * x_stride + g0 + k] - x1;
      xg[r * G + k + 1] = x1;
    }
}

// out[r, :n] += x[r, k0:k1] @ w[k0:k1, :n] for R rows; k0 and k1 are whole groups.
template <int R, bool Q4>
void accumulate_quantized(const float* x, int64_t x_stride, QuantWeights<Q4> w, int64_t ldw, int64_t k0, int64_t k1,
                          int64_t n, float* out) {
  constexpr int V = quant_block_vectors(R);
  const int64_t G = w.group, blocks_end = n / (V * kQLanes) * (V * kQLanes), vectors_end = n / kQLanes * kQLanes;
  struct GroupInputs;
  float* xq4 = Q4 ? static_cast<float*>(thread_buffer<GroupInputs>(R * G * sizeof(float))) : nullptr;
  for (int64_t g0 = k0; g0 < k1; g0 += G) {
    float xsum[R] = {};
    if constexpr (Q4) {
      for (int r = 0; r < R; ++r)
        for (int64_t k = g0; k < g0 + G; ++k) xsum[r] += x[r * x_stride + k];
      group_inputs<R>(x, x_stride, g0, G, xq4);
    }
    const float* xg = Q4 ? xq4 : x + g0;
    const int64_t xg_stride = Q4 ? G : x_stride;
    const uint16_t* scale_row = w.scale + g0 / G * ldw;
    int64_t j = 0;
    for (; j < blocks_end; j += V * kQLanes) group_block<R, V>(xg, xg_stride, w, ldw, g0, scale_row, j, xsum, out, n);
    for (; j < vectors_end; j += kQLanes) group_block<R, 1>(xg, xg_stride, w, ldw, g0, scale_row, j, xsum, out, n);
    for (; j < n; ++j) {  // the columns past the last whole vector
      const float scale = half_to_float(scale_row[j]);
      for (int r = 0; r < R; ++r) {
        float sum = 0.f;
        for (int64_t k = g0; k < g0 + G; ++k) sum += x[r * x_stride + k] * quantized_value(w, ldw, k, j);
        out[r * n + j] += scale * sum;
      }
    }
  }
}


// common.h's accumulate_rows for quantized weights: any number of rows, up to 4 a pass.
template <bool Q4>
inline void accumulate_rows(const float* x, int64_t x_stride, int64_t rows, QuantWeights<Q4> w, int64_t ldw, int64_t k0,
                            int64_t k1, int64_t n, float* out) {
  for (int64_t r = 0; r < rows; r += 4) {
    const float* xr = x + r * x_stride;
    float* o = out + r * n;
    switch (std::min<int64_t>(4, rows - r)) {
      case 1: accumulate_quantized<1>(xr, x_stride, w, ldw, k0, k1, n, o); break;
      case 2: accumulate_quantized<2>(xr, x_stride, w, ldw, k0, k1, n, o); break;
      case 3: accumulate_quantized<3>(xr, x_stride, w, ldw, k0, k1, n, o); break;
      default: accumulate_quantized<4>(xr, x_stride, w, ldw, k0, k1, n, o);
    }
  }
}

// Rows of w a work item's block of rows is a multiple of (common.h's for float32 / bfloat16):
// whole groups.
template <bool Q4>
inline int64_t row_step(QuantWeights<Q4> w) {
  return w.group;
}

}  // namespace moecli
