"""The family tests' shared check that experts split over several CPU devices change nothing: one run of
tests/sharding_worker.py in a subprocess (JAX must see the fake devices from start-up) on 1, 2 and 4
devices, each device count's logits and greedy tokens compared with the single device's, and the single
device's logits with transformers'."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from hf_models import hf_logits, save

WORKER = str(Path(__file__).with_name("sharding_worker.py"))
IDS = [[1, 5, 9, 33, 7, 64, 2, 100, 17, 3], [4, 8, 15, 16, 23, 42, 99, 7, 1, 2]]  # the worker's


def assert_experts_split_equal(hf, tmp_path: Path, n_experts: int, counts=(2, 4)) -> dict:
    """Save `hf`, run it on 1 and each of `counts` devices: every count gives the single device's logits
    (atol 1e-5) and greedy tokens on `count` devices holding n_experts / count experts each, and the
    single device gives transformers' logits (atol 1e-4). Returns the worker's result."""
    assert all(n_experts % n == 0 for n in counts), f"{n_experts} experts do not split over {counts} devices"
    folder = save(hf, tmp_path / "ckpt")
    out = tmp_path / "devices.json"
    subprocess.run([sys.executable, WORKER, "devices", str(folder), str(out), ",".join(map(str, (1, *counts)))],
                   check=True, timeout=600)
    result = json.loads(out.read_text())
    base = np.array(result["1"]["logits"])
    np.testing.assert_allclose(base, hf_logits(hf, IDS).numpy(), atol=1e-4, rtol=0)
    for n in counts:
        got = result[str(n)]
        np.testing.assert_allclose(np.array(got["logits"]), base, atol=1e-5, rtol=0, err_msg=f"{n} devices")
        assert got["greedy"] == result["1"]["greedy"], f"{n} devices"
        assert got["devices_used"] == n and [s[0] for s in got["expert_shard_shapes"]] == [n_experts // n] * n
    return result
