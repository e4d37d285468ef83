// Batch-1 decoding kernels for XLA:CPU, registered as XLA FFI custom calls (see moecli/kernels/cpu/ffi.py).
//
// Why: decoding one token is a chain of matrix-vector products, bound by how fast the weights stream
// from memory. XLA:CPU leaves a lot of that bandwidth unused for MoE decoding:
//   - an expert picked at run time is a dynamic slice of the [experts, d, f] stack, and XLA copies
//     the slice before its dot (an extra pass over the weights, measured ~5 GB/s in all);
//   - a 2 MB matrix-vector product runs on one core (~9 GB/s), where two cores read ~20 GB/s;
//   - bfloat16 weights are converted to float32 in memory before the dot (~1 GB/s).
// These kernels read each chosen weight once, in place, convert bfloat16 to float32 in registers,
// accumulate in float32, and split the work over XLA's own intra-op thread pool.
//
// Both kernels are plain loops the compiler vectorises (built with -O3 -march=native). Their
// quantized twins (moecli_matvec_q, moecli_experts_q: int8 / int4 weights with float16 scales,
// csrc/quant_unpack.h) share the same work split; only the inner loop differs (quant_matvec.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "quant_matvec.h"
#include "quant_operands.h"

namespace {

using moecli::data;
using moecli::parallel_for;
using moecli::to_float;
namespace ffi = xla::ffi;

// A vector-matrix product x[rows, k] @ w[k, n] (x rows `x_stride` apart) whose result goes to `out`.
// Weights: `const float*`, `const uint16_t*` (bfloat16) or QuantWeights (quant_unpack.h).
template <typename Weights>
struct Product {
  const float* x;
  int64_t x_stride, rows;
  Weights w;
  float* out;  // [rows, n]
};

// Computes every product (all with the same k and n) on the thread pool. Each product is split
// into row blocks of w, so every work item streams one contiguous stretch of memory (what the
// hardware prefetcher likes); the blocks' partial sums are added up at the end. A block is a
// multiple of row_step(w) rows: sixteen stretches, or whole groups of quantized weights.
template <typename Weights>
void run_products(ffi::ThreadPool& pool, const std::vector<Product<Weights>>& products, int64_t k, int64_t n) {
  const int64_t count = products.size(), threads = std::max<int64_t>(1, pool.num_threads());
  if (count == 0) return;
  const int64_t step = moecli::row_step(products[0].w);
  const int64_t splits = std::min<int64_t>((2 * threads + count - 1) / count, std::max<int64_t>(1, k / step));
  const int64_t block = moecli::round_up((k + splits - 1) / splits, step);
  int64_t max_rows = 0;
  for (auto& p : products) max_rows = std::max(max_rows, p.rows);
  std::vector<float> partial(count * splits * max_rows * n, 0.f);  // [product, split, row, n]
  parallel_for(pool, count * splits, [&](int64_t item) {
    const Product<Weights>& p = products[item / splits];
    const int64_t k0 = (item % splits) * block, k1 = std::min(k, k0 + block);
    if (k0 >= k1) return;  // rounding the blocks up left this one empty
    float* part = partial.data() + item * max_rows * n;
    moecli::accumulate_rows(p.x, p.x_stride, p.rows, p.w, n, k0, k1, n, part);
  });
  for (int64_t c = 0; c < count; ++c) {
    const Product<Weights>& p = products[c];
    for (int64_t r = 0; r < p.rows; ++r) {
      float* out = p.out + r * n;
      std::fill(out, out + n, 0.f);
      for (int64_t s = 0; s < splits; ++s) {
        const float* part = partial.data() + ((c * splits + s) * max_rows + r) * n;
        for (int64_t j = 0; j < n; ++j) out[j] += part[j];
      }
    }
  }
}

// y[t] = sum over the token's assignments a of weight[a] * SwiGLU_e(x[t]), e = expert[a]:
// down(silu(x @ gate_e) * (x @ up_e)). Assignments whose expert id is outside [0, n_experts)
// (another device's expert, see moecli.sharding) are skipped. The weights: stacks of n_experts
// matrices, [d, f] (g, u) and [f, d] (dn).
template <typename Weights>
ffi::Error ExpertsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer experts, ffi::AnyBuffer gates, Weights g,
                       Weights u, Weights dn, int64_t n_experts, int64_t f, ffi::AnyBuffer y) {
  const int64_t tokens = x.dimensions()[0], d = x.dimensions()[1];
  const int64_t top_k = experts.dimensions()[1];
  const int64_t n = tokens * top_k;
  const int32_t* expert = data<const int32_t>(experts);
  const float *xs = data<const float>(x), *gate = data<const float>(gates);
  std::vector<float> hg(n * f, 0.f), hu(n * f, 0.f), yd(n * d, 0.f);

  std::vector<Product<Weights>> up_products, down_products;  // 1. gate and up projections
  for (int64_t a = 0; a < n; ++a) {
    int64_t e = expert[a];
    if (e < 0 || e >= n_experts) continue;
    const float* xt = xs + (a / top_k) * d;
    up_products.push_back({xt, d, 1, g + e * d * f, hg.data() + a * f});
    up_products.push_back({xt, d, 1, u + e * d * f, hu.data() + a * f});
    down_products.push_back({hg.data() + a * f, f, 1, dn + e * f * d, yd.data() + a * d});
  }
  run_products(pool, up_products, d, f);
  for (int64_t i = 0; i < n * f; ++i) {  // hidden = silu(gate) * up
    float v = hg[i];
    hg[i] = v / (1.f + std::exp(-v)) * hu[i];
  }
  run_products(pool, down_products, f, d);  // 2. down projection
  float* out = data<float>(y);  // 3. weighted sum over each token's assignments
  std::fill(out, out + tokens * d, 0.f);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t j = 0; j < d; ++j) out[(a / top_k) * d + j] += gate[a] * yd[a * d + j];
  return ffi::Error::Success();
}

