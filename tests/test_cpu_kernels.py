"""The hand-written CPU decode kernels (moecli/csrc/cpu_kernels.cc) against the pure-JAX paths."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moecli import cpu_kernels
from moecli.config import ModelConfig
from moecli.model import init_cache, transformed
from moecli.moe import experts_dense, route

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=cpu_kernels.status())


def upcast(*arrays):
    return [a.astype(jnp.float32) for a in arrays]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_experts_kernel_equals_dense_reference(tokens, dtype):
    n_experts, top_k, d, f = 6, 3, 20, 36  # d not a multiple of 4 or 16: the loops' tails run
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(tokens), 5)
    x = jax.random.normal(k1, (tokens, d))
    w_gate, w_up = (jax.random.normal(k, (n_experts, d, f)).astype(dtype) for k in (k2, k3))
    w_down = jax.random.normal(k4, (n_experts, f, d)).astype(dtype)
    routing = route(x[None], jax.random.normal(k5, (d, n_experts)), top_k, True)
    flat = type(routing)(*(t[0] for t in routing))
    want = experts_dense(x, *upcast(w_gate, w_up, w_down), flat, n_experts)
    got = jax.jit(cpu_kernels.experts)(x, flat.experts, flat.weights, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)
    # Ids outside [0, n_experts) are another device's experts: skipped.
    n_local = 4
    here = flat.experts < n_local
    local = flat._replace(experts=jnp.where(here, flat.experts, n_local), weights=jnp.where(here, flat.weights, 0.0))
    want = experts_dense(x, *upcast(w_gate, w_up, w_down), local._replace(experts=jnp.minimum(local.experts, 5)), 6)
    got = cpu_kernels.experts(x, local.experts, local.weights, w_gate[:n_local], w_up[:n_local], w_down[:n_local])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,k,n", [(1, 7, 5), (1, 1024, 3000), (3, 64, 48)])
def test_matvec_equals_matmul(rows, k, n, dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (rows, k))
    w = jax.random.normal(jax.random.PRNGKey(1), (k, n)).astype(dtype)
    got = jax.jit(cpu_kernels.matvec)(x, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ w.astype(jnp.float32)), rtol=1e-4, atol=1e-3)


def test_bfloat16_decode_with_and_without_kernels(monkeypatch):
    """A whole decode step of a bf16 model: kernels on vs the pure-JAX paths (bf16 rounding apart)."""
    config = ModelConfig(family="mixtral", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, d_ff=0, d_expert=48, n_experts=4, top_k=2, moe_layers=(True, True))
    model = transformed(config)
    prompt = jnp.array([[5, 9, 17, 3]])
    params = model.init(jax.random.PRNGKey(0), prompt)
    params = jax.tree_util.tree_map(lambda p: (p * 4).astype(jnp.bfloat16), params)  # decisive routing

    def decode_logits():
        cache = init_cache(config, 1, 8, jnp.float32)
        _, cache, _ = jax.jit(model.apply)(params, prompt, cache)
        logits, _, routing = jax.jit(model.apply)(params, jnp.array([[11]]), cache)
        return np.asarray(logits, np.float32), np.asarray(routing.experts)

    with_kernels = decode_logits()
    monkeypatch.setattr(cpu_kernels, "use_for", lambda rows: False)
    without = decode_logits()
    np.testing.assert_array_equal(with_kernels[1], without[1])
    scale = np.abs(without[0]).max()
    np.testing.assert_allclose(with_kernels[0], without[0], atol=0.03 * scale, rtol=0)


def kernels_status_in_subprocess(**env) -> str:
    code = "from moecli import cpu_kernels; print(cpu_kernels.available(), cpu_kernels.status())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_switched_off_by_environment():
    assert kernels_status_in_subprocess(MOECLI_CPU_KERNELS="0") == \
        "False CPU decode kernels: off (turned off by MOECLI_CPU_KERNELS=0)"


def test_failed_build_falls_back(tmp_path):
    status = kernels_status_in_subprocess(MOECLI_CACHE=str(tmp_path), CXX="false")
    assert status.startswith("False CPU decode kernels: off (building the CPU kernels failed")
    assert not list((tmp_path / "kernels").glob("*.so"))  # no half-built library left behind
