// The bfloat16 matrix product behind csrc/grouped_gemm.cc on CPUs with AMX (Intel Sapphire Rapids
// and later), for bfloat16 weights.
//
// AMX (Advanced Matrix Extensions) adds eight "tile" registers of up to 16 rows x 64 bytes and an
// instruction, TDPBF16PS, that multiplies a 16 x 32 bfloat16 tile by a 32 x 16 one into a 16 x 16
// float32 tile: 8,192 multiply-adds, ~16x what AVX-512 does per instruction. The second operand
// must be in "VNNI" layout: each of its 16 rows holds pairs (k, k + 1) of one column side by side.
// Here a 32 x 32 block of C lives in four tiles, fed by two A tiles (the tokens' rows, packed as
// bfloat16 rows padded to 32 columns) and two B tiles (the weights, packed in VNNI layout once per
// column block). Products accumulate in float32; activations are rounded to bfloat16 first, as a
// bfloat16 model's activations already are.
// Linux hands out AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM), once per process.
#pragma once

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define MOECLI_HAS_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "common.h"
#include "gemm_dpbf16.h"  // to_bfloat16, pack_pairs

namespace moecli {

// Whether this build and this process may use AMX (asks the kernel once).
inline bool amx_ready() {
#ifdef MOECLI_HAS_AMX
  static const bool ready = [] {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

struct AmxEngine {
  static constexpr int kRows = 16;       // rows per sliver: one A tile
  static constexpr int64_t kCols = 128;  // columns packed per work item, at most (the caller's kNC)
  static constexpr int64_t kExpertCols = kCols;
  using A = uint16_t;
  static int64_t row_size(int64_t K) { return (K + 31) / 32 * 32; }  // packed A: K padded to whole tiles

  // One sliver: 16 rows (nullptr = a zero row) as bfloat16 rows of row_size(K).
  static void pack(const float* const* rows, int64_t K, A* out) {
    const int64_t kp = row_size(K);
    for (int i = 0; i < kRows; ++i, out += kp) {
      int64_t k = 0;
#ifdef MOECLI_HAS_AMX
      for (; rows[i] && k + 16 <= K; k += 16)  // 16 at a time, rounding to nearest even
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(rows[i] + k))));
#endif
      for (; k < kp; ++k) out[k] = rows[i] && k < K ? to_bfloat16(rows[i][k]) : 0;
    }
  }

#ifdef MOECLI_HAS_AMX
  // C[:, n0:n0+width] = A @ w[:, n0:n0+width] for `slivers` packed slivers, w [K, N] bfloat16
  // (or quantized: QuantWeights, dequantized by csrc/quant_pack.h's pack_pairs), width <= kCols.
  template <typename Weights>
  static void gemm(const A* a, int64_t slivers, int64_t K, Weights w, int64_t N, int64_t n0, int64_t width, float* c,
                   int64_t ldc) {
    width = std::min({width, kCols, N - n0});
    const int64_t kp = row_size(K), groups = (width + 15) / 16;  // 16-column B tiles
    uint16_t* b = static_cast<uint16_t*>(thread_buffer<AmxEngine>(kp * kCols * sizeof(uint16_t)));
    // B in VNNI layout, [groups][kp / 2][16 columns][2] (gemm_dpbf16.h): group g is one B tile.
    pack_pairs(w, N, K, 0, kp / 2, n0, width, groups, b);
    configure_tiles();
    for (int64_t r = 0; r < slivers; r += 2)
      for (int64_t g = 0; g < groups; g += 2) {
        const A* rows = a + r * kRows * kp;
        const uint16_t* cols = b + g * (kp / 2) * 32;
        float* out = c + r * kRows * ldc + n0 + 16 * g;
        const bool two_rows = r + 1 < slivers, two_cols = g + 1 < groups;
        if (two_rows && two_cols) tiles<2, 2>(rows, cols, kp, out, ldc);
        else if (two_rows) tiles<2, 1>(rows, cols, kp, out, ldc);
        else if (two_cols) tiles<1, 2>(rows, cols, kp, out, ldc);
        else tiles<1, 1>(rows, cols, kp, out, ldc);
      }
    _tile_release();
  }

 private:
  struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
  };

  // Tiles 0-3: C (16 x 16 float32), 4-5: A (16 x 32 bfloat16), 6-7: B (16 pairs x 16 columns).
  static void configure_tiles() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
  }

  // C[16 R, 16 G] = A rows @ B columns over kp (R A tiles x G B tiles; tile numbers are immediates).
  template <int R, int G>
  static void tiles(const A* a, const uint16_t* b, int64_t kp, float* c, int64_t ldc) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < kp; k += 32) {
      _tile_loadd(4, a + k, kp * 2);
      _tile_loadd(6, b + k / 2 * 32, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (G == 2) {
        _tile_loadd(7, b + (kp / 2 + k / 2) * 32, 64);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (R == 2) {
        _tile_loadd(5, a + kRows * kp + k, kp * 2);
        _tile_dpbf16ps(2, 5, 6);
        if (G == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, c, ldc * 4);
    if (G == 2) _tile_stored(1, c + 16, ldc * 4);
    if (R == 2) _tile_stored(2, c + kRows * ldc, ldc * 4);
    if (R == 2 && G == 2) _tile_stored(3, c + kRows * ldc + 16, ldc * 4);
  }
#else
  template <typename Weights>
  static void gemm(const A*, int64_t, int64_t, Weights, int64_t, int64_t, int64_t, float*, int64_t) {
    std::abort();
  }
#endif
};

}  // namespace moecli
