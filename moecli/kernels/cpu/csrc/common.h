// Helpers shared by moecli's CPU kernels (cpu_kernels.cc: decoding, grouped_gemm.cc: prefill).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>

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

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// At least `bytes` of scratch memory, 64-byte aligned, kept by the calling thread between calls
// and grown to the largest request (one buffer per Tag): a fresh multi-megabyte allocation is
// fresh pages, faulted in and zeroed again on every call.
template <typename Tag>
void* thread_buffer(int64_t bytes) {
  thread_local std::unique_ptr<void, decltype(&std::free)> block(nullptr, &std::free);
  thread_local int64_t size = 0;
  if (bytes > size) {
    block.reset(std::aligned_alloc(64, round_up(bytes, 64)));
    size = bytes;
  }
  return block.get();
}

// 16 floats: one AVX-512 register (two AVX2 ones; GCC's vector extensions split it).
typedef float Vec16 __attribute__((vector_size(64)));
typedef int32_t Vec16i __attribute__((vector_size(64)));
typedef uint32_t Bits16 __attribute__((vector_size(64)));

inline Vec16 as_floats(Bits16 bits) {
  Vec16 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline Vec16 load16(const float* p) {  // unaligned
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Vec16 load16(const uint16_t* p) {  // 16 bfloat16 values, widened
  typedef uint16_t Half16 __attribute__((vector_size(32)));
  Half16 h;
  std::memcpy(&h, p, sizeof h);
  return as_floats(__builtin_convertvector(h, Bits16) << 16);
}

inline void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof v); }

// The largest and the sum of a vector's 16 lanes, in four halving steps (a loop over the lanes
// compiles to 15 dependent scalar operations and a shuffle for each).
inline Vec16 fold16(Vec16 v, bool take_max) {
  constexpr Vec16i kSwap[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7},
                               {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11},
                               {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13},
                               {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}};
  for (const Vec16i& swap : kSwap) {
    const Vec16 w = __builtin_shuffle(v, swap);
    v = take_max ? (v > w ? v : w) : v + w;
  }
  return v;
}
inline float max16(Vec16 v) { return fold16(v, true)[0]; }
inline float sum16(Vec16 v) { return fold16(v, false)[0]; }

