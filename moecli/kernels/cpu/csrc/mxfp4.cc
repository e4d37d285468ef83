// moecli_expert_matvec_mxfp4: y[a] = x[a] @ W[expert_ids[a]] for every assignment a, W a stack of
// MXFP4 matrices (gpt-oss's experts, csrc/mxfp4_matvec.h's layout), read packed, in place.
//
// Why a product per assignment rather than a whole expert FFN (cpu_kernels.cc's moecli_experts):
// gpt-oss's experts add biases and a clamped SwiGLU between their two products, which the Python
// side (moecli/kernels/cpu/backend.py) computes in JAX, so one kernel serves the gate, up and down
// products of any gated FFN. Decoding reads 4.25 bits a weight where float32 reads 32 (bfloat16 16),
// and decoding is bound by how fast the weights stream from memory.
//
// The work (csrc/expert_gather.h): each (expert, block of outputs) is a work item on XLA's thread pool,
// every byte of a chosen expert read once a call; a few dozen outputs at a time (kCacheRows, ~100 KB
// of bytes: in L2) serve the expert's tokens kMxTokens at a time. x is deinterleaved once a call
// (mxfp4_deinterleave).

#include <algorithm>
#include <cstdint>
#include <string>

#include "common.h"
#include "expert_gather.h"
#include "mxfp4_matvec.h"

namespace {

using moecli::data;
using moecli::kMxBlock;
using moecli::kMxRows;
using moecli::kMxTokens;
namespace ffi = xla::ffi;

constexpr int64_t kCacheRows = 64;  // outputs whose bytes stay in cache while an expert's tokens pass

constexpr const char* kName = "moecli_expert_matvec_mxfp4";

// x [a, k] float32, expert_ids [a] int32, blocks uint8 [e, n, k / 2], scales uint8 [e, n, k / 32]
// -> y [a, n] float32; k a multiple of 32.
ffi::Error check(ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer blocks, ffi::AnyBuffer scales, ffi::AnyBuffer y) {
  if (ffi::Error error = moecli::check_operands(kName, {{"x", x, {ffi::F32}, "ak"},
                                                        {"expert_ids", ids, {ffi::S32}, "a"},
                                                        {"blocks", blocks, {ffi::U8}, "enh"},
                                                        {"scales", scales, {ffi::U8}, "eng"},
                                                        {"y", y, {ffi::F32}, "an"}});
      error.failure())
    return error;
  const int64_t k = x.dimensions()[1], half = blocks.dimensions()[2], groups = scales.dimensions()[2];
  if (k % kMxBlock || half != k / 2 || groups != k / kMxBlock)
    return ffi::Error::InvalidArgument(std::string(kName) + ": x has " + std::to_string(k) + " columns, blocks " +
                                       std::to_string(half) + " bytes a row and scales " + std::to_string(groups) +
                                       " a row; expected a multiple of 32, k / 2 and k / 32");
  return ffi::Error::Success();
}

// ys[i][j0 : j1] = xs[i] @ w[:, j0 : j1] for `count` (1..kMxTokens) rows of x.
void rows(int64_t count, const float* const* xs, float* const* ys, const uint8_t* blocks, const uint8_t* scales,
          int64_t k, int64_t j0, int64_t j1) {
  switch (count) {
    case 1: moecli::mxfp4_rows<1>(xs, ys, blocks, scales, k, j0, j1); break;
    case 2: moecli::mxfp4_rows<2>(xs, ys, blocks, scales, k, j0, j1); break;
    case 3: moecli::mxfp4_rows<3>(xs, ys, blocks, scales, k, j0, j1); break;
    default: moecli::mxfp4_rows<4>(xs, ys, blocks, scales, k, j0, j1);
  }
}

ffi::Error ExpertMatvecMxfp4(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer blocks,
                             ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y) {
  if (ffi::Error error = check(x, ids, blocks, scales, *y); error.failure()) return error;
  const int64_t n = x.dimensions()[0], k = x.dimensions()[1];
  const int64_t n_experts = blocks.dimensions()[0], m = blocks.dimensions()[1];
  const int32_t* expert = data<const int32_t>(ids);
  const uint8_t *wb = data<const uint8_t>(blocks), *ws = data<const uint8_t>(scales);
  float* out = data<float>(*y);
  std::fill(out, out + n * m, 0.f);

  struct Deinterleaved;
  float* xd = static_cast<float*>(moecli::thread_buffer<Deinterleaved>(std::max<int64_t>(1, n * k) * sizeof(float)));
  const moecli::ExpertGroups groups(expert, n, n_experts);
  for (const int64_t a : groups.order) moecli::mxfp4_deinterleave(data<const float>(x) + a * k, k, xd + a * k);
  const int64_t row_bytes = k / 2, row_scales = k / kMxBlock;
  moecli::for_each_expert_chunk(pool, groups, m, kMxRows, kCacheRows, kMxTokens,
                                [&](int64_t e, int64_t tokens, const int64_t* assignments, int64_t j0, int64_t j1) {
    const float* xs[kMxTokens];
    float* ys[kMxTokens];
    for (int64_t t = 0; t < tokens; ++t) xs[t] = xd + assignments[t] * k, ys[t] = out + assignments[t] * m;
    rows(tokens, xs, ys, wb + e * m * row_bytes, ws + e * m * row_scales, k, j0, j1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliExpertMatvecMxfp4, ExpertMatvecMxfp4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
