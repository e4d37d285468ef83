"""The GPU expert kernels (moecli/kernels/gpu/pallas.py, wired in by moecli/kernels/gpu/backend.py), run in Pallas's interpreter on CPU against the
pure-JAX experts, and lowered for CUDA (Pallas to Triton) to check that a GPU build accepts it."""
from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moecli.kernels.gpu import backend as gpu_backend
from moecli.kernels.gpu import pallas as gpu_kernels
from moecli.model.config import ModelConfig
from moecli.model.experts import experts_dense
from moecli.model.ops import XLA
from moecli.model.router import Routing, route
from moecli.model.transformer import init_cache, transformed


def random_experts(key, n_experts, d, f, dtype):
    k1, k2, k3 = jax.random.split(key, 3)
    w_gate, w_up = ((jax.random.normal(k, (n_experts, d, f)) * 2 / d ** 0.5).astype(dtype) for k in (k1, k2))
    return w_gate, w_up, (jax.random.normal(k3, (n_experts, f, d)) * 2 / f ** 0.5).astype(dtype)


@pytest.mark.parametrize("assignments,k,n", [(1, 64, 32), (3, 512, 96), (8, 48, 16)])
def test_gathered_matvec_reads_each_rows_own_expert(assignments, k, n):
    """Shapes with one and many row splits, one and several column blocks, and an id out of range."""
    kx, kw, ki = jax.random.split(jax.random.PRNGKey(k), 3)
    x = jax.random.normal(kx, (assignments, k))
    w = jax.random.normal(kw, (5, k, n))
    ids = jax.random.randint(ki, (assignments,), 0, 5).at[0].set(5)  # 5: another device's expert
    got = gpu_kernels.gathered_matvec(x, ids, w, interpret=True)
    want = np.einsum("ak,akn->an", np.asarray(x), np.asarray(w)[np.minimum(np.asarray(ids), 4)])
    want[0] = 0.0
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_experts_kernel_equals_dense(tokens, dtype):
    n_experts, top_k, d, f = 6, 2, 64, 96
    kx, kw, kr = jax.random.split(jax.random.PRNGKey(tokens), 3)
    x = jax.random.normal(kx, (tokens, d)).astype(dtype)
    weights = random_experts(kw, n_experts, d, f, dtype)
    routing = route(x[None], jax.random.normal(kr, (d, n_experts)), top_k, True)
    flat = Routing(*(t[0] for t in routing))
    got = gpu_kernels.experts(x, flat.experts, flat.weights, *weights, interpret=True)
    want = experts_dense(*(a.astype(jnp.float32) for a in (x, *weights)), flat, n_experts)
    tolerance = dict(rtol=2e-2, atol=5e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), **tolerance)


def test_grouped_matmul_multiplies_each_block_by_its_expert():
    """Blocks of 16 rows, a spare block (expert id = n_experts) giving zeros."""
    kx, kw = jax.random.split(jax.random.PRNGKey(3))
    xs, w = jax.random.normal(kx, (4 * 16, 96)), jax.random.normal(kw, (3, 96, 80))
    block_expert = jnp.array([2, 0, 0, 3], jnp.int32)
    got = gpu_kernels.grouped_matmul(xs, block_expert, w, interpret=True)
    want = np.concatenate([np.asarray(xs[16 * b:16 * (b + 1)]) @ np.asarray(w[e]) if e < 3 else np.zeros((16, 80))
                           for b, e in enumerate([2, 0, 0, 3])])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prompt_experts_on_the_grouped_kernel_equal_dense(monkeypatch, dtype):
    """A prompt's experts through `gpu_backend.experts_grouped` (the kernel interpreted), also with
    another device's assignments left out."""
    monkeypatch.setattr(gpu_kernels, "grouped_matmul", functools.partial(gpu_kernels.grouped_matmul, interpret=True))
    n_experts, top_k, d, f, tokens = 6, 2, 64, 96, 20
    kx, kw, kr = jax.random.split(jax.random.PRNGKey(4), 3)
    x = jax.random.normal(kx, (tokens, d)).astype(dtype)
    weights = random_experts(kw, n_experts, d, f, dtype)
    routing = route(x[None], jax.random.normal(kr, (d, n_experts)), top_k, True)
    flat = Routing(*(t[0] for t in routing))
    tolerance = dict(rtol=2e-2, atol=5e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    upcast = [a.astype(jnp.float32) for a in (x, *weights)]
    got = gpu_backend.experts_grouped(x, *weights, flat, n_experts)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(experts_dense(*upcast, flat, n_experts)),
                               **tolerance)
    here = flat.experts < 4  # experts 4 and 5 live on another device: renumbered 4, weight 0
    local = Routing(jnp.where(here, flat.experts, 4), jnp.where(here, flat.weights, 0.0), None)
    got = gpu_backend.experts_grouped(x, *(w[:4] for w in weights), local, 4, elsewhere=True)
    want = experts_dense(*upcast, Routing(jnp.minimum(local.experts, 5), local.weights, None), n_experts)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), **tolerance)


