"""Weights in every dtype `--dtype` offers run on every backend this machine has: float16 on CPU
once crashed the process (the C++ kernels read any non-bfloat16 buffer as float32). On CPU,
float16 weights take plain XLA's paths (`moecli.kernels.cpu.backend`); the others the kernels."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hf_models import build, hf_greedy, hf_logits, save
from moecli import generate_tokens, load_model
from moecli.kernels import registry
from moecli.model.ops import XLA

PROMPT = [1, 5, 9, 33, 7, 64, 2, 100, 17, 3, 90, 41]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build("mixtral", num_local_experts=4, head_dim=12)
    return model, save(model, tmp_path_factory.mktemp("mixtral"))


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 0.1), ("float16", 0.02)])
def test_every_dtype_runs_and_stays_near_float32(checkpoint, dtype, tolerance):
    hf, folder = checkpoint
    model = load_model(folder, dtype=dtype)
    assert model.dtype.name == dtype and model.ops is registry.select()
    want = hf_logits(hf, [PROMPT]).numpy()
    got = np.asarray(model([PROMPT]))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < tolerance
    if dtype == "float32":
        assert generate_tokens(model, PROMPT, max_new_tokens=16) == hf_greedy(hf, PROMPT, 16)


def test_float16_decodes_the_same_tokens_on_the_backend_and_on_plain_xla(checkpoint):
    _, folder = checkpoint
    native = load_model(folder, dtype="float16")
    plain = load_model(folder, dtype="float16").__class__(native.config, native.params, ops=XLA)
    assert generate_tokens(native, PROMPT, max_new_tokens=12) == generate_tokens(plain, PROMPT, max_new_tokens=12)


def test_moe_generate_with_float16_weights_does_not_crash(tmp_path):
    """The reported defect, end to end in a process of its own (a segfault fails the test)."""
    from checkpoints import chat_checkpoint

    folder = chat_checkpoint(tmp_path / "plain", "plain")
    out = subprocess.run([sys.executable, "-m", "moecli", "generate", "--model", str(folder), "--dtype", "float16",
                          "--prompt", "hello there", "--max-tokens", "5", "--temperature", "0",
                          "--no-chat-template"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
