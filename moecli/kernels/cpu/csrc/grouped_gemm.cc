// Prefill kernel for XLA:CPU: the MoE experts of a whole prompt as one grouped matrix product.
//
// Why: a prompt's tokens choose experts at run time, so expert e multiplies a run-time number of
// rows. XLA needs static shapes: the pure-JAX path (moe.experts_blocked) pads every expert's rows
// to 128-row blocks (~50% extra rows at a 512-token prompt) and runs a scan of small dots
// (measured ~48 GFLOP/s of useful work on 2 cores). Here each expert multiplies exactly its own
// rows (padded to the engine's sliver of 12 or 16 rows): the assignments are grouped by expert,
// the tokens' inputs packed once, then every (expert, column block) product is one work item on
// XLA's intra-op thread pool.
//
// Three engines do the products: float32 register tiles on any CPU (gemm_fp32.h; bfloat16 weights
// are widened as they are packed) and, for bfloat16 weights, AMX tiles where the CPU has them
// (gemm_amx.h), else AVX512-BF16 dot products where it has those (gemm_dpbf16.h). bf16_engine()
// picks one per process; MoecliSetBf16Cap (moecli/kernels/cpu/ffi.py passes MOECLI_CPU_BF16)
// caps the choice.
//
// Quantized weights (moecli_matmul_q, moecli_grouped_experts_q: int8 / int4 with float16 scales)
// take the same path as bfloat16 ones, dequantized as the engine packs them (csrc/quant_pack.h),
// with one difference: the engine is capped per call (the attribute engine_cap), because their
// activations may be float32 (a float32 model quantized), which AMX and AVX512-BF16 would round
// to bfloat16; moecli/kernels/cpu/ffi.py caps those calls at the float32 engine, so float32
// activations stay exact while bfloat16 ones keep the fastest engine.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "gemm_amx.h"
#include "gemm_dpbf16.h"
#include "gemm_fp32.h"
#include "quant_operands.h"
#include "quant_pack.h"