@pytest.mark.parametrize("n_experts,top_k,d,f", [(8, 2, 4096, 14336), (64, 8, 2048, 1024), (128, 8, 2048, 768),
                                                (32, 8, 1024, 512), (8, 2, 48, 80)])
def test_kernel_lowers_for_cuda_with_triton(n_experts, top_k, d, f):
    """What a GPU build checks before compiling: block shapes, the ops Pallas's Triton lowering
    supports, shared-memory use; at the Mixtral-8x7B, OLMoE, Qwen3-30B-A3B and granite shapes and
    an odd small one (shapes only: nothing is allocated). Compiling and timing it needs a GPU
    (bench/gpu.sh)."""
    spec = jax.ShapeDtypeStruct
    args = (spec((1, d), jnp.bfloat16), spec((1, top_k), jnp.int32), spec((1, top_k), jnp.float32),
            spec((n_experts, d, f), jnp.bfloat16), spec((n_experts, d, f), jnp.bfloat16),
            spec((n_experts, f, d), jnp.bfloat16))
    lowered = jax.jit(gpu_kernels.experts).trace(*args).lower(lowering_platforms=("cuda",))
    assert "custom_call @__gpu$xla.gpu.triton" in lowered.as_text()
    # a 512-token prompt: the grouped kernel
    prompt = (spec((512, d), jnp.bfloat16), *args[3:], Routing(spec((512, top_k), jnp.int32),
                                                                 spec((512, top_k), jnp.float32), None))
    lowered = jax.jit(functools.partial(gpu_backend.experts_grouped, n_experts=n_experts)).trace(*prompt).lower(
        lowering_platforms=("cuda",))
    assert "custom_call @__gpu$xla.gpu.triton" in lowered.as_text()


def test_stacks_the_kernel_cannot_take_fall_back_to_the_scan(monkeypatch):
    assert gpu_kernels.applies(8, 4096, 14336) and gpu_kernels.applies(128, 2048, 768)
    assert not gpu_kernels.applies(8, 64, 50)  # not a multiple of 16
    assert not gpu_kernels.applies(256, 7168, 2048)  # DeepSeek-V3-sized: over 2^31 elements
    monkeypatch.setattr(gpu_kernels, "experts", lambda *a, **k: pytest.fail("the kernel ran"))
    weights = random_experts(jax.random.PRNGKey(1), 4, 64, 50, jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 64))
    routing = Routing(jnp.array([[3, 1]]), jnp.array([[0.7, 0.3]]), None)
    got = gpu_backend.experts_decode(x, *weights, routing, 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(experts_dense(x, *weights, routing, 4)), rtol=1e-5, atol=1e-5)