ffi::Error Experts(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer experts, ffi::AnyBuffer gates,
                   ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up, ffi::AnyBuffer w_down, ffi::Result<ffi::AnyBuffer> y) {
  if (ffi::Error error = moecli::check_experts("moecli_experts", x, experts, gates, w_gate, w_up, w_down, *y);
      error.failure())
    return error;
  const int64_t n_experts = w_gate.dimensions()[0], f = w_gate.dimensions()[2];
  auto run = [&](auto w) {
    using W = decltype(w);
    return ExpertsImpl(pool, x, experts, gates, data<const W>(w_gate), data<const W>(w_up), data<const W>(w_down),
                       n_experts, f, *y);
  };
  return w_gate.element_type() == ffi::BF16 ? run(uint16_t{}) : run(float{});
}

// y[rows, n] = x[rows, k] @ w[k, n]: one product, split into row blocks over the threads.
template <typename Weights>
ffi::Error MatvecImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, Weights w, int64_t n, ffi::AnyBuffer y) {
  const int64_t rows = x.dimensions()[0], k = x.dimensions()[1];
  run_products<Weights>(pool, {{data<const float>(x), k, rows, w, data<float>(y)}}, k, n);
  return ffi::Error::Success();
}

ffi::Error Matvec(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  if (ffi::Error error = moecli::check_product("moecli_matvec", x, w, *y); error.failure()) return error;
  const int64_t n = w.dimensions()[1];
  if (w.element_type() == ffi::BF16) return MatvecImpl(pool, x, data<const uint16_t>(w), n, *y);
  return MatvecImpl(pool, x, data<const float>(w), n, *y);
}

ffi::Error MatvecQ(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer scale,
                   ffi::Result<ffi::AnyBuffer> y) {
  if (ffi::Error error = moecli::check_quantized_product("moecli_matvec_q", x, q, scale, *y); error.failure())
    return error;
  return moecli::with_quantized(q, scale, x.dimensions()[1],
                                [&](auto w) { return MatvecImpl(pool, x, w, q.dimensions()[1], *y); });
}

ffi::Error ExpertsQ(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer experts, ffi::AnyBuffer gates,
                    ffi::AnyBuffer gate_q, ffi::AnyBuffer gate_s, ffi::AnyBuffer up_q, ffi::AnyBuffer up_s,
                    ffi::AnyBuffer down_q, ffi::AnyBuffer down_s, ffi::Result<ffi::AnyBuffer> y) {
  if (ffi::Error error = moecli::check_quantized_experts("moecli_experts_q", x, experts, gates, gate_q, gate_s, up_q,
                                                         up_s, down_q, down_s, *y);
      error.failure())
    return error;
  return moecli::with_quantized_experts(x, gate_q, gate_s, up_q, up_s, down_q, down_s,
                                        [&](auto g, auto u, auto dn, int64_t n_experts, int64_t f) {
                                          return ExpertsImpl(pool, x, experts, gates, g, u, dn, n_experts, f, *y);
                                        });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliExperts, Experts, moecli::experts_binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliMatvec, Matvec, moecli::product_binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliMatvecQ, MatvecQ, moecli::quantized_product_binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoecliExpertsQ, ExpertsQ, moecli::quantized_experts_binding());

// The vector path of the quantized kernels in this build: "avx512", "avx2" or "generic" (ffi.py's
// cpu_isa(), for --verbose and the tests of MOECLI_CPU_ISA).
extern "C" const char* MoecliQuantIsa() { return moecli::kQuantIsa; }
