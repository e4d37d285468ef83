// The operands of the quantized kernels (csrc/cpu_kernels.cc: moecli_matvec_q, moecli_experts_q;
// csrc/grouped_gemm.cc: moecli_matmul_q, moecli_grouped_experts_q), checked before any is read:
// the layout is csrc/quant_unpack.h's, and a matrix whose bytes or scales are fewer than its
// shape says would be read past its end.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "common.h"
#include "quant_unpack.h"

namespace moecli {

// After check_operands: that the quantized matrix q [..., rows, n] (int8: q8, uint8: q4) with
// scale [..., groups, n] has k rows (x's width): rows == k in q8, k / 2 (two rows a byte) in q4,
// and groups divides k into groups of G = k / groups rows (G even in q4: a byte's rows share one).
inline ffi::Error check_quantized(const char* kernel, const char* q_name, ffi::AnyBuffer q, const char* scale_name,
                                  ffi::AnyBuffer scale, int64_t k) {
  const bool q4 = q.element_type() == ffi::U8;
  const auto qd = q.dimensions(), sd = scale.dimensions();
  const int64_t rows = qd[qd.size() - 2], groups = sd[sd.size() - 2];
  const std::string where = std::string(kernel) + ": ";
  if (q4 && k % 2)
    return ffi::Error::InvalidArgument(where + "uint8 (int4) " + q_name + " packs rows in pairs, but its matrix has " +
                                       std::to_string(k) + " rows");
  if (rows != (q4 ? k / 2 : k))
    return ffi::Error::InvalidArgument(where + q_name + " has shape " + shape_text(qd) + ", expected " +
                                       std::to_string(q4 ? k / 2 : k) + " rows" +
                                       (q4 ? " (uint8: two int4 rows a byte) of a matrix of " : " of a matrix of ") +
                                       std::to_string(k) + " rows");
  if (groups < 1 || k % groups || (q4 && (k / groups) % 2))
    return ffi::Error::InvalidArgument(where + scale_name + " has shape " + shape_text(sd) + ": " +
                                       std::to_string(groups) + " groups do not split " + std::to_string(k) +
                                       (q4 ? " rows into groups of an even size" : " rows into equal groups"));
  return ffi::Error::Success();
}

// The quantized products' operands (moecli_matvec_q, moecli_matmul_q): x [m, k] float32, q int8
// [k, n] or uint8 [k / 2, n], scale float16 [k / G, n] -> y [m, n] float32.
inline auto quantized_product_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>();
}
inline ffi::Error check_quantized_product(const char* kernel, ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer scale,
                                          ffi::AnyBuffer y) {
  if (ffi::Error error = check_operands(kernel, {{"x", x, {ffi::F32}, "mk"},
                                                 {"q", q, {ffi::S8, ffi::U8}, "rn"},
                                                 {"scale", scale, {ffi::F16}, "gn"},
                                                 {"y", y, {ffi::F32}, "mn"}});
      error.failure())
    return error;
  return check_quantized(kernel, "q", q, "scale", scale, x.dimensions()[1]);
}

// The quantized experts' operands (moecli_experts_q, moecli_grouped_experts_q): those of
// experts_binding with each weight a (q, scale) pair: x, expert_ids, gate_weights, w_gate_q,
// w_gate_scale, w_up_q, w_up_scale, w_down_q, w_down_scale; all three q of one dtype.
inline auto quantized_experts_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>();
}
inline ffi::Error check_quantized_experts(const char* kernel, ffi::AnyBuffer x, ffi::AnyBuffer experts,
                                          ffi::AnyBuffer gates, ffi::AnyBuffer gate_q, ffi::AnyBuffer gate_s,
                                          ffi::AnyBuffer up_q, ffi::AnyBuffer up_s, ffi::AnyBuffer down_q,
                                          ffi::AnyBuffer down_s, ffi::AnyBuffer y) {
  const ffi::DataType packed = gate_q.element_type();
  if (ffi::Error error = check_operands(kernel, {{"x", x, {ffi::F32}, "td"},
                                                 {"expert_ids", experts, {ffi::S32}, "tk"},
                                                 {"gate_weights", gates, {ffi::F32}, "tk"},
                                                 {"w_gate_q", gate_q, {ffi::S8, ffi::U8}, "erf"},
                                                 {"w_gate_scale", gate_s, {ffi::F16}, "egf"},
                                                 {"w_up_q", up_q, {packed}, "erf"},
                                                 {"w_up_scale", up_s, {ffi::F16}, "egf"},
                                                 {"w_down_q", down_q, {packed}, "esd"},
                                                 {"w_down_scale", down_s, {ffi::F16}, "ehd"},
                                                 {"y", y, {ffi::F32}, "td"}});
      error.failure())
    return error;
  const int64_t d = x.dimensions()[1], f = gate_q.dimensions()[2];
  if (ffi::Error error = check_quantized(kernel, "w_gate_q", gate_q, "w_gate_scale", gate_s, d); error.failure())
    return error;
  return check_quantized(kernel, "w_down_q", down_q, "w_down_scale", down_s, f);  // w_up: w_gate's shapes
}

// A checked (q, scale) pair of a matrix of `rows` rows as QuantWeights: G = rows / the scale's rows.
template <bool Q4>
QuantWeights<Q4> quantized_view(ffi::AnyBuffer q, ffi::AnyBuffer scale, int64_t rows) {
  const auto sd = scale.dimensions();
  return {data<const typename QuantWeights<Q4>::Byte>(q), data<const uint16_t>(scale), rows / sd[sd.size() - 2]};
}

// run(w): the kernel body for the checked pair (q, scale), q8 (int8 q) or q4 (uint8 q).
template <typename Run>
ffi::Error with_quantized(ffi::AnyBuffer q, ffi::AnyBuffer scale, int64_t rows, Run run) {
  if (q.element_type() == ffi::U8) return run(quantized_view<true>(q, scale, rows));
  return run(quantized_view<false>(q, scale, rows));
}

// run(w_gate, w_up, w_down, n_experts, f): the experts' body for their checked (q, scale) pairs,
// all three of one kind (check_quantized_experts).
template <typename Run>
ffi::Error with_quantized_experts(ffi::AnyBuffer x, ffi::AnyBuffer gate_q, ffi::AnyBuffer gate_s, ffi::AnyBuffer up_q,
                                  ffi::AnyBuffer up_s, ffi::AnyBuffer down_q, ffi::AnyBuffer down_s, Run run) {
  const int64_t d = x.dimensions()[1], f = gate_q.dimensions()[2], n_experts = gate_q.dimensions()[0];
  auto views = [&](auto q4) {
    constexpr bool Q4 = decltype(q4)::value;
    return run(quantized_view<Q4>(gate_q, gate_s, d), quantized_view<Q4>(up_q, up_s, d),
               quantized_view<Q4>(down_q, down_s, f), n_experts, f);
  };
  return gate_q.element_type() == ffi::U8 ? views(std::true_type{}) : views(std::false_type{});
}

}  // namespace moecli