def test_a_prompt_and_a_decode_step_pick_the_kernels_on_gpu_and_match_the_pure_jax_paths(monkeypatch):
    """The whole model with the kernels (interpreted) standing in for the GPU paths: a prompt on
    the grouped kernel, a decode step on the gathering one, against the scan paths."""
    c = ModelConfig(family="mixtral", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                    d_ff=0, d_expert=48, n_experts=4, top_k=2, moe_layers=(True, True))
    ids, token = jnp.array([[5, 9, 2, 7]]), jnp.array([[11]])
    params = transformed(c).init(jax.random.PRNGKey(0), ids)

    def prompt_then_token(ops):
        model = transformed(c, ops=ops)
        logits, cache, _ = model.apply(params, ids, init_cache(c, 1, 8))
        return logits, model.apply(params, token, cache)[0]

    want = prompt_then_token(XLA)
    monkeypatch.setenv("MOECLI_GPU_KERNELS", "1")
    monkeypatch.setattr(gpu_kernels, "self_check", lambda: None)
    monkeypatch.setattr(gpu_kernels, "experts", functools.partial(gpu_kernels.experts, interpret=True))
    monkeypatch.setattr(gpu_kernels, "grouped_matmul", functools.partial(gpu_kernels.grouped_matmul, interpret=True))
    ops = gpu_backend.gpu_ops()
    assert ops.name == "gpu-pallas"
    picked = []
    recording = dataclasses.replace(ops, experts=lambda *a: picked.append(ops.experts(*a)) or picked[-1])
    got = prompt_then_token(recording)
    assert picked == [gpu_backend.experts_grouped] * 2 + [gpu_backend.experts_decode] * 2
    for ours, theirs in zip(got, want):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_the_gpu_kernels_are_opt_in(monkeypatch):
    """Never run on a GPU yet, so plain XLA is the GPU default; MOECLI_GPU_KERNELS=1 opts in."""
    monkeypatch.delenv("MOECLI_GPU_KERNELS", raising=False)
    monkeypatch.setattr(gpu_kernels, "self_check", lambda: pytest.fail("checked although off"))
    ops = gpu_backend.gpu_ops()
    assert ops.name == "xla" and ops.experts is XLA.experts
    assert "opt-in" in ops.notes[0]


def test_self_check_turns_the_kernel_off_where_it_fails_or_miscomputes(monkeypatch):
    """On a GPU whose Triton path rejects the kernel, decoding falls back to the scan, and
    --verbose says why; here, on CPU, the compiled (not interpreted) kernel cannot run at all."""
    gpu_kernels.self_check.cache_clear()
    assert "self-check failed" in gpu_kernels.self_check()
    interpreted = functools.partial(gpu_kernels.gathered_matvec, interpret=True)
    monkeypatch.setattr(gpu_kernels, "gathered_matvec", interpreted)
    monkeypatch.setattr(gpu_kernels, "grouped_matmul", functools.partial(gpu_kernels.grouped_matmul, interpret=True))
    checked = []

    @jax.jit
    def step(x):  # the first check usually happens while a decode step is being traced
        gpu_kernels.self_check.cache_clear()
        checked.append(gpu_kernels.self_check())
        return x

    step(1.0)
    assert checked == [None]
    monkeypatch.setattr(gpu_kernels, "gathered_matvec", lambda *a, **k: interpreted(*a, **k) + 1)
    gpu_kernels.self_check.cache_clear()
    assert gpu_kernels.self_check() == "the self-check computed wrong numbers"
    monkeypatch.setenv("MOECLI_GPU_KERNELS", "1")
    monkeypatch.delenv("MOECLI_DEBUG", raising=False)
    ops = gpu_backend.gpu_ops()
    assert ops.name == "xla" and ops.notes == ("GPU expert kernels: off (the self-check computed wrong numbers)",)
    monkeypatch.setenv("MOECLI_DEBUG", "1")  # under --debug the failure is raised, not hidden
    with pytest.raises(RuntimeError, match="wrong numbers"):
        gpu_backend.gpu_ops()
    gpu_kernels.self_check.cache_clear()


def test_gpu_layer_benchmark_runs_its_smoke_test():
    """bench/gpu_layer.py (run by bench/gpu.sh on a lent GPU) must not rot while no GPU is lent:
    its --small mode runs the same code on tiny shapes, the kernel interpreted, and the kernel must
    agree with the scan there."""
    script = Path(__file__).parent.parent / "bench" / "gpu_layer.py"
    out = subprocess.run([sys.executable, str(script), "--small"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    small = result["small"]
    assert small["max_abs_diff"] < 1e-3 and small["prompt_max_abs_diff"] < 1e-3


def test_verbose_says_which_backend_runs(capsys):
    from types import SimpleNamespace

    from moecli.cli.commands.generate import print_stats
    from moecli.model.ops import Ops

    stats = SimpleNamespace(prompt_tokens=3, prefill_tok_s=1.0, generated_tokens=2, decode_tok_s=1.0,
                            stopped_by="length", ttft_s=0.1, compile_s=0.0)
    ops = Ops("xla", notes=("GPU expert kernels: off (opt-in: MOECLI_GPU_KERNELS=1)",))
    print_stats(stats, SimpleNamespace(ops=ops))
    assert "backend: xla; GPU expert kernels: off (opt-in: MOECLI_GPU_KERNELS=1)" in capsys.readouterr().err
