// Quantized weights (moecli --quantize q8|q4) as the CPU kernels read them: the layout, and the
// few vector operations the kernels are written in, for AVX-512, AVX2 (with FMA and F16C) or any
// other CPU (plain C++ vectors).
//
// The layout, made by the Python side (symmetric, group size G along k, G even for q4):
//   q8: q int8 [k, n], scale float16 [k / G, n]: w[k, j] = q[k, j] * scale[k / G, j];
//   q4: q uint8 [k / 2, n]: byte row i holds row 2i in its low nibble and row 2i + 1 in its high
//       one, each stored as value + 8 (value -8..7): w[2i, j] = ((b & 15) - 8) * scale[2i / G, j].
// Activations stay float32: the weights are widened and scaled in registers, each packed byte
// read once (a q8 matrix is a quarter of its float32 size, a q4 one an eighth, and decoding is
// bound by how fast the weights stream from memory).
//
// Which vector path is compiled follows the build: -march=native on an AVX-512 CPU takes the
// 16-lane path, MOECLI_CPU_ISA=avx2 (-march=haswell, moecli/kernels/cpu/ffi.py) the 8-lane one.
#pragma once

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace moecli {

// One quantized [k, n] matrix (or the first of a stack of them): where its bytes and scales are.
// It stands in for the `const W*` of float32 / bfloat16 weights in the kernels' templates, so it
// acts like a pointer to its first weight: `w + e * k * n` is matrix e of a stack (an offset of
// whole matrices only: a multiple of G * n weights).
template <bool Q4>
struct QuantWeights {
  using Byte = std::conditional_t<Q4, uint8_t, int8_t>;
  const Byte* q;          // q8: [k, n]; q4: [k / 2, n], two rows a byte
  const uint16_t* scale;  // float16 [k / G, n]
  int64_t group;          // G: rows that share a scale
  QuantWeights operator+(int64_t weights) const {
    return {q + (Q4 ? weights / 2 : weights), scale + weights / group, group};
  }
};

// A float16 value as float32 (the scalar tails; the vector paths convert 8 or 16 at a time).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 31, mantissa = h & 0x3ff;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float f = float(mantissa) * 5.9604645e-8f;
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (exponent == 31 ? 0x7f800000u : (exponent + 112) << 23) | mantissa << 13;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Weight (k, j) without its scale: q8's int8, q4's nibble less 8.
template <bool Q4>
inline float quantized_value(QuantWeights<Q4> w, int64_t ldw, int64_t k, int64_t j) {
  if constexpr (Q4) return float(((w.q[(k >> 1) * ldw + j] >> ((k & 1) * 4)) & 15) - 8);
  else return float(w.q[k * ldw + j]);
}

// The vector operations: QVec holds kQLanes floats.
//   q8_load(p):                  kQLanes int8 weights as floats;
//   q4_load_bytes(p, lo, whole): kQLanes bytes of a q4 byte row: lo = their low nibbles (0..15),
//                                whole = the bytes (0..255), as floats; the high nibbles are
//                                (whole - lo) / 16 (q4_load), and quant_matvec.h folds that
//                                division into x, saving a shift a vector; the offset of 8 is
//                                the caller's too;
//   scale_load(p):               kQLanes float16 scales as floats;
//   qsum(v):                     the sum of v's lanes.
#if defined(__AVX512F__)
constexpr int kQLanes = 16;
constexpr const char* kQuantIsa = "avx512";
typedef __m512 QVec;
inline QVec qzero() { return _mm512_setzero_ps(); }
inline QVec qset(float v) { return _mm512_set1_ps(v); }
inline QVec qload(const float* p) { return _mm512_loadu_ps(p); }
inline void qstore(float* p, QVec v) { _mm512_storeu_ps(p, v); }
inline QVec qfma(QVec a, QVec b, QVec c) { return _mm512_fmadd_ps(a, b, c); }
inline QVec q8_load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void q4_load_bytes(const uint8_t* p, QVec& lo, QVec& whole) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  // A 16-lane permute reads only the low 4 bits of each index, so the low nibble picks its own
  // value from a table of 0..15: one instruction for the mask and the conversion (+12-15% on the
  // q4 loop's speed in cache).
  lo = _mm512_permutexvar_ps(bytes, _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  whole = _mm512_cvtepi32_ps(bytes);
}
inline QVec scale_load(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline float qsum(QVec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int kQLanes = 8;
constexpr const char* kQuantIsa = "avx2";
typedef __m256 QVec;
inline QVec qzero() { return _mm256_setzero_ps(); }
inline QVec qset(float v) { return _mm256_set1_ps(v); }
inline QVec qload(const float* p) { return _mm256_loadu_ps(p); }
inline void qstore(float* p, QVec v) { _mm256_storeu_ps(p, v); }
inline QVec qfma(QVec a, QVec b, QVec c) { return _mm256_fmadd_ps(a, b, c); }
inline QVec q8_load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void q4_load_bytes(const uint8_t* p, QVec& lo, QVec& whole) {
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
  whole = _mm256_cvtepi32_ps(bytes);
}
inline QVec scale_load(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float qsum(QVec v) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
#else  // any other CPU: GCC/Clang vectors, the compiler picks the instructions
constexpr int kQLanes = 8;
constexpr const char* kQuantIsa = "generic";
typedef float QVec __attribute__((vector_size(kQLanes * sizeof(float))));
inline QVec qzero() { return QVec{}; }
inline QVec qset(float v) { return QVec{} + v; }
inline QVec qload(const float* p) {
  QVec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void qstore(float* p, QVec v) { std::memcpy(p, &v, sizeof v); }
inline QVec qfma(QVec a, QVec b, QVec c) { return a * b + c; }
inline QVec q8_load(const int8_t* p) {
  typedef int8_t Bytes __attribute__((vector_size(kQLanes)));
  Bytes b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, QVec);
}
inline void q4_load_bytes(const uint8_t* p, QVec& lo, QVec& whole) {
  typedef uint8_t Bytes __attribute__((vector_size(kQLanes)));
  Bytes b;
  std::memcpy(&b, p, sizeof b);
  lo = __builtin_convertvector(b & 15, QVec);
  whole = __builtin_convertvector(b, QVec);
}
inline QVec scale_load(const uint16_t* p) {
  QVec v;
  for (int i = 0; i < kQLanes; ++i) v[i] = half_to_float(p[i]);
  return v;
}
inline float qsum(QVec v) {
  float sum = 0.f;
  for (int i = 0; i < kQLanes; ++i) sum += v[i];
  return sum;
}
#endif

inline QVec qsub(QVec a, QVec b) { return a - b; }
inline QVec qmul(QVec a, QVec b) { return a * b; }

// kQLanes bytes of a q4 byte row as their low and high nibbles, floats 0..15 (exact).
inline void q4_load(const uint8_t* p, QVec& lo, QVec& hi) {
  QVec whole;
  q4_load_bytes(p, lo, whole);
  hi = qmul(qsub(whole, lo), qset(1.f / 16));
}

// kQLanes dequantized weights (scale included) of rows k and k + 1 (k even), columns j.., for
// packing B panels: q4's byte row loaded once, and the scales once where both rows share a group
// (always in q4: G is even).
template <bool Q4>
inline void dequantize_pair(QuantWeights<Q4> w, int64_t ldw, int64_t k, int64_t j, QVec& row0, QVec& row1) {
  const QVec scale0 = scale_load(w.scale + k / w.group * ldw + j);
  if constexpr (Q4) {
    QVec lo, hi;
    q4_load(w.q + (k >> 1) * ldw + j, lo, hi);
    row0 = qmul(qsub(lo, qset(8.f)), scale0);
    row1 = qmul(qsub(hi, qset(8.f)), scale0);
  } else {
    const QVec scale1 = (k + 1) % w.group ? scale0 : scale_load(w.scale + (k + 1) / w.group * ldw + j);
    row0 = qmul(q8_load(w.q + k * ldw + j), scale0);
    row1 = qmul(q8_load(w.q + (k + 1) * ldw + j), scale1);
  }
}

// One dequantized weight (the columns past the last whole vector).
template <bool Q4>
inline float dequantize_one(QuantWeights<Q4> w, int64_t ldw, int64_t k, int64_t j) {
  return quantized_value(w, ldw, k, j) * half_to_float(w.scale[k / w.group * ldw + j]);
}

}  // namespace moecli