namespace {

using moecli::AmxEngine;
using moecli::data;
using moecli::Dpbf16Engine;
using moecli::Fp32Engine;
using moecli::parallel_for;
using moecli::round_up;
using moecli::Workspace;
namespace ffi = xla::ffi;
constexpr int64_t kNC = moecli::kNC;  // columns per work item of a dense product
// Rows of C scratch are padded by kPadC floats: rows a multiple of 4 KB apart (d = 1024 floats)
// map to one L1 cache set, so a register tile's 12 rows of loads and stores evict one another.
// Measured +2-3% on the grouped product and +3-5% on the dense one.
constexpr int64_t kPadC = 16;
static_assert(AmxEngine::kCols == kNC, "every engine fills the dense product's column blocks");

// The engine for bfloat16 weights, best first: 0 AMX, 1 AVX512-BF16, 2 float32 (widening). The
// CPU and this build decide what is there; a cap (MoecliSetBf16Cap: dpbf16 or float32) rules out
// the ones above it, for measuring and testing one engine against another. Chosen once, on first use.
enum Bf16Engine { kAmx, kDpbf16, kFp32 };
std::atomic<int> bf16_cap{kAmx};
std::atomic<bool> bf16_chosen{false};
Bf16Engine bf16_engine() {
  static const Bf16Engine engine = [] {
    bf16_chosen.store(true);
    const int cap = bf16_cap.load();
    if (cap == kAmx && moecli::amx_ready()) return kAmx;
#ifdef MOECLI_HAS_DPBF16
    if (cap <= kDpbf16) return kDpbf16;
#endif
    return kFp32;
  }();
  return engine;
}

// run(E{}): the kernel body with the engine E for bfloat16 (or quantized) weights: bf16_engine(),
// or the best below it that `cap` (a Bf16Engine, per call) allows.
template <typename Run>
ffi::Error with_bf16_engine(Run run, int64_t cap = kAmx) {
  switch (std::max<int64_t>(bf16_engine(), cap)) {
    case kAmx: return run(AmxEngine{});
    case kDpbf16: return run(Dpbf16Engine{});
    default: return run(Fp32Engine{});
  }
}

// run(W{}, E{}): the kernel body for weights of dtype `weights` (W: float or uint16_t for
// bfloat16) and the engine E that multiplies them.
template <typename Run>
ffi::Error with_engine(ffi::DataType weights, Run run) {
  if (weights != ffi::BF16) return run(float{}, Fp32Engine{});
  return with_bf16_engine([&](auto engine) { return run(uint16_t{}, engine); });
}

// y[t] = sum over the token's assignments a of weight[a] * SwiGLU_e(x[t]), e = expert[a], for a
// prompt's worth of tokens; ids outside [0, n_experts) (another device's experts) are skipped.
// The weights (`const W*` or QuantWeights): stacks of n_experts matrices, [d, f] (wg, wu), [f, d] (wd).
template <typename E, typename Weights>
ffi::Error GroupedExpertsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer experts, ffi::AnyBuffer gates,
                              Weights wg, Weights wu, Weights wd, int64_t n_experts, int64_t f, ffi::AnyBuffer y) {
  constexpr int R = E::kRows;
  const int64_t tokens = x.dimensions()[0], d = x.dimensions()[1], top_k = experts.dimensions()[1];
  const int64_t n = tokens * top_k;
  const int32_t* expert = data<const int32_t>(experts);
  const float *xs = data<const float>(x), *gate = data<const float>(gates);

  // 1. Group the assignments by expert: expert e owns slivers first[e]..first[e + 1] (R rows each).
  std::vector<int64_t> count(n_experts, 0), first(n_experts + 1, 0), row_of(n, -1);
  for (int64_t i = 0; i < n; ++i)
    if (expert[i] >= 0 && expert[i] < n_experts) ++count[expert[i]];
  for (int64_t e = 0; e < n_experts; ++e) first[e + 1] = first[e] + (count[e] + R - 1) / R;
  const int64_t slivers = first[n_experts], rows = slivers * R;
  std::vector<const float*> row_x(rows, nullptr);  // each row's token (nullptr: padding)
  std::fill(count.begin(), count.end(), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = expert[i];
    if (e < 0 || e >= n_experts) continue;
    row_of[i] = first[e] * R + count[e]++;
    row_x[row_of[i]] = xs + (i / top_k) * d;
  }

  // Work items go to the threads in order, largest experts first, so the last ones are small.
  std::vector<int64_t> by_size(n_experts);
  for (int64_t e = 0; e < n_experts; ++e) by_size[e] = e;
  std::stable_sort(by_size.begin(), by_size.end(),
                   [&](int64_t a, int64_t b) { return first[a + 1] - first[a] > first[b + 1] - first[b]; });

  // 2. Pack the tokens' inputs as A slivers (packed rows of E::row_size(d) elements).
  constexpr int64_t cols = E::kExpertCols;  // columns per work item
  const int64_t fp = round_up(f, 32) + kPadC, f_blocks = (f + cols - 1) / cols, kd = E::row_size(d);
  const int64_t dp = round_up(d, 32) + kPadC, d_blocks = (d + cols - 1) / cols, kf = E::row_size(f);
  const int64_t a_floats = sizeof(typename E::A) * rows * std::max(kd, kf) / sizeof(float);
  Workspace work(2 * round_up(a_floats, 16) + 2 * round_up(rows * fp, 16) + round_up(rows * dp, 16));
  auto *ax = reinterpret_cast<typename E::A*>(work.take(a_floats)),
       *ah = reinterpret_cast<typename E::A*>(work.take(a_floats));
  float *hg = work.take(rows * fp), *hu = work.take(rows * fp), *yd = work.take(rows * dp);
  parallel_for(pool, slivers, [&](int64_t s) { E::pack(&row_x[s * R], d, ax + s * R * kd); });

  // 3. gate and up projections, work items (expert, gate or up, column block); then
  // hidden = silu(gate) * up, packed as the A slivers of the down projection.
  parallel_for(pool, n_experts * 2 * f_blocks, [&](int64_t item) {
    const int64_t e = by_size[item / (2 * f_blocks)], up = (item / f_blocks) % 2, n0 = (item % f_blocks) * cols;
    if (first[e + 1] == first[e]) return;
    E::gemm(ax + first[e] * R * kd, first[e + 1] - first[e], d, (up ? wu : wg) + e * d * f, f, n0, cols,
            (up ? hu : hg) + first[e] * R * fp, fp);
  });
  parallel_for(pool, slivers, [&](int64_t s) {
    const float* hidden[R];
    for (int i = 0; i < R; ++i) {  // rows are padded to fp, a multiple of 16 columns
      float *g = hg + (s * R + i) * fp, *u = hu + (s * R + i) * fp;
      for (int64_t k = 0; k < f; k += 16) {
        const moecli::Vec16 gk = moecli::load16(g + k), silu = gk / (1.f + moecli::exp16(-gk));
        const moecli::Vec16 h = silu * moecli::load16(u + k);
        std::memcpy(g + k, &h, sizeof h);
      }
      hidden[i] = g;
    }
    E::pack(hidden, f, ah + s * R * kf);
  });

  // 4. Down projection, work items (expert, column block).
  parallel_for(pool, n_experts * d_blocks, [&](int64_t item) {
    const int64_t e = by_size[item / d_blocks], n0 = (item % d_blocks) * cols;
    if (first[e + 1] == first[e]) return;
    E::gemm(ah + first[e] * R * kf, first[e + 1] - first[e], f, wd + e * f * d, d, n0, cols, yd + first[e] * R * dp,
            dp);
  });

  // 5. y[t] = the gate-weighted sum of its assignments' rows, in assignment order.
  float* out = data<float>(y);
  parallel_for(pool, tokens, [&](int64_t t) {
    float* yt = out + t * d;
    std::fill(yt, yt + d, 0.f);
    for (int64_t i = t * top_k; i < (t + 1) * top_k; ++i) {
      if (row_of[i] < 0) continue;
      const float* row = yd + row_of[i] * dp;
      for (int64_t j = 0; j < d; ++j) yt[j] += gate[i] * row[j];
    }
  });
  return ffi::Error::Success();
}

