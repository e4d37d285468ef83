"""Pallas kernels for MoE experts on GPUs: decoding reads each chosen expert once, in place;
prompts run every expert's block of tokens as one grouped GEMM.

Decoding one token multiplies a vector by k experts' [d, f] matrices picked at run time, so its
floor is HBM bandwidth. The pure-JAX path (`moe.experts_scanned`) indexes the expert stack with a
traced id, and XLA may copy that slice before its dot: an extra pass over the weights. Gathering
the k experts into a new array and one batched einsum reads them twice too, and
`jax.lax.ragged_dot` has no fast path for this on GPU (issue 6 measured it slower than gathering).
`gathered_matvec` computes, for every assignment a (a token's pick of expert ids[a]):

    out[s, a, cols] = x[a, rows_s] @ W[ids[a], rows_s, cols]

on a grid of (split s, assignment a, column block): each program streams its own [rows_s, cols]
tile of its expert's matrix straight from HBM, in row chunks, accumulating in float32. Splitting
the rows ("split-K", as in GEMV kernels) keeps hundreds of programs in flight even for one token
with a 2,048-row matrix; the splits' partial sums (a few KB) are added by XLA. The SwiGLU expert
is three such products: gate and up, then silu(gate) * up through the down matrix.

A prompt's tokens are sorted into blocks by expert (`moe.sort_into_blocks`, as MegaBlocks does),
and `grouped_matmul` multiplies every block by its expert's matrix in one kernel on the tensor
cores, where the pure-JAX `moe.experts_blocked` runs a scan of small products.

Written with Pallas's Triton lowering (`pallas.triton.CompilerParams`). They have never run on a
GPU: the tests run them in Pallas's interpreter on CPU against the pure-JAX experts and lower them
for CUDA at the real models' shapes, and `bench/gpu.sh` is the prepared script that will first
run and time them on one (BENCHMARKS.md). Until it has, they are opt-in (MOECLI_GPU_KERNELS=1;
`moecli.kernels.gpu.backend`). Block shapes are powers of two (Triton's rule), so the kernels
apply where the matrices' sides are multiples of 16 (and a stack has under 2^31 elements:
Triton's addresses are 32-bit offsets); elsewhere, or if the kernels fail their self-check on the
GPU at hand, moecli uses the pure-JAX paths.
"""
from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp

from moecli.errors import first_line

TARGET_PROGRAMS = 1024   # enough programs to keep every SM of an H100/H200 streaming
ROW_CHUNK = 32           # rows of W per load: a [32, 128] bf16 tile is 8 KB in flight per program


