// Helpers shared by moecli's CPU kernels (cpu_kernels.cc: decoding, grouped_gemm.cc: prefill).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace moecli {

namespace ffi = xla::ffi;

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {  // bfloat16 is the top half of a float32
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Runs fn(item) for every item in [0, n): the calling thread and up to pool.num_threads() - 1 pool
// threads (one worker per core: the caller is not a pool thread) take items from a shared counter;
// returns when all items are done.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> running{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) fn(i);
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  state->running = helpers;
  for (int64_t h = 0; h < helpers; ++h)
    pool.Schedule([state, work] { work(); state->running.fetch_sub(1); });
  work();
  while (state->running.load() > 0) std::this_thread::yield();  // helpers may still hold `fn`
}

}  // namespace moecli
