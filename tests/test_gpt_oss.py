"""gpt-oss (model_type "gpt_oss") against transformers on tiny random float32 models: attention sinks,
q/k/v/o biases, sliding-window layers shorter than the prompt, YaRN, a biased top-k-then-softmax router,
biased experts with the clamped SwiGLU and interleaved gate_up_proj; logits, greedy tokens, cached
decoding, capacity routing, and experts split over 2 CPU devices."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import PROMPT, assert_cached_decoding_equals_full, assert_greedy_matches, build, hf_logits, save
from moecli import load_model
from moecli.checkpoints.families import config_from_hf
from moecli.inference.engine import Model
from moecli.model.ops import XLA
from moecli.model.router import ROUTERS
from moecli.model.sizes import parameter_counts

SMALL = dict(head_dim=16, swiglu_limit=1.0)  # a limit the activations cross, so the clamps matter
CASES = {
    # transformers' default rope (YaRN x32 over 4096, untruncated), layers sliding/full, window 4 < prompt
    "window4-default-yarn-top2": dict(SMALL, num_local_experts=4, sliding_window=4),
    "mqa-top3-window3-yarn-truncated-tied": dict(
        SMALL, num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=3, num_key_value_heads=1,
        sliding_window=3, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        tie_word_embeddings=True, swiglu_alpha=1.2,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0, "beta_fast": 8.0, "beta_slow": 2.0, "truncate": True}),
}
IDS = np.array([PROMPT, PROMPT[::-1]])
WORKER = str(Path(__file__).with_name("sharding_worker.py"))  # test_sharding.py's subprocess on N CPU devices
WORKER_IDS = np.array([[1, 5, 9, 33, 7, 64, 2, 100, 17, 3], [4, 8, 15, 16, 23, 42, 99, 7, 1, 2]])  # its IDS


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, moecli model) loaded from the same saved checkpoint."""
    hf = build("gpt_oss", **CASES[request.param])
    folder = save(hf, tmp_path_factory.mktemp(request.param))
    return hf, load_model(folder, dtype="float32")


def test_the_cases_exercise_sinks_clamps_and_windows(pair):
    """Each feature moves transformers' own logits by far more than the 1e-4 the parity tests allow,
    so getting one wrong (or ignoring it) fails them; and routing is decisive (no near-tie top-k)."""
    hf, _ = pair
    base = hf_logits(hf, IDS)
    layers = hf.model.layers

    def moved(change, undo) -> float:
        change()
        try:
            return float((hf_logits(hf, IDS) - base).abs().max())
        finally:
            undo()

    sinks = [layer.self_attn.sinks.detach().clone() for layer in layers]
    no_sinks = lambda: [layer.self_attn.sinks.data.fill_(-1e4) for layer in layers]  # noqa: E731
    put_back = lambda: [layer.self_attn.sinks.data.copy_(s) for layer, s in zip(layers, sinks)]  # noqa: E731
    assert moved(no_sinks, put_back) > 1e-2
    limit = layers[0].mlp.experts.limit
    assert moved(lambda: [setattr(layer.mlp.experts, "limit", 1e9) for layer in layers],
                 lambda: [setattr(layer.mlp.experts, "limit", limit) for layer in layers]) > 1e-2
    window = hf.config.sliding_window
    assert moved(lambda: setattr(hf.config, "sliding_window", 1000),
                 lambda: setattr(hf.config, "sliding_window", window)) > 1e-2
    with torch.no_grad():
        out = hf(torch.as_tensor(IDS), output_router_logits=True)
    k = hf.config.num_experts_per_tok
    for logits in out.router_logits:
        top = logits.topk(k + 1, dim=-1).values
        assert float((top[:, k - 1] - top[:, k]).min()) > 1e-3


def test_logits_match_transformers(pair):
    hf, model = pair
    theirs = hf_logits(hf, IDS).numpy()
    reference = Model(model.config, model.params, ops=XLA)  # plain XLA, keys not transposed
    for ours in (model(IDS), reference(IDS)):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    assert_greedy_matches(*pair)


def test_incremental_decoding_equals_full_forward(pair):
    assert_cached_decoding_equals_full(pair[1])  # a 5-token prefill (more than a window), then single tokens


