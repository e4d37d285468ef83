"""Routing views, expert masks and chat cache reuse for every checkpoint family in
`moecli.checkpoints.families.FAMILIES`, each on one tiny random checkpoint (with a ChatML tokenizer)
built from its parity tests' overrides:
- `moe generate --routing-json` lists, per token, one entry per MoE layer (dense layers left out)
  whose experts and weights are the ones transformers' own experts receive: the weights applied
  (after a sigmoid router's selection bias, gpt-oss's softmax over its top k, DeepSeek's scaling);
- `--mask LAYER:EXPERT` routes no token to that expert, as the masked model routes them, and any
  mask that leaves top_k experts routes only to those, whatever the router (expert groups included),
  and changes the logits;
- a 3-turn greedy `ChatSession`, which reuses its cache, replies with the same tokens as one that
  recomputes every turn from an empty cache (latent caches, windows shorter than the chat);
- continuous batching (`moe serve`) gives each request the tokens it gets alone."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

from checkpoints import chat_checkpoint
from test_deepseek import CASES as DEEPSEEK
from test_dots1 import CASES as DOTS1
from test_ernie import CASES as ERNIE
from test_glm_minimax import CASES as GLM_MINIMAX
from test_hunyuan import CASES as HUNYUAN
from test_gpt_oss import CASES as GPT_OSS
from test_granite import CASES as GRANITE
from test_llama4 import CASES as LLAMA4
from test_parity import CASES as PARITY
from test_phimoe import CASES as PHIMOE
from test_qwen3_next import MODELS as QWEN3_NEXT
from moecli import load_model
from moecli.checkpoints.families import FAMILIES
from moecli.cli.main import app
from moecli.inference.conversation import ChatSession
from moecli.inference.decoder import generate_tokens
from moecli.inference.engine import Model
from moecli.inference.routing import moe_layer_numbers
from moecli.inference.sampling import SamplingParams
from moecli.serve.scheduler import Scheduler
from moecli.text.tokenizer import Tokenizer
from serving import submit

# model_type -> (the transformers model_type that builds it, overrides): one parity case per family, chosen
# for what these features could get wrong (windows and chunks shorter than the chat, dense layers, groups).
CHECKPOINTS = {
    "mixtral": PARITY["mixtral-top3-window"],                        # softmax, window 5
    "qwen2_moe": PARITY["qwen2-shared-sparse-step"],                 # dense layers between MoE ones
    "qwen3_moe": PARITY["qwen3-headdim-mlp-only"],                   # dense first layer
    "olmoe": PARITY["olmoe-clip"],                                   # softmax without renormalising
    "glm4_moe": GLM_MINIMAX["glm-groups-dense-shared-qknorm-mtp"],   # sigmoid, biased, 4 groups, dense first
    "minimax_m2": GLM_MINIMAX["minimax-top3-mha-full-rotary"],       # sigmoid, biased, no groups
    "gpt_oss": ("gpt_oss", GPT_OSS["window4-default-yarn-top2"]),    # biased top-k-then-softmax, window 4
    "deepseek_v2": DEEPSEEK["v2-group-limited-qlora-yarn"],          # latents; group-limited softmax, scaled
    "deepseek_v3": DEEPSEEK["v3-qlora-groups-dense-first"],          # latents; sigmoid with groups
    "kimi_k2": DEEPSEEK["v3-q-proj-yarn-rotate-half-bias"],          # DeepSeek-V3's, config.json says kimi_k2
    "glm4_moe_lite": DEEPSEEK["glm-lite-equal-head-sizes"],          # latents; dense first
    "ernie4_5_moe": ("ernie4_5_moe", ERNIE["interval-end-bias-normmin-shared"]),  # biased softmax, norm_min
    "phimoe": ("phimoe", PHIMOE["longrope-bias-jitter-odd"]),       # sparsemixer, a wide jitter band
    "granitemoe": GRANITE["granite-odd-headdim-tied"],
    "granitemoeshared": GRANITE["granite-shared-mqa-top3-bias"],
    "llama4_text": ("llama4_text", LLAMA4["dense-chunk4-nope-temperature-llama3"]),  # top-1 sigmoid, chunks of 4
    "qwen3_next": QWEN3_NEXT["next"],                                # recurrent Gated DeltaNet state
    "qwen3_5_moe_text": QWEN3_NEXT["3.5"],
    "hunyuan_v1_moe": ("hunyuan_v1_moe", HUNYUAN["alpha-rope-bias-odd-headdim"]),  # softmax, shared MLP
    "dots1": DOTS1["groups-dense-shared-bias-window"],              # sigmoid, biased, 3 groups, window 6
}
# Multimodal checkpoints moecli loads as their text model: these features are the text model's.
TEXT_MODEL_OF = {"llama4": "llama4_text", "qwen3_5_moe": "qwen3_5_moe_text"}
GREEDY = SamplingParams(temperature=0.0)
TURNS = ["hello there", "and then what happened to the water?", "tell me more"]


class Family(NamedTuple):
    model_type: str
    folder: Path
    hf: transformers.PreTrainedModel  # the same weights in transformers (kimi_k2: as deepseek_v3)
    model: Model
    tokenizer: Tokenizer


def test_every_family_has_a_checkpoint_here():
    assert set(CHECKPOINTS) | set(TEXT_MODEL_OF) == set(FAMILIES) and set(TEXT_MODEL_OF.values()) <= set(CHECKPOINTS)


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def family(request, tmp_path_factory) -> Family:
    model_type = request.param
    builder, overrides = CHECKPOINTS[model_type]
    folder = chat_checkpoint(tmp_path_factory.mktemp(model_type), "chatml", model_type=builder, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32).eval()
    if builder != model_type:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    model = load_model(folder, dtype="float32")
    assert model.config.family == model_type
    return Family(model_type, folder, hf, model, Tokenizer.from_dir(folder))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def hf_routing(hf, ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{model layer: (experts, weights) [tokens, top_k]} as transformers applies them: the arguments of
    each layer's experts module (hidden, experts, weights), or Llama-4's router's [tokens, n_experts]
    scores (its experts take inputs already scaled), which are 0 off the chosen experts."""
    seen = {}

    def experts_hook(layer):
        return lambda module, args: seen.__setitem__(layer, (args[1].numpy(), args[2].float().numpy()))

    def router_hook(layer):
        def hook(module, args, out):
            weights, experts = torch.topk(out[0].float(), module.top_k, dim=-1)
            seen[layer] = (experts.numpy(), weights.numpy())
        return hook

    hooks = []
    for name, module in hf.named_modules():
        layer = re.search(r"layers\.(\d+)\.", name + ".")
        if type(module).__name__ == "Llama4Router":
            hooks.append(module.register_forward_hook(router_hook(int(layer[1]))))
        elif name.endswith(".experts") and type(module).__name__ != "Llama4TextExperts":
            hooks.append(module.register_forward_pre_hook(experts_hook(int(layer[1]))))
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return seen


