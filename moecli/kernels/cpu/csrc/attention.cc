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

using moecli::data;
using moecli::parallel_for;
namespace ffi = xla::ffi;

constexpr int64_t kKeys = 64;    // keys per block: the block's keys and values stay in L1
constexpr int64_t kQueries = 64;  // query positions per work item (times the group's heads)
using Vec = moecli::Vec16;
using Vec16i = moecli::Vec16i;
constexpr Vec16i kLaneIndex = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
constexpr int kLanes = sizeof(Vec) / sizeof(float);
constexpr float kInf = std::numeric_limits<float>::infinity();

// Query rows per step of a prompt's attention: their scores against a block of keys are a 6 x 64
// register tile (24 of the 32 AVX-512 registers), each key vector loaded once for all six rows.
// (Two rows at a time, loading a key vector per two multiply-adds, ran at ~half the speed.)
constexpr int kRowsPerStep = 6;

// s[p] = q[p] @ block for P query rows, the block of keys packed as [d][kKeys].
template <int P>
void block_scores(const float* const* q, const float* block, int64_t d, float (*s)[kKeys]) {
  constexpr int kV = kKeys / kLanes;
  Vec acc[P][kV] = {};
  for (int64_t i = 0; i < d; ++i) {
#pragma GCC unroll 8
    for (int c = 0; c < kV; ++c) {
      const Vec key = moecli::load16(block + i * kKeys + c * kLanes);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) acc[p][c] += q[p][i] * key;
    }
  }
  for (int p = 0; p < P; ++p)
    for (int c = 0; c < kV; ++c) std::memcpy(s[p] + c * kLanes, &acc[p][c], sizeof(Vec));
}

// o[p] = o[p] * alpha[p] + probs[p][j0:j1] @ values[j0:j1, :] for P rows, each value vector loaded
// once for all rows; o held in registers when d is a multiple of the vector width (kVecs
// vectors; 0 = any d, plain loops).
template <int kVecs, int P>
void block_values(const float (*probs)[kKeys], const float* values, int64_t d, int64_t j0, int64_t j1,
                  const float* alpha, float* const* o) {
  if constexpr (kVecs == 0) {
    for (int p = 0; p < P; ++p) {
      for (int64_t c = 0; c < d; ++c) o[p][c] *= alpha[p];
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t c = 0; c < d; ++c) o[p][c] += probs[p][j] * values[j * d + c];
    }
  } else if constexpr (P * kVecs > 24) {  // too many accumulators for the registers: halves
    block_values<kVecs, P / 2>(probs, values, d, j0, j1, alpha, o);
    block_values<kVecs, P - P / 2>(probs + P / 2, values, d, j0, j1, alpha + P / 2, o + P / 2);
  } else {
    Vec acc[P][kVecs];
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < kVecs; ++c) acc[p][c] = moecli::load16(o[p] + c * kLanes) * alpha[p];
    for (int64_t j = j0; j < j1; ++j) {
#pragma GCC unroll 16
      for (int c = 0; c < kVecs; ++c) {
        const Vec value = moecli::load16(values + j * d + c * kLanes);
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) acc[p][c] += probs[p][j] * value;
      }
    }
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < kVecs; ++c) std::memcpy(o[p] + c * kLanes, &acc[p][c], sizeof(Vec));
  }
}

// One query row of a step: its q and unnormalised output o [d], its running max m and sum l of
// the exponentiated scores (online softmax), and the keys of the current block it may see.
struct Row {
  const float* q;
  float *o, *m, *l;
  int64_t j0, j1;
};

// kRowsPerStep rows' step through a block of keys: each row's m, l and o take the block in.
template <int kVecs>
void attend_block(const Row* rows, const float* key_block, const float* values, int64_t d) {
  constexpr int P = kRowsPerStep;
  alignas(64) float s[P][kKeys];
  const float* q[P];
  float* o[P];
  float alpha[P];
  int64_t j0 = kKeys, j1 = 0;  // the keys any of the rows sees
  for (int p = 0; p < P; ++p) {
    q[p] = rows[p].q, o[p] = rows[p].o;
    j0 = std::min(j0, rows[p].j0), j1 = std::max(j1, rows[p].j1);
  }
  block_scores<P>(q, key_block, d, s);
  for (int p = 0; p < P; ++p) {
    const Row& row = rows[p];
    if (row.j0 > 0 || row.j1 < kKeys)  // a block on the diagonal (or a window's edge): mask
      for (int64_t j = 0; j < kKeys; j += kLanes) {
        const Vec16i key = kLaneIndex + int32_t(j);
        const Vec sj = moecli::load16(s[p] + j);
        moecli::store16(s[p] + j, key >= int32_t(row.j0) && key < int32_t(row.j1) ? sj : Vec{} - kInf);
      }
    Vec vmax = Vec{} + *row.m;  // max and sum a vector at a time (a scalar loop: ~4 cycles a key)
    for (int64_t j = 0; j < kKeys; j += kLanes) {
      const Vec sj = moecli::load16(s[p] + j);
      vmax = sj > vmax ? sj : vmax;
    }
    const float m_new = moecli::max16(vmax);
    Vec vsum = {};
    for (int64_t j = 0; j < kKeys; j += kLanes) {  // probabilities, unnormalised (0 where masked)
      const Vec prob = moecli::exp16(moecli::load16(s[p] + j) - m_new);
      std::memcpy(s[p] + j, &prob, sizeof prob);
      vsum += prob;
    }
    const float sum = moecli::sum16(vsum);
    alpha[p] = std::exp(*row.m - m_new);  // rescales what the earlier blocks added up
    *row.l = *row.l * alpha[p] + sum;
    *row.m = m_new;
  }
  block_values<kVecs, P>(s, values, d, j0, j1, alpha, o);
}

