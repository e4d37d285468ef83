"""The CPU backend: the C++ kernels where they are built, and XLA:CPU's workarounds either way.

What XLA:CPU needs that other backends do not, kept here rather than in the model:
- keys cached transposed, [batch, kv_heads, head_dim, max_len], so both attention products are
  plain [rows, inner] x [inner, cols] products read in place (with keys as rows, XLA:CPU
  transposed the whole key cache on every decode step; the C++ attention reads them this way too);
- a float32 KV cache whatever the weights' dtype: XLA:CPU's bfloat16 attention dots run ~20x
  slower than float32 ones, and the cache is small beside the weights;
- RoPE's cos and sin computed apart (`isolate`): XLA:CPU fuses elementwise producers into every
  consumer, evaluating them again for every head of q and k (~6% of a 512-token prompt);
- one decoding token's attention as a broadcast multiply and a sum, which XLA fuses into one pass
  over the cache (as a dot, it copied the cache into another layout every step).
With the kernels (`moecli.kernels.cpu.ffi`; MOECLI_CPU_KERNELS=0 turns them off), matrix products,
attention and the experts run in C++ for float32, bfloat16 and quantized (q8/q4) weights, and MXFP4
experts (gpt-oss) and block-FP8 experts (DeepSeek-V3, Qwen3-FP8, ...) through packed matrix-vector
kernels; float16 weights, which the kernels do not read, take the XLA paths. Gradients always go through the pure-JAX references.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moecli.kernels.cpu import ffi
from moecli.kernels.gradients import with_reference_gradient
from moecli.model import experts as E
from moecli.model import fp8, mxfp4
from moecli.model.ops import Ops, attention_mask, experts_xla, matmul_xla, softmax_with_sinks
from moecli.model.quant import QuantizedWeight, weight_dtype
from moecli.model.router import Routing



def reads(dtype) -> bool:
    """Whether the C++ kernels multiply weights of `dtype` (float32, bfloat16; not float16)."""
    return jnp.dtype(dtype).name in ffi.WEIGHT_DTYPES


def isolate(fn, x):
    """fn(x), computed on its own rather than fused into its consumers. XLA fuses nothing across a
    conditional's boundary, and a predicate it cannot fold keeps the conditional (on CPU
    `optimization_barrier` is removed before fusion)."""
    flat = x.reshape(-1)
    return jax.lax.cond(flat[0] == flat[0], fn, fn, x)


def attention_product(a: jax.Array, b: jax.Array, seq: int) -> jax.Array:
    """a [batch, kv, group, t, inner] @ b [batch, kv, inner, cols] per head, in float32: q @ keys
    (inner = head_dim) or probs @ values (inner = positions). One decoding token (t = 1): a
    broadcast multiply and a sum over `inner`, one fused pass over the cache."""
    if seq == 1:
        return jnp.sum(a.astype(jnp.float32)[..., None] * b.astype(jnp.float32)[:, :, None, None], axis=-2)
    return jnp.einsum("bkgti,bkic->bkgtc", a.astype(b.dtype), b, preferred_element_type=jnp.float32)


def attend_xla_cpu(q, k, v, positions, window: int | None, sinks=None, scale: float | None = None,
                   chunk: int | None = None) -> jax.Array:
    """`moecli.model.ops.attend_xla` for transposed keys [b, kv, d, len], the XLA:CPU way."""
    scores = attention_product(q, k, q.shape[3]) * (q.shape[-1] ** -0.5 if scale is None else scale)
    mask = attention_mask(positions, jnp.arange(k.shape[-1]), window, chunk)  # [t, len] or [b, 1, 1, t, len]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)     # [b, kv, group, t, len]
    return attention_product(softmax_with_sinks(scores, sinks), v, q.shape[3])


def attend_kernel(q, k, v, positions, window: int | None, sinks=None, scale: float | None = None,
                  chunk: int | None = None) -> jax.Array:
    """Causal attention in C++ (csrc/attention.cc): it visits only the keys each query may see,
    where XLA computes and masks the whole fixed-size cache (~2x the work for a prompt, and all of
    max_len for every decoded token). The kernel has no sinks and one head size for keys and values;
    other attention (gpt-oss's sinks, latent attention's value size, Llama-4's chunks) takes the XLA:CPU path."""
    if sinks is not None or v.shape[-1] != q.shape[-1] or chunk is not None:
        return attend_xla_cpu(q, k, v, positions, window, sinks, scale, chunk)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kernel = lambda q, k, v, positions: ffi.attention(  # noqa: E731
        q.astype(jnp.float32) * scale, k, v, positions[..., 0], window)  # each row's first position
    reference = lambda q, k, v, positions: attend_xla_cpu(q, k, v, positions, window, None, scale)  # noqa: E731
    return with_reference_gradient(kernel, reference)(q, k, v, positions)


def matmul_kernel(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., k] @ w [k, n] in C++: decoding (a few rows) as matrix-vector products on every core
    (XLA:CPU streams float32 weights ~20% slower, and converts bfloat16 ones to a float32 copy first,
    ~20x slower); a prompt as a packed matrix product (~1.2x XLA's float32 dot; bfloat16 on AMX tiles
    or AVX512-BF16 where the CPU has them)."""
    out_dtype = out_dtype or x.dtype
    if isinstance(w, QuantizedWeight):  # integers unpacked in registers; inference only (no gradient)
        # A prompt's float32 x takes the float32 engine (`ffi.prompt_engine_cap`), exact.
        kernel = ffi.matvec_q if math.prod(x.shape[:-1]) <= ffi.DECODE_ROWS else ffi.matmul_q
        return kernel(x, w.q, w.scale).astype(out_dtype)
    if not reads(weight_dtype(w)):
        return matmul_xla(x, w, out_dtype)
    kernel = ffi.matvec if math.prod(x.shape[:-1]) <= ffi.DECODE_ROWS else ffi.matmul
    reference = lambda x, w: jnp.matmul(x, w, preferred_element_type=x.dtype)  # noqa: E731
    return with_reference_gradient(kernel, reference)(x, w).astype(out_dtype)


def experts_kernel(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False):
    """Dropless experts in C++. Decoding: each chosen expert read once, in place, on every core,
    bfloat16 widened in registers (~3x `experts_scanned` in float32, ~30x in bfloat16). A prompt: one
    grouped matrix product in which each expert multiplies exactly its own tokens (~2x
    `experts_blocked`, which pads every expert to whole blocks). Ids outside [0, n_experts) skipped."""

    def reference(x, experts, weights, w_gate, w_up, w_down):
        return E.experts_blocked(x, w_gate, w_up, w_down, Routing(experts, weights, None), n_experts)

    kernel = with_reference_gradient(ffi.experts, reference)
    return kernel(x, routing.experts, routing.weights, w_gate, w_up, w_down)


def experts_kernel_q(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False):
    """Dropless experts in C++ on quantized weights (`moecli.model.quant`): each packed byte read
    once, unpacked and scaled in registers when decoding; dequantized while packing for a prompt's
    grouped product, on the float32 engine for float32 activations (`ffi.prompt_engine_cap`).
    Inference only: training never sees quantized weights."""
    y = ffi.experts_q(x, routing.experts, routing.weights, w_gate.q, w_gate.scale, w_up.q, w_up.scale,
                      w_down.q, w_down.scale)
    return y.astype(x.dtype)


def gathered_experts(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, glu, biases, matvec):
    """Dropless experts of any gating and biases from a gathered product `matvec(rows [n, in], ids [n], w)
    -> float32 [n, out]` (a packed kernel: each chosen expert's bytes read once): the gate, up and down
    products of every assignment by it, the biases and gating in JAX, in float32, between them. Tokens
    of one expert share its reads, so prompts take it too. Ids outside [0, n_experts) contribute 0."""
    tokens, top_k = routing.experts.shape
    ids = routing.experts.reshape(-1)                                     # [n] assignments, token-major
    here = (ids >= 0) & (ids < n_experts)
    b_gate, b_up, b_down = biases or (None, None, None)

    def product(rows, w, b):                                              # [n, in] -> float32 [n, out]
        y = matvec(rows, ids, w)
        return y if b is None else y + b[jnp.where(here, ids, 0)].astype(jnp.float32)

    xs = jnp.repeat(x, top_k, axis=0)                                     # [n, d]
    hidden = glu(product(xs, w_gate, b_gate), product(xs, w_up, b_up))    # [n, f]
    y = jnp.where(here[:, None], product(hidden, w_down, b_down), 0)      # [n, d]
    y = jnp.einsum("tk,tkd->td", routing.weights.astype(jnp.float32), y.reshape(tokens, top_k, -1))
    return y.astype(x.dtype)


def experts_kernel_mxfp4(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False,
                         glu=E.silu_glu, biases=None):
    """Dropless experts of any gating and biases (gpt-oss's clamped SwiGLU) on MXFP4 weights
    (`moecli.model.mxfp4`), `gathered_experts` over the packed kernel (csrc/mxfp4.cc: each chosen
    expert's bytes read once, unpacked by a table in registers, ~7.5x fewer bytes than float32).
    Inference only: training never sees MXFP4 weights."""
    return gathered_experts(x, w_gate, w_up, w_down, routing, n_experts, glu, biases,
                            lambda rows, ids, w: ffi.expert_matvec_mxfp4(rows, ids, w.blocks, w.scales))


def experts_kernel_fp8(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False,
                       glu=E.silu_glu, biases=None):
    """Dropless experts on block-FP8 weights (`moecli.model.fp8`: DeepSeek-V3, Qwen3-FP8, ...),
    `gathered_experts` over the packed kernel (csrc/fp8.cc: each chosen expert's e4m3 bytes read once,
    converted in registers and scaled a block at a time: half the bytes of bfloat16). Prompts take it
    too (an expert's tokens 4 at a time over its codes in cache). Inference only."""
    return gathered_experts(x, w_gate, w_up, w_down, routing, n_experts, glu, biases,
                            lambda rows, ids, w: ffi.expert_matvec_fp8(rows, ids, w.weight, w.scale, w.block))


def pick_experts(tokens: int, top_k: int, n_experts: int, dtype):
    if jnp.dtype(dtype) in (jnp.int8, jnp.uint8):   # a QuantizedWeight's integers
        return experts_kernel_q
    if jnp.dtype(dtype) == jnp.dtype(mxfp4.DTYPE):  # MXFP4 (`quant.weight_dtype`)
        return experts_kernel_mxfp4
    if jnp.dtype(dtype) == jnp.dtype(fp8.DTYPE):    # block-FP8
        return experts_kernel_fp8
    return experts_kernel if reads(dtype) else experts_xla(tokens, top_k, n_experts, dtype)


def pick_gated_experts(tokens: int, top_k: int, n_experts: int, dtype):
    """`Ops.gated_experts`: MXFP4 and block-FP8 weights through their kernels, others the pure-JAX experts."""
    if jnp.dtype(dtype) == jnp.dtype(mxfp4.DTYPE):
        return experts_kernel_mxfp4
    if jnp.dtype(dtype) == jnp.dtype(fp8.DTYPE):
        return experts_kernel_fp8
    return experts_xla(tokens, top_k, n_experts, dtype)


def cpu_ops() -> Ops:
    """The CPU backend's operations: the C++ kernels when built (else why not, in `notes`)."""
    common = dict(keys_transposed=True, float32_cache=True, isolate=isolate)
    if ffi.available():
        return Ops("cpu-kernels", matmul=matmul_kernel, attention=attend_kernel, experts=pick_experts,
                   gated_experts=pick_gated_experts, notes=(ffi.status(),), **common)
    return Ops("xla-cpu", attention=attend_xla_cpu, notes=(ffi.status(),), **common)
