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

#include <algorithm>
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
constexpr int64_t kQueries = 64;  // query positions per work item (times the group's heads)
using Vec = moecli::Vec16;
constexpr int kLanes = sizeof(Vec) / sizeof(float);

// For P query rows (heads sharing a kv head, at one position): s[p] = q[p] @ block, the block of
// keys packed as [d][kKeys]. Each key vector is loaded once for all P rows. Two sets of
// accumulators (even and odd i): one set alone is a chain of dependent adds, half the FMA speed.
template <int P>
void block_scores(const float* const* q, const float* block, int64_t d, float (*s)[kKeys]) {
  constexpr int kV = kKeys / kLanes;
  Vec acc[2][P][kV] = {};
  auto step = [&](int set, int64_t i) {
#pragma GCC unroll 8
    for (int c = 0; c < kV; ++c) {
      const Vec key = moecli::load16(block + i * kKeys + c * kLanes);
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) acc[set][p][c] += q[p][i] * key;
    }
  };
  int64_t i = 0;
  for (; i + 2 <= d; i += 2) step(0, i), step(1, i + 1);
  if (i < d) step(0, i);
  for (int p = 0; p < P; ++p)
    for (int c = 0; c < kV; ++c) {
      const Vec sum = acc[0][p][c] + acc[1][p][c];
      std::memcpy(s[p] + c * kLanes, &sum, sizeof sum);
    }
}

// o[p] = o[p] * alpha[p] + probs[p][j0:j1] @ values[j0:j1, :] for P rows, each value vector loaded
// once for all rows; o held in registers when d is a multiple of the vector width (kVecs
// vectors; 0 = any d, plain loops), in two sets of accumulators while that fits in 16 registers.
template <int kVecs, int P>
void block_values(const float (*probs)[kKeys], const float* values, int64_t d, int64_t j0, int64_t j1,
                  const float* alpha, float* const* o) {
  if constexpr (kVecs == 0) {
    for (int p = 0; p < P; ++p) {
      for (int64_t c = 0; c < d; ++c) o[p][c] *= alpha[p];
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t c = 0; c < d; ++c) o[p][c] += probs[p][j] * values[j * d + c];
    }
  } else {
    constexpr int kSets = P * kVecs <= 8 ? 2 : 1;
    Vec acc[kSets][P][kVecs] = {};
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < kVecs; ++c) acc[0][p][c] = moecli::load16(o[p] + c * kLanes) * alpha[p];
    auto step = [&](int set, int64_t j) {
#pragma GCC unroll 16
      for (int c = 0; c < kVecs; ++c) {
        const Vec value = moecli::load16(values + j * d + c * kLanes);
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) acc[set][p][c] += probs[p][j] * value;
      }
    };
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) step(0, j), step(kSets - 1, j + 1);
    if (j < j1) step(0, j);
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < kVecs; ++c) {
        const Vec sum = kSets == 2 ? acc[0][p][c] + acc[kSets - 1][p][c] : acc[0][p][c];
        std::memcpy(o[p] + c * kLanes, &sum, sizeof sum);
      }
  }
}

