// moecli_expert_matvec_fp8: y[a] = x[a] @ W[expert_ids[a]] for every assignment a, W a stack of
// block-FP8 matrices (DeepSeek-V3 / Qwen3-FP8 experts, csrc/fp8_matvec.h's layout), read packed, in place.
//
// One kernel for the gate, up and down products of any gated FFN, as moecli_expert_matvec_mxfp4: the
// gating runs in JAX between them (moecli/kernels/cpu/backend.py). Decoding reads one byte a weight
// (plus a float32 scale a block) where bfloat16 reads two and float32 four, and decoding is bound by
// how fast the weights stream from memory. The work plan is csrc/expert_gather.h's: each chosen
// expert's bytes read once a call, ~128 KB of them at a time serving the expert's tokens 8 (AVX2: 4)
// at a time, so a prompt takes this kernel too.

#include <algorithm>
#include <cstdint>
#include <string>

#include "common.h"
#include "expert_gather.h"
#include "fp8_matvec.h"

namespace {

using moecli::data;
namespace ffi = xla::ffi;

constexpr int64_t kCacheBytes = 128 << 10;  // a work item's codes that stay in L2 while its tokens pass

constexpr const char* kName = "moecli_expert_matvec_fp8";

// x [a, k] float32, expert_ids [a] int32, weight uint8 [e, n, k], scale float32 [e, ceil(n / bo),
// ceil(k / bi)] -> y [a, n] float32.
ffi::Error check(ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer weight, ffi::AnyBuffer scale, ffi::AnyBuffer y,
                 int64_t bo, int64_t bi) {
  if (ffi::Error error = moecli::check_operands(kName, {{"x", x, {ffi::F32}, "ak"},
                                                        {"expert_ids", ids, {ffi::S32}, "a"},
                                                        {"weight", weight, {ffi::U8}, "enk"},
                                                        {"scale", scale, {ffi::F32}, "erc"},
                                                        {"y", y, {ffi::F32}, "an"}});
      error.failure())
    return error;
  const int64_t n = weight.dimensions()[1], k = weight.dimensions()[2];
  if (bo < 1 || bi < 1)
    return ffi::Error::InvalidArgument(std::string(kName) + ": the block must be positive, got " +
                                       std::to_string(bo) + "x" + std::to_string(bi));
  const int64_t rows = scale.dimensions()[1], cols = scale.dimensions()[2];
  if (rows != (n + bo - 1) / bo || cols != (k + bi - 1) / bi)
    return ffi::Error::InvalidArgument(std::string(kName) + ": scale has " + std::to_string(rows) + "x" +
                                       std::to_string(cols) + " blocks a matrix, expected " +
                                       std::to_string((n + bo - 1) / bo) + "x" + std::to_string((k + bi - 1) / bi) +
                                       " for [" + std::to_string(n) + ", " + std::to_string(k) + "] in blocks of " +
                                       std::to_string(bo) + "x" + std::to_string(bi));
  return ffi::Error::Success();
}

// Rows of x at a time, at most: 8 on AVX-512 (the conversion shared by more tokens; 16 sums and 16
// accumulators in 32 registers), 4 on AVX2 (16 registers).
constexpr int64_t kTokens = moecli::kQLanes == 16 ? 8 : 4;
static_assert(kTokens <= moecli::kGatherTokens, "the plan's chunks fit the row kernels");

// ys[i][j0 : j1] = xs[i] @ w[:, j0 : j1] for `count` (1..kTokens) rows of x.
void rows(int64_t count, const float* const* xs, float* const* ys, const uint8_t* weight, const float* scale,
          moecli::Fp8Shape s, int64_t j0, int64_t j1) {
  switch (count) {
    case 1: moecli::fp8_rows<1>(xs, ys, weight, scale, s, j0, j1); break;
    case 2: moecli::fp8_rows<2>(xs, ys, weight, scale, s, j0, j1); break;
    case 3: moecli::fp8_rows<3>(xs, ys, weight, scale, s, j0, j1); break;
    case 4: moecli::fp8_rows<4>(xs, ys, weight, scale, s, j0, j1); break;
    case 5: moecli::fp8_rows<5>(xs, ys, weight, scale, s, j0, j1); break;
    case 6: moecli::fp8_rows<6>(xs, ys, weight, scale, s, j0, j1); break;
    case 7: moecli::fp8_rows<7>(xs, ys, weight, scale, s, j0, j1); break;
    default: moecli::fp8_rows<8>(xs, ys, weight, scale, s, j0, j1);
  }
}

ffi::Error ExpertMatvecFp8(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer weight,
                           ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> y, int64_t bo, int64_t bi) {
  if (ffi::Error error = check(x, ids, weight, scale, *y, bo, bi); error.failure()) return error;
  const int64_t n = x.dimensions()[0], k = x.dimensions()[1];
  const int64_t n_experts = weight.dimensions()[0], m = weight.dimensions()[1];
  const moecli::Fp8Shape shape{k, bo, bi};
  const int64_t grid = scale.dimensions()[1] * scale.dimensions()[2];
  const uint8_t* w = data<const uint8_t>(weight);
  const float *xf = data<const float>(x), *s = data<const float>(scale);
  float* out = data<float>(*y);
  std::fill(out, out + n * m, 0.f);
  if (k == 0) return ffi::Error::Success();

  const moecli::ExpertGroups groups(data<const int32_t>(ids), n, n_experts);
  moecli::for_each_expert_chunk(pool, groups, m, moecli::kFp8Rows, kCacheBytes / k, kTokens,
                                [&](int64_t e, int64_t tokens, const int64_t* assignments, int64_t j0, int64_t j1) {
    const float* xs[moecli::kGatherTokens];
    float* ys[moecli::kGatherTokens];
    for (int64_t t = 0; t < tokens; ++t) xs[t] = xf + assignments[t] * k, ys[t] = out + assignments[t] * m;
    rows(tokens, xs, ys, w + e * m * k, s + e * grid, shape, j0, j1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliExpertMatvecFp8, ExpertMatvecFp8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_rows")
                                  .Attr<int64_t>("block_cols"));