// Lanes of (a, b) that interleave them: a0 b0 a1 b1 ... (low half), a8 b8 ... (high half).
inline constexpr Vec16i kInterleaveLow = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
inline constexpr Vec16i kInterleaveHigh = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// e^x to ~1e-7 relative error, 16 at a time (libm's expf is one call per value): 2^n * e^r with
// n = round(x / ln 2), r = x - n ln 2, |r| <= ln2 / 2, and a degree-6 Taylor polynomial for e^r.
// x is clamped to [-87, 88]: below, ~1e-38 (never a denormal), above, ~1.6e38 (never inf).
inline Vec16 exp16(Vec16 x) {
  const Vec16 lo = Vec16{} - 87.f, hi = Vec16{} + 88.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const Vec16 shifter = Vec16{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec16 n = (x * 1.44269504f + shifter) - shifter;
  const Vec16 r = x - n * 0.693147181f;
  Vec16 p = Vec16{} + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const Vec16i bits = (__builtin_convertvector(n, Vec16i) + 127) << 23;  // 2^n
  Vec16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Rows of w read at once, one from each of kStreams equal stretches of the rows. The CPU's
// prefetchers follow a stream within a 4 KB page; reading many pages at once keeps more memory
// requests in flight. On the 2-core development VM a 2 MB [1024, 512] matrix streamed at ~15 GB/s
// four consecutive rows at a time, ~19 GB/s sixteen stretches at a time (BENCHMARKS.md).
inline constexpr int64_t kStreams = 16;

// out[r, :] += x[r, k0:k1] @ w[k0:k1, :n] for the R rows of x (`x_stride` apart) and out (`n` apart);
// the rows of w are `ldw` apart.
//
// bfloat16 weights go a 64-byte line (32 weights) at a time: a bfloat16 is the top half of a
// float32, so the line's 16 even-indexed weights are its 32-bit lanes shifted left by 16 and the
// 16 odd ones the lanes with the low half cleared. Two plain ALU operations per line, where
// widening 16 values at a time took shuffles that bound the loop to ~70% of the memory's speed;
// the even and odd sums are interleaved back once per line, after all the streams. A software
// prefetch eight lines ahead in each stream helps here (+7-11% measured), unlike in float32.
template <int R, typename W>
inline void accumulate(const float* __restrict x, int64_t x_stride, const W* __restrict w, int64_t ldw, int64_t k0,
                int64_t k1, int64_t n, float* __restrict out) {
  constexpr bool kBf16 = std::is_same_v<W, uint16_t>;
  const int64_t span = (k1 - k0) / kStreams, n_vec = kBf16 ? n / 32 * 32 : n / 16 * 16;
  for (int64_t i = 0; i < span; ++i) {  // row i of every stretch
    const W* row[kStreams];
    float xs[R][kStreams];
    for (int64_t s = 0; s < kStreams; ++s) {
      const int64_t k = k0 + s * span + i;
      row[s] = w + k * ldw;
      for (int r = 0; r < R; ++r) xs[r][s] = x[r * x_stride + k];
    }
    if constexpr (kBf16) {
      for (int64_t j = 0; j < n_vec; j += 32) {
        Vec16 even[R][2] = {}, odd[R][2] = {};  // two sums each: one chain of dependent adds runs at half speed
#pragma GCC unroll 16
        for (int64_t s = 0; s < kStreams; ++s) {
          __builtin_prefetch(row[s] + j + 256);
          Bits16 line;
          std::memcpy(&line, row[s] + j, sizeof line);
          const Vec16 e = as_floats(line << 16), o = as_floats(line & 0xFFFF0000u);
          for (int r = 0; r < R; ++r) even[r][s & 1] += xs[r][s] * e, odd[r][s & 1] += xs[r][s] * o;
        }
        for (int r = 0; r < R; ++r) {
          const Vec16 e = even[r][0] + even[r][1], o = odd[r][0] + odd[r][1];
          store16(out + r * n + j, load16(out + r * n + j) + __builtin_shuffle(e, o, kInterleaveLow));
          store16(out + r * n + j + 16, load16(out + r * n + j + 16) + __builtin_shuffle(e, o, kInterleaveHigh));
        }
      }
    } else {
      for (int64_t j = 0; j < n_vec; j += 16) {
        Vec16 acc[R][2];  // two sums per row: one chain of dependent adds runs at half speed
        for (int r = 0; r < R; ++r) acc[r][0] = load16(out + r * n + j), acc[r][1] = Vec16{};
#pragma GCC unroll 16  // unrolled, acc[r][s & 1] is a register; GCC left it on the stack where inlined
        for (int64_t s = 0; s < kStreams; ++s) {
          const Vec16 v = load16(row[s] + j);
          for (int r = 0; r < R; ++r) acc[r][s & 1] += xs[r][s] * v;
        }
        for (int r = 0; r < R; ++r) store16(out + r * n + j, acc[r][0] + acc[r][1]);
      }
    }
    for (int64_t j = n_vec; j < n; ++j)
      for (int r = 0; r < R; ++r)
        for (int64_t s = 0; s < kStreams; ++s) out[r * n + j] += xs[r][s] * to_float(row[s][j]);
  }
  for (int64_t k = k0 + kStreams * span; k < k1; ++k)  // the rows left over
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < n; ++j) out[r * n + j] += x[r * x_stride + k] * to_float(w[k * ldw + j]);
}

// accumulate() for any number of rows, up to 4 at a time (each pass over w serves all of them).
template <typename W>
inline void accumulate_rows(const float* x, int64_t x_stride, int64_t rows, const W* w, int64_t ldw, int64_t k0, int64_t k1,
                     int64_t n, float* out) {
  for (int64_t r = 0; r < rows; r += 4) {
    const float* xr = x + r * x_stride;
    float* o = out + r * n;
    switch (std::min<int64_t>(4, rows - r)) {
      case 1: accumulate<1>(xr, x_stride, w, ldw, k0, k1, n, o); break;
      case 2: accumulate<2>(xr, x_stride, w, ldw, k0, k1, n, o); break;
      case 3: accumulate<3>(xr, x_stride, w, ldw, k0, k1, n, o); break;
      default: accumulate<4>(xr, x_stride, w, ldw, k0, k1, n, o);
    }
  }
}

// Rows of w a work item's block of rows is a multiple of: the stretches (quant_matvec.h: groups).
template <typename W>
inline int64_t row_step(const W*) {
  return kStreams;
}

// Runs fn(item) for every item in [0, n): the calling thread and up to pool.num_threads() - 1 pool
// threads (one worker per core: the caller is not a pool thread) take items from a shared counter;
// returns when all items are done.
// XLA may run independent custom calls at the same time, each on a pool thread, and then a helper
// can sit in the queue behind the very calls that wait for it. So the caller never waits for a
// helper that has not started: once it has run out of items it closes the call, and a helper that
// starts later returns at once. (Waiting for every helper scheduled deadlocked: two calls, both
// threads spinning, each on a helper queued behind the other.)
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> working{0};  // helpers inside `work`
    std::atomic<bool> closed{false};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) fn(i);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t h = 0; h < helpers; ++h)
    pool.Schedule([state, work] {
      state->working.fetch_add(1);  // enter, then look: the caller closes, then looks (both seq_cst)
      if (!state->closed.load()) work();
      state->working.fetch_sub(1);
    });
  work();
  state->closed.store(true);
  while (state->working.load() > 0) std::this_thread::yield();  // a helper inside may still hold `fn`
}

