// Causal grouped-query attention over the KV cache for XLA:CPU, one pass per query row.
//
// Why: XLA computes attention as two batched dots over the whole fixed-size cache with a mask and
// a softmax in between: for a 512-token prompt that is 2x the useful work (the causal half is
// masked, plus the cache's unfilled tail) and three passes over a [heads, 512, max_len] score
// array (~25-45 ms a layer on 2 cores). This kernel visits only the keys each query may see, in
// blocks, keeping a running maximum and sum ("online softmax", Milakov & Gimelshein 2018; the
// core of FlashAttention, Dao et al. 2022), so scores never leave the cache.
//
// Layouts (see moecli.layers.LayerCache): q [batch, kv_heads, group, t, head_dim], pre-scaled by
// 1/sqrt(head_dim); keys [batch, kv_heads, head_dim, len]; values [batch, kv_heads, len, head_dim].
// Query i sits at position start + i and sees keys j with j <= start + i and, with a sliding
// window w > 0, j > start + i - w.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using moecli::parallel_for;
namespace ffi = xla::ffi;

constexpr int64_t kKeys = 64;    // keys per block: the block's keys and values stay in L1
constexpr int64_t kQueries = 16;  // query positions per work item (times the group's heads)
typedef float Vec __attribute__((vector_size(64)));
typedef int32_t VecI __attribute__((vector_size(64)));
constexpr int kLanes = sizeof(Vec) / sizeof(float);

// e^x for x <= 0, ~1e-7 relative error: 2^n * e^(r), n = round(x / ln 2), r = x - n ln 2, with a
// degree-6 Taylor polynomial for e^r (|r| <= ln2 / 2). x below -87 gives ~0 (never a denormal).
inline Vec exp_negative(Vec x) {
  const Vec lo = Vec{} - 87.f;
  x = x < lo ? lo : x;
  const Vec shifter = Vec{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (x * 1.44269504f + shifter) - shifter;
  const Vec r = x - n * 0.693147181f;
  Vec p = Vec{} + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;  // 2^n
  return p * reinterpret_cast<const Vec&>(bits);
}

inline Vec load(const float* p) {  // unaligned
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// s[0:kKeys] = q @ block, the block of keys packed as [d][kKeys]. Two sets of accumulators (even
// and odd i): one set is a chain of dependent adds, half the speed of the FMA units.
void block_scores(const float* q, const float* block, int64_t d, float* s) {
  constexpr int kV = kKeys / kLanes;
  Vec even[kV] = {}, odd[kV] = {};
  int64_t i = 0;
  for (; i + 2 <= d; i += 2)
#pragma GCC unroll 8
    for (int c = 0; c < kV; ++c) {
      even[c] += q[i] * load(block + i * kKeys + c * kLanes);
      odd[c] += q[i + 1] * load(block + (i + 1) * kKeys + c * kLanes);
    }
  for (; i < d; ++i)
    for (int c = 0; c < kV; ++c) even[c] += q[i] * load(block + i * kKeys + c * kLanes);
  for (int c = 0; c < kV; ++c) {
    const Vec sum = even[c] + odd[c];
    std::memcpy(s + c * kLanes, &sum, sizeof sum);
  }
}

// o = o * alpha + p[j0:j1] @ values[j0:j1, :], o held in registers when d is a multiple of the
// vector width (kVecs vectors, two sets as above; 0 = any d, plain loops).
template <int kVecs>
void block_values(const float* p, const float* values, int64_t d, int64_t j0, int64_t j1, float alpha, float* o) {
  if constexpr (kVecs == 0) {
    for (int64_t c = 0; c < d; ++c) o[c] *= alpha;
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t c = 0; c < d; ++c) o[c] += p[j] * values[j * d + c];
  } else {
    Vec even[kVecs], odd[kVecs] = {};
#pragma GCC unroll 16
    for (int c = 0; c < kVecs; ++c) even[c] = load(o + c * kLanes) * alpha;
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2)
#pragma GCC unroll 16
      for (int c = 0; c < kVecs; ++c) {
        even[c] += p[j] * load(values + j * d + c * kLanes);
        odd[c] += p[j + 1] * load(values + (j + 1) * d + c * kLanes);
      }
    if (j < j1)
      for (int c = 0; c < kVecs; ++c) even[c] += p[j] * load(values + j * d + c * kLanes);
#pragma GCC unroll 16
    for (int c = 0; c < kVecs; ++c) {
      const Vec sum = even[c] + odd[c];
      std::memcpy(o + c * kLanes, &sum, sizeof sum);
    }
  }
}