// P query rows' step through a block of keys, of which [j0, j1) are visible to them: each row's
// running max m and sum l of the exponentiated scores and its unnormalised output o [d] take the
// block in (online softmax).
template <int kVecs, int P>
void attend_block(const float* const* q, const float* key_block, const float* values, int64_t d, int64_t j0,
                  int64_t j1, float* m, float* l, float* const* o) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  alignas(64) float s[P][kKeys];
  float alpha[P];
  block_scores<P>(q, key_block, d, s);
  for (int p = 0; p < P; ++p) {
    for (int64_t j = 0; j < kKeys; ++j) s[p][j] = j >= j0 && j < j1 ? s[p][j] : -kInf;
    Vec vmax = Vec{} + m[p];  // max and sum a vector at a time (a scalar loop: ~4 cycles a key)
    for (int64_t j = 0; j < kKeys; j += kLanes) {
      const Vec sj = moecli::load16(s[p] + j);
      vmax = sj > vmax ? sj : vmax;
    }
    float m_new = m[p];
    for (int c = 0; c < kLanes; ++c) m_new = std::max(m_new, vmax[c]);
    Vec vsum = {};
    for (int64_t j = 0; j < kKeys; j += kLanes) {  // probabilities, unnormalised (~0 where masked)
      const Vec prob = moecli::exp16(moecli::load16(s[p] + j) - m_new);
      std::memcpy(s[p] + j, &prob, sizeof prob);
      vsum += prob;
    }
    float sum = 0.f;
    for (int c = 0; c < kLanes; ++c) sum += vsum[c];
    alpha[p] = std::exp(m[p] - m_new);  // rescales what the earlier blocks added up
    l[p] = l[p] * alpha[p] + sum;
    m[p] = m_new;
  }
  block_values<kVecs, P>(s, values, d, j0, j1, alpha, o);
}

// Query positions i0..i1 of every head in kv group `head`: the keys they may see, a block at a
// time (packed contiguously: rows of the cache's keys are a whole cache length apart, and a
// block's 64 strided rows fight over a few L1 sets). The group's heads go two at a time: at one
// position they see the same keys.
template <int kVecs>
void attend_rows(const float* qs, const float* ks, const float* vs, int64_t group, int64_t t, int64_t d,
                 int64_t len, int64_t first, int64_t window, int64_t head, int64_t i0, int64_t i1, float* os) {
  const float *keys = ks + head * d * len, *values = vs + head * len * d;
  const int64_t width = i1 - i0, rows = group * width;  // state row (i - i0) * group + h: heads side by side
  std::vector<float> m(rows, -std::numeric_limits<float>::infinity()), l(rows, 0.f);
  std::vector<float> key_block(d * kKeys);
  auto at = [&](int64_t h, int64_t i) { return ((head * group + h) * t + i) * d; };  // offset of a row
  for (int64_t h = 0; h < group; ++h) std::fill(os + at(h, i0), os + at(h, i0) + width * d, 0.f);
  const int64_t lo = window > 0 ? std::max<int64_t>(0, first + i0 - window + 1) : 0;
  const int64_t hi = std::min(len, first + i1);  // past the last query's position
  for (int64_t b0 = lo; b0 < hi; b0 += kKeys) {
    const int64_t n = std::min(kKeys, hi - b0);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < kKeys; ++j) key_block[i * kKeys + j] = j < n ? keys[i * len + b0 + j] : 0.f;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t pos = first + i;
      const int64_t k0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, k1 = std::min(len, pos + 1);
      const int64_t j0 = std::max<int64_t>(k0 - b0, 0), j1 = std::min<int64_t>(k1 - b0, n);
      if (j0 >= j1) continue;
      for (int64_t h = 0; h < group; h += 2) {
        const int64_t r = (i - i0) * group + h;
        const float* q[2] = {qs + at(h, i), h + 1 < group ? qs + at(h + 1, i) : nullptr};
        float* o[2] = {os + at(h, i), h + 1 < group ? os + at(h + 1, i) : nullptr};
        if (h + 1 < group)
          attend_block<kVecs, 2>(q, key_block.data(), values + b0 * d, d, j0, j1, &m[r], &l[r], o);
        else
          attend_block<kVecs, 1>(q, key_block.data(), values + b0 * d, d, j0, j1, &m[r], &l[r], o);
      }
    }
  }
  for (int64_t h = 0; h < group; ++h)
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t c = 0; c < d; ++c) os[at(h, i) + c] /= l[(i - i0) * group + h];
}

// Up to this many query positions (decoding) go through attend_few.
constexpr int64_t kFewQueries = 8;
constexpr int64_t kChunk = 1024;  // keys per chunk in attend_few: a row of a chunk is a 4 KB page

