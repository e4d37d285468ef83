// The gathered expert matrix-vector product's work plan, shared by the packed kernels that compute
// y[a] = x[a] @ W[expert_ids[a]] for every assignment a (csrc/mxfp4.cc: MXFP4, csrc/fp8.cc: block-FP8).
//
// Assignments are grouped by expert (a counting sort; out-of-range ids: another device's experts,
// their rows left 0); each (expert, span of outputs) is a work item on XLA's thread pool, so every
// byte of a chosen expert is read from memory once a call, whatever the number of its tokens; within
// an item, `cache_rows` outputs at a time (their bytes in L2) serve the expert's tokens `chunk` (at
// most kGatherTokens) at a time. Spans are split so there are ~4 items a thread (fewer when the outputs run out).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace moecli {

constexpr int kGatherTokens = 8;  // rows of x a row kernel takes at a time, at most

// The assignments of each expert in [0, n_experts): order[start[e] .. start[e + 1]) are expert e's,
// and `used` the experts with any.
struct ExpertGroups {
  std::vector<int64_t> start, order, used;

  ExpertGroups(const int32_t* expert, int64_t n, int64_t n_experts) : start(n_experts + 1, 0) {
    for (int64_t a = 0; a < n; ++a)
      if (expert[a] >= 0 && expert[a] < n_experts) ++start[expert[a] + 1];
    for (int64_t e = 0; e < n_experts; ++e) start[e + 1] += start[e];
    order.resize(start[n_experts]);
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < n; ++a)
      if (expert[a] >= 0 && expert[a] < n_experts) order[next[expert[a]]++] = a;
    for (int64_t e = 0; e < n_experts; ++e)
      if (start[e + 1] > start[e]) used.push_back(e);
  }
};

// rows(e, count, assignments, j0, j1) for every chosen expert e, every chunk of outputs [j0, j1) of
// its m and every chunk of 1..`chunk` of its assignments (their indices), in parallel over
// (expert, span) items; spans are multiples of `row_step` outputs.
template <typename Rows>
void for_each_expert_chunk(ffi::ThreadPool& pool, const ExpertGroups& groups, int64_t m, int64_t row_step,
                           int64_t cache_rows, int64_t chunk, Rows rows) {
  if (groups.used.empty()) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads()), count = groups.used.size();
  const int64_t splits = std::clamp<int64_t>((4 * threads + count - 1) / count, 1, (m + row_step - 1) / row_step);
  const int64_t span = round_up((m + splits - 1) / splits, row_step);
  cache_rows = std::max<int64_t>(row_step, round_up(cache_rows, row_step));
  parallel_for(pool, count * splits, [&](int64_t item) {
    const int64_t e = groups.used[item / splits], j0 = (item % splits) * span, j1 = std::min(m, j0 + span);
    for (int64_t c0 = j0; c0 < j1; c0 += cache_rows) {
      const int64_t c1 = std::min(j1, c0 + cache_rows);
      for (int64_t i = groups.start[e]; i < groups.start[e + 1]; i += chunk)
        rows(e, std::min<int64_t>(chunk, groups.start[e + 1] - i), groups.order.data() + i, c0, c1);
    }
  });
}

}  // namespace moecli
