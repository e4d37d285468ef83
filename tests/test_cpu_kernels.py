"""The hand-written CPU kernels (moecli/csrc: decoding, grouped experts for prompts) against the pure-JAX paths."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moecli.kernels.cpu import ffi as cpu_kernels
from moecli.model.config import ModelConfig
from moecli.model.transformer import init_cache, transformed
from moecli.model.moe import route

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=cpu_kernels.status())


def upcast(*arrays):
    return [a.astype(jnp.float32) for a in arrays]


def experts_reference(x, w_gate, w_up, w_down, routing, n_experts, bf16_activations=False):
    """experts_dense in float32; with bf16_activations, rounding the inputs and the hidden
    activations to bfloat16 first, as the AMX and AVX512-BF16 engines do."""
    r = (lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)) if bf16_activations else (lambda a: a)
    w_gate, w_up, w_down = upcast(w_gate, w_up, w_down)
    hidden = jax.nn.silu(jnp.einsum("td,edf->tef", r(x), w_gate)) * jnp.einsum("td,edf->tef", r(x), w_up)
    y = jnp.einsum("tef,efd->ted", r(hidden), w_down)
    combine = jnp.sum(jax.nn.one_hot(routing.experts, n_experts) * routing.weights[..., None], axis=-2)
    return jnp.einsum("te,ted->td", combine, y)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens,d,f", [(1, 20, 36), (3, 20, 36), (40, 20, 36), (100, 300, 140), (30, 600, 530)])
def test_experts_kernel_equals_dense_reference(tokens, d, f, dtype):
    """Up to 8 tokens: the decoding kernel; more: the grouped one. Sizes off every block size
    (4, 16, 32, 128, 256, 512), so every loop's tail runs; 300 spans two blocks of depth, 530 and
    600 two of the grouped kernel's 512-column work items."""
    n_experts, top_k = 6, 3
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(tokens), 5)
    x = jax.random.normal(k1, (tokens, d))
    w_gate, w_up = ((jax.random.normal(k, (n_experts, d, f)) * 2 / d ** 0.5).astype(dtype) for k in (k2, k3))
    w_down = (jax.random.normal(k4, (n_experts, f, d)) * 2 / f ** 0.5).astype(dtype)
    routing = route(x[None], jax.random.normal(k5, (d, n_experts)), top_k, True)
    flat = type(routing)(*(t[0] for t in routing))
    rounded = dtype == jnp.bfloat16 and tokens > cpu_kernels.DECODE_ROWS and cpu_kernels.bf16_engine() != "float32"
    tolerance = dict(rtol=1e-3, atol=1e-2) if rounded else dict(rtol=1e-4, atol=1e-3)
    want = experts_reference(x, w_gate, w_up, w_down, flat, n_experts, rounded)
    got = jax.jit(cpu_kernels.experts)(x, flat.experts, flat.weights, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tolerance)
    # Ids outside [0, n_experts) are another device's experts: skipped.
    n_local = 4
    here = flat.experts < n_local
    local = flat._replace(experts=jnp.where(here, flat.experts, n_local), weights=jnp.where(here, flat.weights, 0.0))
    want = experts_reference(x, w_gate, w_up, w_down, local._replace(experts=jnp.minimum(local.experts, 5)), 6, rounded)
    got = cpu_kernels.experts(x, local.experts, local.weights, w_gate[:n_local], w_up[:n_local], w_down[:n_local])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tolerance)