// Query positions i0..i1 of every head in kv group `head`: the keys they may see, a block at a
// time (packed contiguously: rows of the cache's keys are a whole cache length apart, and a
// block's 64 strided rows fight over a few L1 sets), six query rows at a time (any mix of heads
// and positions: each row masks the keys it may not see).
template <int kVecs>
void attend_rows(const float* qs, const float* ks, const float* vs, int64_t group, int64_t t, int64_t d,
                 int64_t len, int64_t first, int64_t window, int64_t head, int64_t i0, int64_t i1, float* os) {
  const float *keys = ks + head * d * len, *values = vs + head * len * d;
  const int64_t width = i1 - i0, n_rows = group * width;  // state row (i - i0) * group + h
  std::vector<float> m(n_rows, -kInf), l(n_rows, 0.f);
  std::vector<float> key_block(d * kKeys), spare_o(d), spare_q(d, 0.f);
  float spare_m = 0.f, spare_l = 0.f;
  const Row spare{spare_q.data(), spare_o.data(), &spare_m, &spare_l, 0, 1};  // pads a step's last rows
  auto at = [&](int64_t h, int64_t i) { return ((head * group + h) * t + i) * d; };  // offset of a row
  for (int64_t h = 0; h < group; ++h) std::fill(os + at(h, i0), os + at(h, i0) + width * d, 0.f);
  const int64_t lo = window > 0 ? std::max<int64_t>(0, first + i0 - window + 1) : 0;
  const int64_t hi = std::min(len, first + i1);  // past the last query's position
  Row step[kRowsPerStep];
  for (int64_t b0 = lo; b0 < hi; b0 += kKeys) {
    const int64_t n = std::min(kKeys, hi - b0);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < kKeys; ++j) key_block[i * kKeys + j] = j < n ? keys[i * len + b0 + j] : 0.f;
    int filled = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t pos = first + i;
      const int64_t k0 = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, k1 = std::min(len, pos + 1);
      const int64_t j0 = std::max<int64_t>(k0 - b0, 0), j1 = std::min<int64_t>(k1 - b0, n);
      if (j0 >= j1) continue;  // no key of this block is visible from here
      for (int64_t h = 0; h < group; ++h) {
        const int64_t r = (i - i0) * group + h;
        step[filled++] = {qs + at(h, i), os + at(h, i), &m[r], &l[r], j0, j1};
        if (filled == kRowsPerStep) attend_block<kVecs>(step, key_block.data(), values + b0 * d, d), filled = 0;
      }
    }
    if (filled > 0) {
      for (int p = filled; p < kRowsPerStep; ++p) step[p] = spare, spare_m = 0.f, spare_l = 0.f;
      attend_block<kVecs>(step, key_block.data(), values + b0 * d, d);
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
  float m = moecli::max16(vmax);
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

// Every buffer float32 but `start`, int32: one position for every row, or one per batch row (each row's
// queries at its own positions: batched serving); letters: batch, kv heads (h), group, t, head_dim, len.
ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer start,
                     int64_t window, ffi::Result<ffi::AnyBuffer> out) {
  if (ffi::Error error = moecli::check_operands("moecli_attention", {{"q", q, {ffi::F32}, "bhgtd"},
                                                                    {"k", k, {ffi::F32}, "bhdl"},
                                                                    {"v", v, {ffi::F32}, "bhld"},
                                                                    {"out", *out, {ffi::F32}, "bhgtd"}});
      error.failure())
    return error;
  const auto qd = q.dimensions();
  const int64_t batch = qd[0], kv = qd[1], group = qd[2], t = qd[3], d = qd[4], len = k.dimensions()[3];
  const int64_t starts = start.element_count(), blocks = (t + kQueries - 1) / kQueries;
  if (start.element_type() != ffi::S32)
    return ffi::Error::InvalidArgument(std::string("moecli_attention: start is ") + moecli::dtype_name(start.element_type()) +
                                       ", expected int32");
  if (starts != 1 && starts != batch)
    return ffi::Error::InvalidArgument("moecli_attention: start has " + std::to_string(starts) +
                                       " values, expected 1 or one per batch row (" + std::to_string(batch) + ")");
  const int32_t* first_of = data<const int32_t>(start);
  auto first = [&](int64_t head) { return static_cast<int64_t>(first_of[starts == 1 ? 0 : head / kv]); };
  const float *qs = data<const float>(q), *ks = data<const float>(k), *vs = data<const float>(v);
  float* os = data<float>(*out);
  if (t <= kFewQueries) {
    parallel_for(pool, batch * kv, [&](int64_t head) { attend_few(qs, ks, vs, group, t, d, len, first(head), window, head, os); });
    return ffi::Error::Success();
  }
  parallel_for(pool, batch * kv * blocks, [&](int64_t item) {
    const int64_t head = item / blocks, i0 = (item % blocks) * kQueries, i1 = std::min(t, i0 + kQueries);
    auto rows = d == 64 ? attend_rows<4> : d == 128 ? attend_rows<8> : attend_rows<0>;  // the usual head sizes
    rows(qs, ks, vs, group, t, d, len, first(head), window, head, i0, i1, os);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::AnyBuffer>());