def test_capacity_routing_without_drops_matches_transformers(pair):
    """Capacity routing's batched experts (`experts_capacity`) with the clamped SwiGLU and biases."""
    hf, model = pair
    roomy = model.with_config(capacity_factor=float(model.config.n_experts))  # room for every assignment
    np.testing.assert_allclose(np.asarray(roomy(IDS)), hf_logits(hf, IDS).numpy(), atol=1e-4, rtol=0)


def test_parameter_counts_match_transformers(pair):
    from moecli.model.sizes import parameter_shapes

    hf, model = pair
    c = model.config
    shapes = jax.tree_util.tree_leaves(parameter_shapes(c))
    total, active, embedding = parameter_counts(c)
    assert total == sum(math.prod(s.shape) for s in shapes) == sum(p.numel() for p in hf.parameters())
    assert total - active == sum(c.moe_layers) * (c.n_experts - c.top_k) * c.expert_size() + embedding


GPT_OSS_20B = dict(  # openai/gpt-oss-20b's config.json, less its quantization_config (MXFP4)
    model_type="gpt_oss", attention_bias=True, eos_token_id=200002, experts_per_token=4, head_dim=64,
    hidden_act="silu", hidden_size=2880, intermediate_size=2880, initial_context_length=4096,
    layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
    num_attention_heads=64, num_experts_per_tok=4, num_hidden_layers=24, num_key_value_heads=8,
    num_local_experts=32, pad_token_id=199999, rms_norm_eps=1e-05, rope_theta=150000, sliding_window=128,
    rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                  "rope_type": "yarn", "truncate": False},
    swiglu_limit=7.0, tie_word_embeddings=False, vocab_size=201088)
MINIMAL = dict(model_type="gpt_oss", vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
               num_attention_heads=8, num_local_experts=4)  # everything else: GptOssConfig's defaults


