"""Experts sharded over devices: 1, 2, 4 and 8 CPU devices give the single-device logits and
greedy output, each device holds 1/N of the expert weights, and two processes (4 devices each,
joined through jax.distributed on loopback) compute what one process does."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hf_models import build, save
from moecli.cli.main import app

WORKER = str(Path(__file__).with_name("sharding_worker.py"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # Qwen2-MoE: 8 experts, a shared expert, and a dense layer among the MoE ones.
    hf = build("qwen2_moe", num_hidden_layers=3, num_experts=8, moe_intermediate_size=16,
               shared_expert_intermediate_size=20, mlp_only_layers=[1])
    return save(hf, tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module")
def devices_result(folder, tmp_path_factory) -> dict:
    """The worker's {device count: logits, greedy tokens, shards} on 1, 2, 4 and 8 devices, run once:
    the multi-process test compares against its one-device run too."""
    out = tmp_path_factory.mktemp("devices") / "devices.json"
    subprocess.run([sys.executable, WORKER, "devices", str(folder), str(out)], check=True, timeout=600)
    return json.loads(out.read_text())


def test_logits_greedy_and_bytes_across_device_counts(devices_result):
    result = devices_result
    base = np.array(result["1"]["logits"])
    for n in ("2", "4", "8"):
        np.testing.assert_allclose(np.array(result[n]["logits"]), base, atol=1e-5, rtol=0)
        assert result[n]["greedy"] == result["1"]["greedy"]
        assert result[n]["devices_used"] == int(n)
        shapes = result[n]["expert_shard_shapes"]
        assert len(shapes) == int(n) and all(s[0] == 8 // int(n) for s in shapes)  # 1/N of the experts each
    expert_bytes = 2 * 8 * 3 * 32 * 16 * 4          # 2 MoE layers x 8 experts x 3 [32, 16] float32
    one = result["1"]["bytes_per_device"][0]
    for n in ("2", "4", "8"):
        for used in result[n]["bytes_per_device"]:
            assert used == one - expert_bytes + expert_bytes // int(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(folder, devices_result, tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, "multihost", str(folder), str(tmp_path / f"p{i}.json"),
                               str(port), str(i)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in (0, 1)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    base, greedy = np.array(devices_result["1"]["logits"]), devices_result["1"]["greedy"][:8]
    for i in (0, 1):
        r = json.loads((tmp_path / f"p{i}.json").read_text())
        assert r["process"] == i
        np.testing.assert_allclose(np.array(r["logits"]), base, atol=1e-5, rtol=0)
        assert r["greedy"] == greedy
        assert r["local_expert_shards"] == [[1, 32, 16]] * 4  # this process holds 4 of the 8 experts


def test_devices_errors_are_one_line(folder):
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(folder), "--devices", "3"])
    assert result.exit_code == 2 and "8 experts cannot be split evenly over 3 devices" in result.stderr
    from moecli import load_model
    from moecli.errors import ResourceError

    with pytest.raises(ResourceError, match="asked for 8 devices but only 1"):
        load_model(folder, devices=8)


def test_info_prints_the_placement_map(folder):
    result = CliRunner().invoke(app, ["info", str(folder), "--devices", "4", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    for experts in ("0..1", "2..3", "4..5", "6..7"):
        assert experts in result.stdout
    assert "placement over 4 devices" in result.stdout and "0..2 (2)" in result.stdout