@pytest.mark.parametrize("cap", cpu_kernels.BF16_ENGINES)
def test_every_bfloat16_prompt_engine_equals_its_reference(cap):
    """MOECLI_CPU_BF16=cap: the best engine for bfloat16 weights at or below `cap` that the CPU
    has (never one above it) multiplies a prompt's experts and dense products. AMX and
    AVX512-BF16 round the activations to bfloat16; the float32 engine widens the weights instead
    and rounds nothing. Sizes off every block: odd depths (pairs), 300 > one 256-row block."""
    code = """if True:
        import jax, jax.numpy as jnp, numpy as np
        from moecli.kernels.cpu import ffi as cpu_kernels
        from test_cpu_kernels import experts_reference, route
        rounded = cpu_kernels.bf16_engine() != "float32"
        r = (lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)) if rounded else (lambda a: a)
        ks = jax.random.split(jax.random.PRNGKey(0), 6)
        x = jax.random.normal(ks[0], (50, 41))
        w_gate, w_up = ((jax.random.normal(k, (4, 41, 70)) / 6).astype(jnp.bfloat16) for k in ks[1:3])
        w_down = (jax.random.normal(ks[3], (4, 70, 41)) / 8).astype(jnp.bfloat16)
        routing = route(x[None], jax.random.normal(ks[4], (41, 4)), 2, True)
        flat = type(routing)(*(t[0] for t in routing))
        got = cpu_kernels.experts(x, flat.experts, flat.weights, w_gate, w_up, w_down)
        want = experts_reference(x, w_gate, w_up, w_down, flat, 4, rounded)
        errors = [float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))]
        for rows, k, n in [(9, 20, 36), (300, 301, 130), (13, 33, 17)]:
            xm = jax.random.normal(ks[5], (rows, k))
            w = jax.random.normal(ks[4], (k, n)).astype(jnp.bfloat16)
            want = r(xm) @ w.astype(jnp.float32)
            errors.append(float(jnp.max(jnp.abs(jax.jit(cpu_kernels.matmul)(xm, w) - want)) / jnp.max(jnp.abs(want))))
        print(cpu_kernels.bf16_engine(), max(errors))
    """
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MOECLI_CPU_BF16": cap},
                         cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    engine, error = out.stdout.split()
    best = cpu_kernels.BF16_ENGINES.index(cpu_kernels.bf16_engine())  # this process: no cap
    assert cpu_kernels.BF16_ENGINES.index(engine) == max(best, cpu_kernels.BF16_ENGINES.index(cap))
    assert float(error) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,k,n", [(1, 7, 5), (1, 1024, 3000), (3, 64, 48), (8, 1037, 70), (5, 33, 17), (2, 300, 96)])
def test_matvec_equals_matmul(rows, k, n, dtype):
    """Rows in groups of up to four, rows of w sixteen stretches at a time, and every leftover:
    rows past the stretches, columns past a multiple of 16 (float32) or 32 (bfloat16, a 64-byte
    line at a time), a block split left empty."""
    x = jax.random.normal(jax.random.PRNGKey(0), (rows, k))
    w = jax.random.normal(jax.random.PRNGKey(1), (k, n)).astype(dtype)
    got = jax.jit(cpu_kernels.matvec)(x, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ w.astype(jnp.float32)), rtol=1e-4, atol=1e-3)


def test_bfloat16_decode_with_and_without_kernels(monkeypatch):
    """A prefill and a decode step of a bf16 model: kernels on vs the pure-JAX paths (bf16 rounding apart)."""
    config = ModelConfig(family="mixtral", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, d_ff=0, d_expert=48, n_experts=4, top_k=2, moe_layers=(True, True))
    model = transformed(config)
    prompt = jnp.array([[5, 9, 17, 3, 8, 60, 2, 33, 41, 7, 12, 50]])  # > 8 tokens: the grouped kernel
    params = model.init(jax.random.PRNGKey(0), prompt)
    params = jax.tree_util.tree_map(lambda p: (p * 4).astype(jnp.bfloat16), params)  # decisive routing

    def decode_logits():
        cache = init_cache(config, 1, 16, jnp.float32)
        prefill, cache, first = jax.jit(model.apply)(params, prompt, cache)
        logits, _, routing = jax.jit(model.apply)(params, jnp.array([[11]]), cache)
        return [np.asarray(prefill, np.float32), np.asarray(first.experts),
                np.asarray(logits, np.float32), np.asarray(routing.experts)]

    with_kernels = decode_logits()
    monkeypatch.setattr(cpu_kernels, "on", lambda: False)
    without = decode_logits()
    for got, want in zip(with_kernels, without):
        if want.dtype == np.int32:  # the experts chosen
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, atol=0.03 * np.abs(want).max(), rtol=0)


def kernels_status_in_subprocess(**env) -> str:
    code = "from moecli import cpu_kernels; print(cpu_kernels.available(), cpu_kernels.status())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_switched_off_by_environment():
    assert kernels_status_in_subprocess(MOECLI_CPU_KERNELS="0") == \
        "False CPU kernels: off (turned off by MOECLI_CPU_KERNELS=0)"


def test_failed_build_falls_back(tmp_path):
    status = kernels_status_in_subprocess(MOECLI_CACHE=str(tmp_path), CXX="false")
    assert status.startswith("False CPU kernels: off (building the CPU kernels failed")
    assert not list((tmp_path / "kernels").glob("*.so"))  # no half-built library left behind