// Largest of s[a:b) (and `init`), 16 at a time.
float max_of(const float* s, int64_t a, int64_t b, float init) {
  Vec vmax = Vec{} + init;
  int64_t j = a;
  for (; j + kLanes <= b; j += kLanes) {
    const Vec sj = moecli::load16(s + j);
    vmax = sj > vmax ? sj : vmax;
  }
  float m = init;
  for (int c = 0; c < kLanes; ++c) m = std::max(m, vmax[c]);
  for (; j < b; ++j) m = std::max(m, s[j]);
  return m;
}

// All t (<= kFewQueries) query positions of every head in kv group `head`, a chunk of keys at a
// time: the chunk's scores are one product of the queries with the keys' rows and the output
// takes the probabilities times the values, both through moecli::accumulate (sixteen rows of the
// cache streamed at once: the blocked path above reads 64 rows a block at a time, too many
// streams for the prefetcher, and ran decoding attention at about half the memory bandwidth).
// Between chunks, the same online softmax as attend_block.
void attend_few(const float* qs, const float* ks, const float* vs, int64_t group, int64_t t, int64_t d, int64_t len,
                int64_t first, int64_t window, int64_t head, float* os) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int64_t rows = group * t;  // row h * t + i: head h at position first + i
  const float *q = qs + head * rows * d, *keys = ks + head * d * len, *values = vs + head * len * d;
  float* o = os + head * rows * d;
  std::vector<float> m(rows, -kInf), l(rows, 0.f), s(rows * kChunk);
  std::fill(o, o + rows * d, 0.f);
  const int64_t lo = window > 0 ? std::max<int64_t>(0, first - window + 1) : 0, hi = std::min(len, first + t);
  for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
    const int64_t n = std::min(kChunk, hi - c0);
    std::fill(s.begin(), s.begin() + rows * n, 0.f);
    moecli::accumulate_rows(q, d, rows, keys + c0, len, 0, d, n, s.data());  // s[r, j] = q[r] . key c0 + j
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = first + r % t;  // visible keys: [a, b) of this chunk
      const int64_t a = std::clamp<int64_t>((window > 0 ? pos - window + 1 : 0) - c0, 0, n);
      const int64_t b = std::clamp<int64_t>(pos + 1 - c0, 0, n);
      float* sr = s.data() + r * n;
      if (a >= b) {  // none in this chunk
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      const float m_new = max_of(sr, a, b, m[r]);
      int64_t j = a;
      Vec vsum = {};
      for (; j + kLanes <= b; j += kLanes) {
        const Vec prob = moecli::exp16(moecli::load16(sr + j) - m_new);
        moecli::store16(sr + j, prob);
        vsum += prob;
      }
      float sum = 0.f;
      for (int c = 0; c < kLanes; ++c) sum += vsum[c];
      for (; j < b; ++j) sum += (sr[j] = std::exp(sr[j] - m_new));
      std::fill(sr, sr + a, 0.f);
      std::fill(sr + b, sr + n, 0.f);
      const float alpha = std::exp(m[r] - m_new);  // rescales what the earlier chunks added up
      for (int64_t c = 0; c < d; ++c) o[r * d + c] *= alpha;
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
    }
    moecli::accumulate_rows(s.data(), n, rows, values + c0 * d, d, 0, n, d, o);  // o[r] += probs[r] @ values
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < d; ++c) o[r * d + c] /= l[r];
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> start, int64_t window,
                     ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto qd = q.dimensions();
  const int64_t batch = qd[0], kv = qd[1], group = qd[2], t = qd[3], d = qd[4], len = k.dimensions()[3];
  const int64_t first = start.typed_data()[0], blocks = (t + kQueries - 1) / kQueries;
  const float *qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data();
  float* os = out->typed_data();
  if (t <= kFewQueries) {
    parallel_for(pool, batch * kv, [&](int64_t head) { attend_few(qs, ks, vs, group, t, d, len, first, window, head, os); });
    return ffi::Error::Success();
  }
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