@functools.cache
def self_check() -> str | None:
    """Compile and run both kernels once on a small case against XLA's einsum; None if they agree,
    else why not. A GPU, driver or JAX whose Triton path rejects a kernel (or miscomputes it) then
    runs the pure-JAX paths instead of failing: the kernels have never run on a GPU yet
    (BENCHMARKS.md). The check runs in a thread of its own: JAX's
    tracing state is per thread, and the first caller is usually tracing a decode step, into
    which the check's operations would otherwise be staged."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(_check).result()


def _check() -> str | None:
    try:
        kx, kw = jax.random.split(jax.random.PRNGKey(0))
        for dtype in (jnp.bfloat16, jnp.float32):  # the weights' dtypes: bf16 by default on a GPU
            x, w = (jax.random.normal(k, shape).astype(dtype) for k, shape in ((kx, (2, 64)), (kw, (3, 64, 32))))
            ids = jnp.array([2, 0], jnp.int32)
            want = jnp.einsum("ak,akn->an", x.astype(jnp.float32), w[ids].astype(jnp.float32))
            blocks = jnp.repeat(x, 16, axis=0)                              # two blocks of 16 rows
            want_blocks = jnp.repeat(want, 16, axis=0)
            if not (bool(jnp.allclose(gathered_matvec(x, ids, w), want, rtol=1e-3, atol=1e-3)) and bool(
                    jnp.allclose(grouped_matmul(blocks, ids, w), want_blocks, rtol=1e-2, atol=1e-2))):
                return "the self-check computed wrong numbers"
    except Exception as e:  # whatever the Triton toolchain raises: fall back, and say why in --verbose
        return f"the self-check failed: {type(e).__name__}: {first_line(e)}"
    return None


def applies(n_experts: int, d: int, f: int) -> bool:
    """Whether the kernels handle this expert stack: power-of-two blocks must tile its sides, and
    its element offsets must fit the 32-bit integers Triton computes addresses with."""
    return d % 16 == 0 and f % 16 == 0 and n_experts * d * f < 2**31


def _block(n: int, largest: int) -> int:
    """The largest power of two <= `largest` that divides n."""
    b = largest
    while n % b:
        b //= 2
    return b


def _kernel(ids_ref, x_ref, w_ref, out_ref, *, n_experts: int, rows: int, chunk: int, cols: int):
    # One program: split s, assignment a, column block j.
    # x_ref [A, K]; w_ref [E, K, N]; out_ref [S, A, N]; ids_ref [A] int32.
    from jax.experimental import pallas as pl

    s, a, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    expert = ids_ref[a]
    here = (expert >= 0) & (expert < n_experts)  # sharded experts: another device's id is skipped

    @pl.when(here)
    def _():
        def step(i, acc):
            r = s * rows + i * chunk
            xs = x_ref[a, pl.ds(r, chunk)].astype(jnp.float32)                         # [chunk]
            w = w_ref[expert, pl.ds(r, chunk), pl.ds(j * cols, cols)].astype(jnp.float32)  # [chunk, cols]
            return acc + jnp.sum(xs[:, None] * w, axis=0)
        acc = jax.lax.fori_loop(0, rows // chunk, step, jnp.zeros((cols,), jnp.float32))
        out_ref[s, a, pl.ds(j * cols, cols)] = acc

    @pl.when(jnp.logical_not(here))
    def _():
        out_ref[s, a, pl.ds(j * cols, cols)] = jnp.zeros((cols,), jnp.float32)


@functools.partial(jax.jit, static_argnames=("interpret",))
def gathered_matvec(x: jax.Array, ids: jax.Array, w: jax.Array, interpret: bool = False) -> jax.Array:
    """out[a] = x[a] @ w[ids[a]] in float32 for x [A, K], ids int32 [A], w [E, K, N]; rows whose id
    is outside [0, E) give zeros."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    (assignments, k), (n_experts, _, n) = x.shape, w.shape
    cols = _block(n, 128)
    chunk = _block(k, ROW_CHUNK)
    splits = 1  # split the rows while there are too few programs and whole chunks remain per split
    while assignments * (n // cols) * splits < TARGET_PROGRAMS and k % (2 * splits * chunk) == 0:
        splits *= 2
    kernel = functools.partial(_kernel, n_experts=n_experts, rows=k // splits, chunk=chunk, cols=cols)
    partial_sums = pl.pallas_call(
        kernel, grid=(splits, assignments, n // cols),
        out_shape=jax.ShapeDtypeStruct((splits, assignments, n), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=3), interpret=interpret,
    )(ids.astype(jnp.int32), x, w)
    return partial_sums.sum(axis=0)                                                       # [A, N]


def _grouped_kernel(block_expert_ref, x_ref, w_ref, out_ref, *, n_experts: int, block: int, chunk: int,
                    cols: int):
    # One program: row block b (all of one expert's rows), column block j.
    # x_ref [B * block, K]; w_ref [E, K, N]; out_ref [B * block, N]; block_expert_ref [B] int32.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    b, j = pl.program_id(0), pl.program_id(1)
    expert = block_expert_ref[b]
    rows, columns = pl.ds(b * block, block), pl.ds(j * cols, cols)

    @pl.when(expert < n_experts)
    def _():
        def step(i, acc):
            xs = x_ref[rows, pl.ds(i * chunk, chunk)]                                # [block, chunk]
            w = w_ref[expert, pl.ds(i * chunk, chunk), columns]                      # [chunk, cols]
            return acc + plt.dot(xs, w, allow_tf32=False)  # tensor cores for bf16; float32 stays float32
        acc = jax.lax.fori_loop(0, x_ref.shape[1] // chunk, step, jnp.zeros((block, cols), jnp.float32))
        out_ref[rows, columns] = acc

    @pl.when(expert >= n_experts)  # a spare block
    def _():
        out_ref[rows, columns] = jnp.zeros((block, cols), jnp.float32)


@functools.partial(jax.jit, static_argnames=("interpret",))
def grouped_matmul(xs: jax.Array, block_expert: jax.Array, w: jax.Array, interpret: bool = False) -> jax.Array:
    """A grouped matrix product over blocks of rows: out[rows of block b] = xs[rows of block b] @
    w[block_expert[b]] in float32, for xs [B * block, K] (rows sorted by expert, see
    `moe.sort_into_blocks`), block_expert int32 [B] (n_experts or more: a spare block, zeros) and
    w [E, K, N]. MegaBlocks' block-sparse product (Gale et al. 2022) as one kernel: each program
    multiplies one [block, K] x [K, cols] tile pair on the tensor cores, reading only its expert."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    (rows, k), (n_experts, _, n), n_blocks = xs.shape, w.shape, block_expert.shape[0]
    block, cols, chunk = rows // n_blocks, _block(n, 64), _block(k, 64)
    kernel = functools.partial(_grouped_kernel, n_experts=n_experts, block=block, chunk=chunk, cols=cols)
    return pl.pallas_call(
        kernel, grid=(n_blocks, n // cols), out_shape=jax.ShapeDtypeStruct((rows, n), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=3), interpret=interpret,
    )(block_expert, xs.astype(w.dtype), w)


def experts(x, expert_ids, gate_weights, w_gate, w_up, w_down, interpret: bool = False) -> jax.Array:
    """sum_k gate_weights[t, k] * SwiGLU_{expert_ids[t, k]}(x[t]) for a few tokens x [t, d], in
    float32 inside, returned in x's dtype; ids outside [0, experts) skipped (see moecli.model.sharding)."""
    tokens, top_k = expert_ids.shape
    ids = expert_ids.reshape(-1)
    xs = jnp.repeat(x, top_k, axis=0)                                     # [t * k, d], one row per assignment
    gate = gathered_matvec(xs, ids, w_gate, interpret=interpret)          # [t * k, f]
    up = gathered_matvec(xs, ids, w_up, interpret=interpret)
    hidden = (jax.nn.silu(gate) * up).astype(w_down.dtype)
    y = gathered_matvec(hidden, ids, w_down, interpret=interpret)        # [t * k, d]
    y = jnp.einsum("tk,tkd->td", gate_weights.astype(jnp.float32), y.reshape(tokens, top_k, -1))
    return y.astype(x.dtype)
