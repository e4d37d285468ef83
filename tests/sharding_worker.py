"""Run in a subprocess by test_sharding.py: JAX must see several CPU devices from the start
(XLA_FLAGS=--xla_force_host_platform_device_count=N is read once, at backend start-up)."""
import json
import os
import sys

mode, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
# devices mode: optionally the device counts to compare, e.g. "1,2" (default: 1, 2, 4 and 8)
COUNTS = tuple(int(n) for n in sys.argv[4].split(",")) if mode == "devices" and len(sys.argv) > 4 else (1, 2, 4, 8)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 if mode == 'multihost' else 8}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

IDS = np.array([[1, 5, 9, 33, 7, 64, 2, 100, 17, 3], [4, 8, 15, 16, 23, 42, 99, 7, 1, 2]])

if mode == "devices":
    from moecli import generate_tokens, load_model

    result = {}
    for n in COUNTS:
        model = load_model(folder, dtype="float32", devices=n)
        logits = np.asarray(model(IDS))
        per_device = {}
        for leaf in jax.tree_util.tree_leaves(model.params):
            for shard in leaf.addressable_shards:
                per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
        w = next(g["w_gate"] for m, g in model.params.items() if m.endswith("/moe"))  # the first MoE layer's
        result[n] = dict(logits=logits.tolist(), greedy=generate_tokens(model, IDS[0, :5], 12),
                         expert_shard_shapes=[list(s.data.shape) for s in w.addressable_shards],
                         devices_used=len(per_device), bytes_per_device=sorted(per_device.values()))
    json.dump(result, open(out, "w"))
elif mode == "quantized":  # q4 experts split over 1 and 4 devices
    from moecli import generate_tokens, load_model

    result = {}
    for n in (1, 4):
        model = load_model(folder, dtype="float32", devices=n, quantize="q4")
        w = model.params["transformer/layer_0/moe"]["w_gate_q"]
        result[n] = dict(logits=np.asarray(model(IDS)).tolist(), greedy=generate_tokens(model, IDS[0, :5], 8),
                         expert_shard_shapes=[list(s.data.shape) for s in w.addressable_shards])
    json.dump(result, open(out, "w"))
else:  # one of two processes: python sharding_worker.py multihost FOLDER OUT PORT PROCESS_ID
    from moecli.runtime import init_distributed

    init_distributed(f"127.0.0.1:{sys.argv[4]}", 2, int(sys.argv[5]))
    from moecli import generate_tokens, load_model

    model = load_model(folder, dtype="float32", devices=8)
    logits = model(IDS)
    local = [s.data.shape for s in model.params["transformer/layer_0/moe"]["w_gate"].addressable_shards]
    json.dump(dict(logits=np.asarray(logits.addressable_data(0)).tolist(), local_expert_shards=[list(s) for s in local],
                   greedy=generate_tokens(model, IDS[0, :5], 8), process=jax.process_index()),
              open(out, "w"))