ffi::Error GroupedExperts(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer experts, ffi::AnyBuffer gates,
                          ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                          ffi::Result<ffi::AnyBuffer> y) {
  if (ffi::Error error = moecli::check_experts("moecli_grouped_experts", x, experts, gates, w_gate, w_up, w_down, *y);
      error.failure())
    return error;
  return with_engine(w_gate.element_type(), [&](auto w, auto engine) {
    using W = decltype(w);
    return GroupedExpertsImpl<decltype(engine)>(pool, x, experts, gates, data<const W>(w_gate), data<const W>(w_up),
                                                data<const W>(w_down), w_gate.dimensions()[0], w_gate.dimensions()[2],
                                                *y);
  });
}

// The per-call engine cap of the quantized prompt kernels (see the top of this file): a Bf16Engine.
ffi::Error check_engine_cap(const char* kernel, int64_t cap) {
  if (cap >= kAmx && cap <= kFp32) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(kernel) + ": engine_cap " + std::to_string(cap) +
                                     " is not 0 (amx), 1 (dpbf16) or 2 (float32)");
}

ffi::Error GroupedExpertsQ(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer experts, ffi::AnyBuffer gates,
                           ffi::AnyBuffer gate_q, ffi::AnyBuffer gate_s, ffi::AnyBuffer up_q, ffi::AnyBuffer up_s,
                           ffi::AnyBuffer down_q, ffi::AnyBuffer down_s, ffi::Result<ffi::AnyBuffer> y,
                           int64_t engine_cap) {
  if (ffi::Error error = moecli::check_quantized_experts("moecli_grouped_experts_q", x, experts, gates, gate_q, gate_s,
                                                         up_q, up_s, down_q, down_s, *y);
      error.failure())
    return error;
  if (ffi::Error error = check_engine_cap("moecli_grouped_experts_q", engine_cap); error.failure()) return error;
  return moecli::with_quantized_experts(
      x, gate_q, gate_s, up_q, up_s, down_q, down_s, [&](auto wg, auto wu, auto wd, int64_t n_experts, int64_t f) {
        return with_bf16_engine(
            [&](auto engine) {
              return GroupedExpertsImpl<decltype(engine)>(pool, x, experts, gates, wg, wu, wd, n_experts, f, *y);
            },
            engine_cap);
      });
}