@pytest.mark.parametrize("group,t,length,start,window,head_dim", [
    (2, 1, 40, 17, None, 8),      # one decoding token: keys 0..17 of a longer cache
    (1, 70, 70, 0, None, 20),     # a prompt, no cache: head_dim off the vector width, 2 key blocks
    (4, 37, 150, 100, None, 64),  # a chunk after a filled prefix; the query blocks' tail
    (2, 30, 64, 10, 7, 16),       # sliding window
    (3, 41, 100, 0, None, 128),   # 3 heads a kv head: steps of six rows mix positions; head_dim 128
    # up to 8 positions (decoding) take the chunked path, 1024 keys a chunk:
    (2, 1, 3000, 2500, None, 64),  # three chunks, the last one partly filled
    (2, 8, 1100, 1020, None, 64),  # queries whose keys all lie in the first chunk
    (4, 5, 1100, 1030, None, 128),
    (2, 3, 2100, 2050, 1030, 20),  # sliding window: keys masked at a chunk's start; head_dim off the vector width
])
def test_attention_kernel_equals_xla(group, t, length, start, window, head_dim):
    from moecli.model.layers import attend_xla

    kq, kk, kv = jax.random.split(jax.random.PRNGKey(t), 3)
    q = jax.random.normal(kq, (1, 3, group, t, head_dim)) * 2  # peaked softmax: errors would show
    k = jax.random.normal(kk, (1, 3, head_dim, length))
    v = jax.random.normal(kv, (1, 3, length, head_dim))
    positions = start + jnp.arange(t)
    want = attend_xla(q, k, v, positions, window)
    got = jax.jit(cpu_kernels.attention, static_argnums=4)(q / head_dim ** 0.5, k, v, positions[0], window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_gradients_through_the_kernels_are_the_reference_ones(monkeypatch):
    """Training on CPU differentiates the model: the kernels' custom VJP uses the pure-JAX paths."""
    config = ModelConfig(family="mixtral", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                         head_dim=8, d_ff=0, d_expert=48, n_experts=4, top_k=2, moe_layers=(True,))
    model = transformed(config)
    ids = jnp.arange(12)[None] % 64
    params = model.init(jax.random.PRNGKey(0), ids)

    def loss(params):
        logits = model.apply(params, ids)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    with_kernels = jax.grad(loss)(params)
    monkeypatch.setattr(cpu_kernels, "on", lambda: False)
    without = jax.grad(loss)(params)
    for got, want in zip(jax.tree_util.tree_leaves(with_kernels), jax.tree_util.tree_leaves(without)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_independent_kernel_calls_run_side_by_side():
    """XLA may run independent custom calls at once, one per pool thread; each kernel's helper then
    waits in the queue behind the other calls. A kernel that waited for its queued helper hung
    here (both threads spinning); run in a subprocess, so a hang fails the test."""
    code = """
import jax, jax.numpy as jnp
from moecli.kernels.cpu import ffi as cpu_kernels
x = jax.random.normal(jax.random.PRNGKey(0), (512, 1024))
ws = [jax.random.normal(jax.random.PRNGKey(i), (1024, 1024)) * 0.03 for i in range(24)]
f = jax.jit(lambda x, ws: sum(jnp.sum(cpu_kernels.matmul(x, w)) for w in ws))
want = float(sum(jnp.sum(x @ w) for w in ws))
for _ in range(3):
    got = float(f(x, ws))
print(abs(got - want) / abs(want))
"""
    try:  # (24 independent 512 x 1024 x 1024 products hung every time; fewer or smaller did not)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                             cwd=Path(__file__).parent)
    except subprocess.TimeoutExpired:
        pytest.fail("independent kernel calls hung")
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1e-4



@pytest.mark.parametrize("shape", [(3, 70, 130), (1, 64, 64), (2, 1, 5), (129, 3)])
@pytest.mark.parametrize("source,target", [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")])
def test_transpose_into_equals_numpy(shape, source, target):
    """The loader's tiled transpose (csrc/transpose.cc), sizes off its 64-element tiles."""
    src = np.random.default_rng(0).standard_normal(shape).astype(jnp.dtype(source))
    dst = np.full((*shape[:-2], shape[-1], shape[-2]), -1, jnp.dtype(target))
    assert cpu_kernels.transpose_into(dst, src)
    np.testing.assert_array_equal(dst, np.swapaxes(src, -1, -2).astype(jnp.dtype(target)))


def test_transpose_into_declines_what_it_cannot_do():
    src = np.ones((4, 6), np.float32)
    assert not cpu_kernels.transpose_into(np.zeros((6, 4), np.float16), src)        # another dtype
    assert not cpu_kernels.transpose_into(np.zeros((4, 6), np.float32), src)        # not the transposed shape
    assert not cpu_kernels.transpose_into(np.zeros((3, 4), np.float32), src[:, ::2])  # not contiguous