// One query row's step through a block of keys, of which [j0, j1) are visible to it: the running
// max m and sum l of the exponentiated scores and the unnormalised output o [d] take the block in.
template <int kVecs>
void attend_block(const float* q, const float* key_block, const float* values, int64_t d, int64_t j0, int64_t j1,
                  float& m, float& l, float* o) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  alignas(64) float s[kKeys];
  block_scores(q, key_block, d, s);
  for (int64_t j = 0; j < kKeys; ++j) s[j] = j >= j0 && j < j1 ? s[j] : -kInf;
  Vec vmax = Vec{} + m;  // max and sum a vector at a time (a scalar loop: ~4 cycles a key)
  for (int64_t j = 0; j < kKeys; j += kLanes) vmax = load(s + j) > vmax ? load(s + j) : vmax;
  float m_new = m;
  for (int c = 0; c < kLanes; ++c) m_new = std::max(m_new, vmax[c]);
  Vec vsum = {};
  for (int64_t j = 0; j < kKeys; j += kLanes) {  // probabilities, unnormalised (~0 where masked)
    const Vec p = exp_negative(load(s + j) - m_new);
    std::memcpy(s + j, &p, sizeof p);
    vsum += p;
  }
  float sum = 0.f;
  for (int c = 0; c < kLanes; ++c) sum += vsum[c];
  const float alpha = std::exp(m - m_new);  // rescales what the earlier blocks added up
  l = l * alpha + sum;
  block_values<kVecs>(s, values, d, j0, j1, alpha, o);
  m = m_new;
}

// Query positions i0..i1 of every head in kv group `head`: the keys they may see, a block at a
// time (packed contiguously: rows of the cache's keys are a whole cache length apart, and a
// block's 64 strided rows fight over a few L1 sets).
template <int kVecs>
void attend_rows(const float* qs, const float* ks, const float* vs, int64_t group, int64_t t, int64_t d,
                 int64_t len, int64_t first, int64_t window, int64_t head, int64_t i0, int64_t i1, float* os) {
  const float *keys = ks + head * d * len, *values = vs + head * len * d;
  const int64_t rows = group * (i1 - i0);
  std::vector<float> m(rows, -std::numeric_limits<float>::infinity()), l(rows, 0.f);
  std::vector<float> key_block(d * kKeys);
  auto row_of = [&](int64_t r) { return (head * group + r / (i1 - i0)) * t + i0 + r % (i1 - i0); };
  for (int64_t r = 0; r < rows; ++r) std::fill(os + row_of(r) * d, os + row_of(r) * d + d, 0.f);
  const int64_t lo = window > 0 ? std::max<int64_t>(0, first + i0 - window + 1) : 0;
  const int64_t hi = std::min(len, first + i1);  // past the last query's position
  for (int64_t b0 = lo; b0 < hi; b0 += kKeys) {
    const int64_t n = std::min(kKeys, hi - b0);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < kKeys; ++j) key_block[i * kKeys + j] = j < n ? keys[i * len + b0 + j] : 0.f;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = first + i0 + r % (i1 - i0);
      const int64_t k0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, k1 = std::min(len, pos + 1);
      const int64_t j0 = std::max<int64_t>(k0 - b0, 0), j1 = std::min<int64_t>(k1 - b0, n);
      if (j0 < j1)
        attend_block<kVecs>(qs + row_of(r) * d, key_block.data(), values + b0 * d, d, j0, j1, m[r], l[r],
                            os + row_of(r) * d);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < d; ++c) os[row_of(r) * d + c] /= l[r];
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> start, int64_t window,
                     ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto qd = q.dimensions();
  const int64_t batch = qd[0], kv = qd[1], group = qd[2], t = qd[3], d = qd[4], len = k.dimensions()[3];
  const int64_t first = start.typed_data()[0], blocks = (t + kQueries - 1) / kQueries;
  const float *qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data();
  float* os = out->typed_data();
  parallel_for(pool, batch * kv * blocks, [&](int64_t item) {
    const int64_t head = item / blocks, i0 = (item % blocks) * kQueries, i1 = std::min(t, i0 + kQueries);
    auto rows = d == 64 ? attend_rows<4> : d == 128 ? attend_rows<8> : attend_rows<0>;  // the usual head sizes
    rows(qs, ks, vs, group, t, d, len, first, window, head, i0, i1, os);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