@pytest.mark.parametrize("hf_json", [GPT_OSS_20B, MINIMAL], ids=["gpt-oss-20b", "defaults"])
def test_config_reads_as_transformers_does(hf_json):
    """Sizes, layer types, window, rope (inverse frequencies and attention factor) and the parameter
    count, against transformers' own GptOssConfig and a model built on the meta device."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moecli.model.rope import rope_frequencies

    theirs = transformers.GptOssConfig(**{k: v for k, v in hf_json.items() if k != "model_type"})
    c = config_from_hf(hf_json)
    assert (c.head_dim, c.n_kv_heads, c.top_k, c.n_experts, c.sliding_window, c.norm_eps, c.swiglu_limit,
            c.swiglu_alpha) == (theirs.head_dim, theirs.num_key_value_heads, theirs.num_experts_per_tok,
                                theirs.num_local_experts, theirs.sliding_window, theirs.rms_norm_eps,
                                theirs.swiglu_limit, theirs.swiglu_alpha)
    assert c.sliding_layers == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert c.qkv_bias and c.o_bias and c.attention_sinks and c.expert_bias
    inv_freq, factor = ROPE_INIT_FUNCTIONS[theirs.rope_parameters["rope_type"]](theirs, "cpu")
    ours, scale = rope_frequencies(c.head_dim, c.rope)
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
    assert scale == pytest.approx(factor)
    with torch.device("meta"):
        total = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(theirs).parameters())
    assert parameter_counts(c).total == total  # 20.9 B for gpt-oss-20b (3.6 B active)


def test_router_picks_the_top_logits_and_skips_disabled_experts():
    """topk_softmax against transformers' GptOssTopKRouter; disabled experts are never chosen and the
    weights are a softmax over the best k remaining logits."""
    hf = build("gpt_oss", num_local_experts=6, num_experts_per_tok=3)
    router = hf.model.layers[0].mlp.router
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(0))
    logits, scores, indices = (t.detach().numpy() for t in router(x))
    c = config_from_hf(hf.config.to_dict())
    w = jnp.asarray(router.weight.detach().numpy().T)
    route = hk.without_apply_rng(hk.transform(lambda x, disabled: ROUTERS["topk_softmax"](x, w, c, disabled)))
    params = {"~": {"router_bias": jnp.asarray(router.bias.detach().numpy())}}
    routing = route.apply(params, jnp.asarray(x.numpy())[None], None)
    np.testing.assert_array_equal(np.asarray(routing.experts[0]), indices)
    np.testing.assert_allclose(np.asarray(routing.weights[0]), scores, atol=1e-6, rtol=0)
    disabled = jnp.zeros(6, bool).at[jnp.array([0, 3])].set(True)
    ablated = route.apply(params, jnp.asarray(x.numpy())[None], disabled)
    assert not np.isin(np.asarray(ablated.experts), [0, 3]).any()
    logits[:, [0, 3]] = -np.inf
    top = -np.sort(-logits, axis=-1)[:, :3]
    np.testing.assert_allclose(np.asarray(ablated.weights[0]), np.exp(top) / np.exp(top).sum(-1, keepdims=True),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("tokens", [1, 40])
def test_biased_clamped_experts_agree_across_implementations(tokens):
    """The dense reference, the scanned (decode) and block-sparse (prompt) experts with gpt-oss's gating
    and biases, the last two also with another device's experts skipped."""
    from functools import partial

    from moecli.model.experts import clamped_swiglu, experts_blocked, experts_dense, experts_scanned
    from moecli.model.router import route

    e, d, f, k = 6, 16, 24, 3
    keys = jax.random.split(jax.random.PRNGKey(tokens), 8)
    x = jax.random.normal(keys[0], (tokens, d))
    w = [jax.random.normal(keys[i], s) / math.sqrt(s[1]) for i, s in ((1, (e, d, f)), (2, (e, d, f)), (3, (e, f, d)))]
    biases = tuple(jax.random.normal(keys[i], (e, n)) for i, n in ((4, f), (5, f), (6, d)))
    routing = route(x[None], jax.random.normal(keys[7], (d, e)), k, True)
    flat = type(routing)(*(t[0] for t in routing))
    glu = partial(clamped_swiglu, limit=1.0, alpha=1.702)

    def compiled(fn, *arrays, **static):  # jitted, as in the model: op by op, every primitive compiles apart
        return jax.jit(partial(fn, **static))(*arrays)

    want = compiled(experts_dense, x, *w, flat, n_experts=e, glu=glu, biases=biases)
    assert float(jnp.abs(want - compiled(experts_dense, x, *w, flat, n_experts=e)).max()) > 0.1  # gating, biases matter
    for fn in (experts_scanned, experts_blocked):
        np.testing.assert_allclose(np.asarray(compiled(fn, x, *w, flat, n_experts=e, glu=glu, biases=biases)),
                                   np.asarray(want), rtol=1e-5, atol=1e-5)
    n_local = 4  # ids >= n_local: another device's, skipped
    here = flat.experts < n_local
    local = flat._replace(experts=jnp.where(here, flat.experts, n_local), weights=jnp.where(here, flat.weights, 0.0))
    want_local = compiled(experts_dense, x, *w, local._replace(experts=jnp.minimum(local.experts, e - 1)),
                          n_experts=e, glu=glu, biases=biases)
    for fn in (experts_scanned, experts_blocked):
        got = compiled(fn, x, *(a[:n_local] for a in w), local, n_experts=n_local, elsewhere=True, glu=glu,
                       biases=tuple(b[:n_local] for b in biases))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want_local), rtol=1e-5, atol=1e-5)


def test_experts_split_over_devices_equal_one_device(tmp_path):
    """8 experts over 1, 2 and 4 CPU devices (tests/sharding_worker.py): the same logits and greedy
    tokens, and each device holds 1/N of the expert weights *and of their biases*."""
    hf = build("gpt_oss", num_local_experts=8, sliding_window=4, **SMALL)
    folder = save(hf, tmp_path / "ckpt")
    out = tmp_path / "devices.json"
    subprocess.run([sys.executable, WORKER, "devices", str(folder), str(out), "1,2,4"], check=True, timeout=600)
    result = json.loads(out.read_text())
    base = np.array(result["1"]["logits"])
    np.testing.assert_allclose(base, hf_logits(hf, WORKER_IDS).numpy(), atol=1e-4, rtol=0)
    d, f = 32, 40
    expert_bytes = 2 * 8 * (3 * d * f + 2 * f + d) * 4  # 2 layers x 8 experts x (weights + biases), float32
    one = result["1"]["bytes_per_device"][0]
    for n in (2, 4):
        many = result[str(n)]
        np.testing.assert_allclose(np.array(many["logits"]), base, atol=1e-5, rtol=0)
        assert many["greedy"] == result["1"]["greedy"]
        assert many["devices_used"] == n
        assert all(s[0] == 8 // n for s in many["expert_shard_shapes"])
        assert all(used == one - expert_bytes + expert_bytes // n for used in many["bytes_per_device"])