def generate(family: Family, out: Path, *extra):
    result = run("generate", "--model", family.folder, "--prompt", "the water", "--system", "Be brief.",
                 "--temperature", 0, "--max-tokens", 8, "--routing-json", out, *extra)
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


@pytest.fixture(scope="module")
def routing_json(family, tmp_path_factory) -> dict:
    """The --routing-json records of an unmasked greedy reply."""
    return generate(family, tmp_path_factory.mktemp("routing") / "routing.json")[1]


@pytest.fixture(scope="module")
def forward(family):
    """(ids [1, seq], expert mask) -> (logits, Routing): the full forward with experts switched off."""
    model = family.model
    apply = jax.jit(lambda params, ids, mask: model.apply(params, ids, None, mask)[::2])
    return lambda ids, mask: jax.tree_util.tree_map(np.asarray, apply(model.params, np.asarray(ids), mask))


def no_mask(config) -> np.ndarray:
    return np.zeros((len(moe_layer_numbers(config)), config.n_experts), bool)


def test_routing_json_lists_the_moe_layers_with_the_weights_applied(family, routing_json):
    data = routing_json
    layers = moe_layer_numbers(family.model.config)
    theirs = hf_routing(family.hf, [t["id"] for t in data["tokens"]])
    assert sorted(theirs) == layers and data["moe_layers"] == layers     # dense layers are not listed
    assert data["top_k"] == family.model.config.top_k and len(data["tokens"]) > 8
    for i, token in enumerate(data["tokens"]):
        assert [entry["layer"] for entry in token["layers"]] == layers
        for entry in token["layers"]:
            experts, weights = theirs[entry["layer"]][0][i], theirs[entry["layer"]][1][i]
            ours, theirs_order = np.argsort(entry["experts"]), np.argsort(experts)
            assert np.array(entry["experts"])[ours].tolist() == experts[theirs_order].tolist(), (i, entry)
            np.testing.assert_allclose(np.array(entry["weights"])[ours], weights[theirs_order], atol=1e-4)


def test_mask_routes_no_token_to_the_expert(family, routing_json, forward, tmp_path):
    """Each MoE layer's most used expert switched off with --mask: no token of the prompt or the reply
    goes to it, and the routing written is the masked model's own (its logits: the next test)."""
    layers = moe_layer_numbers(family.model.config)
    mask = no_mask(family.model.config)
    for j in range(len(layers)):
        firsts = [t["layers"][j]["experts"][0] for t in routing_json["tokens"]]
        mask[j, max(set(firsts), key=firsts.count)] = True
    specs = [f"--mask={layers[j]}:{e}" for j, e in zip(*np.nonzero(mask))]
    _, masked = generate(family, tmp_path / "masked.json", *specs)
    _, routing = forward([[t["id"] for t in masked["tokens"]]], mask)
    for i, token in enumerate(masked["tokens"]):
        for j, entry in enumerate(token["layers"]):
            assert not mask[j, entry["experts"]].any(), (i, entry)
            assert entry["experts"] == routing.experts[j, 0, i].tolist()
            np.testing.assert_allclose(entry["weights"], routing.weights[j, 0, i], atol=1e-4)
    if layers[0] > 0:  # a dense layer has no experts to mask
        refused = run("generate", "--model", family.folder, "--prompt", "x", "--mask", "0:0")
        assert refused.exit_code != 0 and "layer 0 has no experts to mask" in refused.stderr