// y[m, N] = x[m, K] @ w[K, N] for a prompt's rows. XLA:CPU's own dots reach ~100 GFLOP/s in
// float32 on the 2-core development VM, and run bfloat16 at float32 speed or below; this engine
// ~140 in float32 and, with bfloat16 weights on AMX or AVX512-BF16, ~2x that (BENCHMARKS.md).
// Work items: (row block, column block), with as few row blocks as keep every thread busy (each
// packs its column block of w again); each copies its block of C to y while it is still in cache.
template <typename E, typename Weights>
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, Weights ws, int64_t N, ffi::AnyBuffer y) {
  const int64_t m = x.dimensions()[0], K = x.dimensions()[1];
  const int64_t slivers = (m + E::kRows - 1) / E::kRows, kk = E::row_size(K), np = round_up(N, 32) + kPadC;
  const int64_t col_blocks = (N + kNC - 1) / kNC;
  const int64_t row_blocks = std::min(slivers, (2 * pool.num_threads() + col_blocks - 1) / col_blocks);
  const int64_t per_block = (slivers + row_blocks - 1) / row_blocks;
  const int64_t a_floats = sizeof(typename E::A) * slivers * E::kRows * kk / sizeof(float);
  Workspace work(round_up(a_floats, 16) + slivers * E::kRows * np);
  auto* a = reinterpret_cast<typename E::A*>(work.take(a_floats));
  float* c = work.take(slivers * E::kRows * np);
  const float* xs = data<const float>(x);
  float* out = data<float>(y);
  parallel_for(pool, slivers, [&](int64_t s) {
    const float* rows[E::kRows];
    for (int i = 0; i < E::kRows; ++i) rows[i] = s * E::kRows + i < m ? xs + (s * E::kRows + i) * K : nullptr;
    E::pack(rows, K, a + s * E::kRows * kk);
  });
  parallel_for(pool, row_blocks * col_blocks, [&](int64_t item) {
    const int64_t s0 = (item / col_blocks) * per_block, n0 = (item % col_blocks) * kNC;
    if (s0 >= slivers) return;
    E::gemm(a + s0 * E::kRows * kk, std::min(per_block, slivers - s0), K, ws, N, n0, kNC, c + s0 * E::kRows * np,
            np);
    const int64_t width = std::min(kNC, N - n0);
    for (int64_t r = s0 * E::kRows; r < std::min(m, (s0 + per_block) * E::kRows); ++r)
      std::copy(c + r * np + n0, c + r * np + n0 + width, out + r * N + n0);
  });
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  if (ffi::Error error = moecli::check_product("moecli_matmul", x, w, *y); error.failure()) return error;
  return with_engine(w.element_type(), [&](auto w_dtype, auto engine) {
    return MatmulImpl<decltype(engine)>(pool, x, data<const decltype(w_dtype)>(w), w.dimensions()[1], *y);
  });
}

ffi::Error MatmulQ(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer scale,
                   ffi::Result<ffi::AnyBuffer> y, int64_t engine_cap) {
  if (ffi::Error error = moecli::check_quantized_product("moecli_matmul_q", x, q, scale, *y); error.failure())
    return error;
  if (ffi::Error error = check_engine_cap("moecli_matmul_q", engine_cap); error.failure()) return error;
  return moecli::with_quantized(q, scale, x.dimensions()[1], [&](auto w) {
    return with_bf16_engine(
        [&](auto engine) { return MatmulImpl<decltype(engine)>(pool, x, w, q.dimensions()[1], *y); }, engine_cap);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliMatmul, Matmul, moecli::product_binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliGroupedExperts, GroupedExperts, moecli::experts_binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliMatmulQ, MatmulQ, moecli::quantized_product_binding().Attr<int64_t>("engine_cap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliGroupedExpertsQ, GroupedExpertsQ,
                              moecli::quantized_experts_binding().Attr<int64_t>("engine_cap"));

// For `moe generate --verbose` and the tests: the engine of bfloat16 prompts (see bf16_engine).
extern "C" int MoecliBf16Engine() { return bf16_engine(); }

// Caps bf16_engine()'s choice: 0 AMX (no cap), 1 AVX512-BF16, 2 float32. moecli/kernels/cpu/ffi.py
// calls it with MOECLI_CPU_BF16 right after loading the library (only moecli/env.py reads
// moecli's environment variables). Returns 0, or -1 for a cap out of range or one that comes
// after the engine was chosen (it would not apply).
extern "C" int MoecliSetBf16Cap(int cap) {
  if (cap < kAmx || cap > kFp32 || (bf16_chosen.load() && cap != bf16_cap.load())) return -1;
  bf16_cap.store(cap);
  return 0;
}
