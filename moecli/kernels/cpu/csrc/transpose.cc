// Loading helper (called from moecli/placement.py through ctypes, not from XLA): the transposed
// copy that turns a checkpoint's [out, in] weights into moecli's [in, out].
//
// Why: numpy copies a transposed view element by element along the destination's rows, so every
// read lands on a different cache line of the source: ~1 GB/s on the development VM, 6.5 of the
// 12.8 s it took to load a 5.3 GB float32 checkpoint. Here square tiles are copied so each cache
// line read or written is used whole, on every core (one core alone is bound by memory latency:
// ~2 GB/s; two reach ~3.9 GB/s); bfloat16 sources can be widened to float32 on the way.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kTile = 64;  // 32-128 measured alike

inline float convert(float v, float*) { return v; }
inline uint16_t convert(uint16_t v, uint16_t*) { return v; }             // bfloat16 bits, unchanged
inline float convert(uint16_t v, float*) { return moecli::to_float(v); }  // bfloat16 -> float32

// dst[b] = src[b]^T for every matrix b; a work item is kTile source rows of one matrix.
template <typename S, typename D>
void transpose(const S* src, D* dst, int64_t batch, int64_t rows, int64_t cols) {
  const int64_t row_tiles = (rows + kTile - 1) / kTile, items = batch * row_tiles;
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < items;) {
      const int64_t b = i / row_tiles, r0 = (i % row_tiles) * kTile, r1 = std::min(rows, r0 + kTile);
      const S* s = src + b * rows * cols;
      D* d = dst + b * rows * cols;
      for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
        const int64_t c1 = std::min(cols, c0 + kTile);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) d[c * rows + r] = convert(s[r * cols + c], d);
      }
    }
  };
  std::vector<std::thread> helpers;  // loading runs outside XLA: no thread pool to borrow
  const int64_t threads = std::min<int64_t>({std::max(1u, std::thread::hardware_concurrency()), 8, items});
  for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(work);
  work();
  for (auto& h : helpers) h.join();
}

}  // namespace

// dst [batch, cols, rows] = src [batch, rows, cols] transposed, both contiguous. kind: 0 float32 ->
// float32, 1 bfloat16 -> bfloat16 (moved as raw 16-bit words), 2 bfloat16 -> float32. 0 on success.
extern "C" int MoecliTranspose(const void* src, void* dst, int64_t batch, int64_t rows, int64_t cols, int kind) {
  switch (kind) {
    case 0: transpose(static_cast<const float*>(src), static_cast<float*>(dst), batch, rows, cols); return 0;
    case 1: transpose(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), batch, rows, cols); return 0;
    case 2: transpose(static_cast<const uint16_t*>(src), static_cast<float*>(dst), batch, rows, cols); return 0;
    default: return 1;
  }
}