def test_any_mask_that_leaves_top_k_experts_routes_only_to_those(family, routing_json, forward):
    """Every MoE layer keeps exactly top_k experts, drawn at random and, with expert groups, one in
    each of top_k groups, so that a token's best groups hold fewer than top_k of them: no token reaches a
    disabled expert, every weight is finite, and the logits change. So do they when a single used expert
    is switched off, which leaves the layers before it as they were and, without groups (where it cannot
    move a group's rank) or a selection bias on probabilities, the other tokens' choices too."""
    c = family.model.config
    ids = [[t["id"] for t in routing_json["tokens"]]]
    none = no_mask(c)
    logits, routing = forward(ids, none)
    rng = np.random.default_rng(1)
    keeps = [rng.choice(c.n_experts, c.top_k, replace=False) for _ in range(3)]
    if c.n_group > 1:  # one expert in each of top_k groups: a token's topk_group best hold too few
        assert c.topk_group < c.top_k <= c.n_group
        keeps.append(np.arange(c.top_k) * (c.n_experts // c.n_group))
    for keep in keeps:
        mask = ~none
        mask[:, keep] = False
        masked_logits, masked = forward(ids, mask)
        assert set(masked.experts.ravel()) <= set(keep.tolist()), keep
        assert np.isfinite(masked.weights).all() and np.isfinite(masked_logits).all()
        assert np.abs(masked_logits - logits).max() > 1e-3
    experts = routing.experts                                            # [layers, 1, seq, k]
    victim = np.bincount(experts[-1].ravel(), minlength=c.n_experts).argmax()
    mask = none.copy()
    mask[-1, victim] = True
    masked_logits, masked = forward(ids, mask)
    assert not (masked.experts[-1] == victim).any()
    np.testing.assert_array_equal(masked.experts[:-1], experts[:-1])    # the layers before: untouched
    if c.n_group == 1 and not c.selection_bias:  # ERNIE's bias on the rescaled probabilities could reorder
        untouched = ~(experts[-1] == victim).any(-1)                     # [1, seq]: tokens that did not use it
        np.testing.assert_array_equal(np.sort(masked.experts[-1][untouched], -1),
                                      np.sort(experts[-1][untouched], -1))
    assert np.abs(masked_logits - logits).max() > 1e-3


def test_three_turn_chat_reusing_the_cache_equals_recomputing_each_turn(family):
    """The chat's replies, each turn prefilling only what its cache lacks, against the same session
    replaying each turn from an empty cache (`Decoder.reset`: the same compiled programs)."""
    chat = ChatSession(family.model, family.tokenizer, GREEDY, max_tokens=10, system="Be brief.",
                       notify=pytest.fail)
    replies, histories = [], []
    for turn, text in enumerate(TURNS):
        histories.append([dict(m) for m in chat.messages])
        replies.append(("".join(chat.reply(text)), chat.decoder.ids[slice(*chat.reply_span)]))
        assert replies[-1][1], "an empty reply tests nothing"
        if turn:
            assert chat.last_stats.reused_tokens > 10                    # the earlier turns were not prefilled
    c = family.model.config
    window = max(c.sliding_window or 0, c.attention_chunk or 0)          # or Llama-4's attention chunks
    assert chat.decoder.pos > 4 * window                                 # the chat outgrew them
    for text, history, reply in zip(TURNS, histories, replies):
        chat.messages = history
        chat.decoder.reset()
        assert ("".join(chat.reply(text)), chat.decoder.ids[slice(*chat.reply_span)]) == reply
        assert chat.last_stats.reused_tokens == 0


def test_batched_serving_gives_each_request_the_tokens_it_gets_alone(family):
    """Continuous batching (`moecli.serve`): requests of different lengths join a 4-row batch at different
    steps, their prompts prefilled in chunks of 5 between the others' decode steps, and each gets exactly
    the greedy tokens of decoding it alone (padding rows in the step's bucket included); a request that
    continues a finished one starts from its cached prefix (a recurrent state too) with the same tokens."""
    encode = family.tokenizer.encode
    prompts = [encode(text) for text in ("the water", "and then what happened to the water in the end?", "tell")]
    alone = [generate_tokens(family.model, p, max_new_tokens=8) for p in prompts]
    scheduler = Scheduler(family.model, max_batch=4, context=96, prefill_chunk=5).start()
    try:
        first, _ = submit(scheduler, prompts[0])
        assert first.first.wait(120)                                     # decoding when the others arrive
        rest = [submit(scheduler, p)[0] for p in prompts[1:]]
        assert [out.wait().tokens for out in [first, *rest]] == alone
        assert {out.done.reason for out in [first, *rest]} == {"length"}
        follow = prompts[1] + alone[1] + encode(" and more")
        out = submit(scheduler, follow)[0].wait()
        assert out.done.cached_tokens == len(prompts[1]) + len(alone[1]) - 1  # all its cache held
        assert out.tokens == generate_tokens(family.model, follow, max_new_tokens=8)
    finally:
        scheduler.close()