// dtypes as numpy names them, for error messages.
inline const char* dtype_name(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::S8: return "int8";
    case ffi::DataType::U8: return "uint8";
    case ffi::DataType::PRED: return "bool";
    default: return "an unsupported dtype";
  }
}

// One buffer of a kernel as the kernel expects it: the dtypes it may have and its shape, one
// letter a dimension ("td": [t, d]; "": a scalar). A letter stands for one size in all of a
// kernel's buffers, so "td" for x and "edf" for w_gate say that w_gate's rows match x's width.
struct Operand {
  const char* name;  // as moecli/kernels/cpu/ffi.py calls it
  ffi::AnyBuffer buffer;
  std::initializer_list<ffi::DataType> dtypes;
  const char* dims;
};

// "[6, 20, 36]"; with letters, their sizes where known: "[6, 20, f]".
inline std::string shape_text(ffi::AnyBuffer::Dimensions dims) {
  std::string text;
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return "[" + text + "]";
}
inline std::string shape_text(const std::string& letters, const int64_t* size) {
  std::string text;
  for (size_t i = 0; i < letters.size(); ++i) {
    const int64_t known = size[letters[i] - 'a'];
    text += (i ? ", " : "") + (known < 0 ? std::string(1, letters[i]) : std::to_string(known));
  }
  return "[" + text + "]";
}

// Success, or an InvalidArgument error naming `kernel`, the first operand that is not as expected
// and what it is instead. Every handler checks all of its buffers with this before it reads one:
// the kernels read raw memory, so a float16 buffer taken for float32 (or a matrix narrower than
// its neighbour says) reads past its end: a segfault or garbage, not an error.
inline ffi::Error check_operands(const char* kernel, std::initializer_list<Operand> operands) {
  int64_t size[26];  // each letter's size, -1 until an operand shows it
  std::fill(size, size + 26, -1);
  for (const Operand& op : operands) {
    const std::string where = std::string(kernel) + ": " + op.name;
    const ffi::DataType type = op.buffer.element_type();
    if (std::find(op.dtypes.begin(), op.dtypes.end(), type) == op.dtypes.end()) {
      std::string allowed;
      for (ffi::DataType t : op.dtypes) allowed += (allowed.empty() ? "" : " or ") + std::string(dtype_name(t));
      return ffi::Error::InvalidArgument(where + " is " + dtype_name(type) + ", expected " + allowed);
    }
    const auto dims = op.buffer.dimensions();
    const std::string letters = op.dims;
    bool ok = dims.size() == letters.size();
    for (size_t i = 0; ok && i < letters.size(); ++i) {
      int64_t& known = size[letters[i] - 'a'];
      if (known < 0) known = dims[i];
      ok = known == dims[i];
    }
    if (!ok)
      return ffi::Error::InvalidArgument(where + " has shape " + shape_text(dims) + ", expected " +
                                         shape_text(letters, size));
  }
  return ffi::Error::Success();
}

// A checked buffer's elements (check_operands said they are T).
template <typename T>
inline T* data(ffi::AnyBuffer buffer) {
  return static_cast<T*>(buffer.untyped_data());
}

// The experts kernels' operands (decoding, cpu_kernels.cc; prompts, grouped_gemm.cc): x [t, d]
// float32, expert ids [t, k] int32, gate weights [t, k] float32, w_gate, w_up [e, d, f] and
// w_down [e, f, d], all three float32 or all three bfloat16 -> y [t, d] float32. Every buffer is
// bound untyped and checked here, so that a wrong one gets an error that names the kernel.
inline auto experts_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>();
}
inline ffi::Error check_experts(const char* kernel, ffi::AnyBuffer x, ffi::AnyBuffer experts, ffi::AnyBuffer gates,
                                ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up, ffi::AnyBuffer w_down, ffi::AnyBuffer y) {
  const ffi::DataType weights = w_gate.element_type();
  return check_operands(kernel, {{"x", x, {ffi::F32}, "td"},
                                 {"expert_ids", experts, {ffi::S32}, "tk"},
                                 {"gate_weights", gates, {ffi::F32}, "tk"},
                                 {"w_gate", w_gate, {ffi::F32, ffi::BF16}, "edf"},
                                 {"w_up", w_up, {weights}, "edf"},
                                 {"w_down", w_down, {weights}, "efd"},
                                 {"y", y, {ffi::F32}, "td"}});
}

// The dense products' operands (matvec, cpu_kernels.cc; matmul, grouped_gemm.cc): x [m, k]
// float32 and w [k, n] float32 or bfloat16 -> y [m, n] float32.
inline auto product_binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>();
}
inline ffi::Error check_product(const char* kernel, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer y) {
  return check_operands(kernel, {{"x", x, {ffi::F32}, "mk"}, {"w", w, {ffi::F32, ffi::BF16}, "kn"}, {"y", y, {ffi::F32}, "mn"}});
}

}  // namespace moecli
