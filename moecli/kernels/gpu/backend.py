"""The GPU backend: plain XLA, with the Pallas expert kernels (`moecli.kernels.gpu.pallas`) opt-in.

The Pallas kernels have passed their tests in Pallas's interpreter and their CUDA lowering, but have
never run on a GPU, so XLA's own paths are the default until `bench/gpu.sh` has measured a gain.
MOECLI_GPU_KERNELS=1 turns them on; they then run a self-check on the GPU at hand (compiled once
and compared with XLA), and a kernel that fails it is left off — `--verbose` says why, and under
`--debug` (MOECLI_DEBUG) the failure is raised instead.
"""
from __future__ import annotations

import jax

from moecli import env
from moecli.kernels.gpu import pallas
from moecli.kernels.gradients import with_reference_gradient
from moecli.model import experts as E
from moecli.model.ops import Ops
from moecli.model.quant import is_packed
from moecli.model.router import Routing


def _with_fallback(kernel, fallback, x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool):
    """kernel(x, ids, gate weights, w_gate, w_up, w_down), with `fallback` (the pure-JAX path computing
    the same thing) for its gradients and for the expert stacks the kernels cannot take."""
    if is_packed(w_gate) or not pallas.applies(*w_gate.shape):  # integers or MXFP4: the pure-JAX path
        return fallback(x, w_gate, w_up, w_down, routing, n_experts, elsewhere)

    def reference(x, experts, weights, w_gate, w_up, w_down):
        return fallback(x, w_gate, w_up, w_down, Routing(experts, weights, None), n_experts, True)

    return with_reference_gradient(kernel, reference)(x, routing.experts, routing.weights, w_gate, w_up, w_down)


def experts_decode(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False):
    """Dropless decoding: each assignment's expert matrices streamed once, in place, split over
    hundreds of programs (`pallas.experts`)."""
    return _with_fallback(pallas.experts, E.experts_scanned, x, w_gate, w_up, w_down, routing, n_experts, elsewhere)


def experts_grouped(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False):
    """Dropless prompts: the blocks of `experts_blocked`, each projection one grouped GEMM over all
    blocks (`pallas.grouped_matmul`, on the tensor cores) rather than a scan of small products."""

    def kernel(x, experts, weights, w_gate, w_up, w_down):
        routing = Routing(experts, weights, None)
        blocks = E.sort_into_blocks(x, routing, n_experts, min_block=16)
        gate, up = (pallas.grouped_matmul(blocks.xs, blocks.expert, w) for w in (w_gate, w_up))
        hidden = (jax.nn.silu(gate) * up).astype(w_down.dtype)
        ys = pallas.grouped_matmul(hidden, blocks.expert, w_down)
        return E.combine_blocks(ys, blocks, routing).astype(x.dtype)

    return _with_fallback(kernel, E.experts_blocked, x, w_gate, w_up, w_down, routing, n_experts, elsewhere)


def pick_experts(tokens: int, top_k: int, n_experts: int, dtype):
    return experts_decode if tokens * top_k < n_experts else experts_grouped


def gpu_ops() -> Ops:
    if not env.switch("MOECLI_GPU_KERNELS"):
        return Ops("xla", notes=("GPU expert kernels: off (opt-in: MOECLI_GPU_KERNELS=1)",))
    why = pallas.self_check()
    if why is not None:
        if env.switch("MOECLI_DEBUG"):
            raise RuntimeError(f"the GPU expert kernels failed their self-check: {why}")
        return Ops("xla", notes=(f"GPU expert kernels: off ({why})",))
    return Ops("gpu-pallas", experts=pick_experts, notes=("GPU expert kernels: on (MOECLI_GPU_KERNELS=1)",))
