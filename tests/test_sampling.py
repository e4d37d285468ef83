"""moecli.inference.sampling against Hugging Face transformers' logits processors, the oracle."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as hf
from transformers.generation.utils import GenerationMixin

from moecli.inference import sampling as S
from moecli.errors import UsageError

BATCH, VOCAB = 4, 64
process_logits = jax.jit(S.process_logits)  # compiled once for every setting: also faster
sample = jax.jit(S.sample)


def random_logits(seed: int, batch: int = BATCH, vocab: int = VOCAB, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * scale).astype(np.float32)


def random_context(seed: int, batch: int = BATCH, vocab: int = VOCAB, length: int = 12) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(0, vocab, (batch, length))


def seen_mask(context: np.ndarray, vocab: int = VOCAB) -> jax.Array:
    return S.update_seen(jnp.zeros((context.shape[0], vocab), bool), jnp.asarray(context))


def hf_process(processors, logits: np.ndarray, context: np.ndarray) -> np.ndarray:
    scores = torch.from_numpy(logits.copy())
    ids = torch.from_numpy(context).long()
    for proc in processors:
        scores = proc(ids, scores)
    return scores.numpy()


def hf_chain(params: S.SamplingParams):
    """The processor list transformers' own `generate` builds for these settings, in its order."""

    class Model(GenerationMixin):
        config = types.SimpleNamespace(is_encoder_decoder=False)

    config = GenerationConfig(
        do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        min_p=params.min_p, repetition_penalty=params.repetition_penalty,
    )
    return Model()._get_logits_processor(config, input_ids_seq_length=12, device="cpu", model_kwargs={})


def assert_same_filtering(ours, theirs) -> None:
    """Same surviving tokens (-inf marks removal) and the same values for those that survive."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    kept = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6, atol=1e-6)


# -- each technique against its transformers counterpart ------------------------------------------

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(seed, penalty):
    logits, context = random_logits(seed), random_context(seed)
    ours = S.apply_repetition_penalty(jnp.asarray(logits), seen_mask(context), jnp.float32(penalty))
    theirs = hf_process([hf.RepetitionPenaltyLogitsProcessor(penalty)], logits, context)
    assert_same_filtering(ours, theirs)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(temperature):
    logits, context = random_logits(0), random_context(0)
    ours = S.apply_temperature(jnp.asarray(logits), jnp.float32(temperature))
    assert_same_filtering(ours, hf_process([hf.TemperatureLogitsWarper(temperature)], logits, context))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("top_k", [1, 2, 10, VOCAB, VOCAB + 5])
def test_top_k_matches_transformers(seed, top_k):
    logits, context = random_logits(seed), random_context(seed)
    ours = S.apply_top_k(jnp.asarray(logits), jnp.int32(top_k))
    assert_same_filtering(ours, hf_process([hf.TopKLogitsWarper(top_k)], logits, context))
    assert (~np.isneginf(np.asarray(ours))).sum(-1).tolist() == [min(top_k, VOCAB)] * BATCH


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.8, 0.95, 0.999])
def test_top_p_matches_transformers(seed, top_p):
    logits, context = random_logits(seed), random_context(seed)
    ours = S.apply_top_p(jnp.asarray(logits), jnp.float32(top_p))
    assert_same_filtering(ours, hf_process([hf.TopPLogitsWarper(top_p)], logits, context))


def test_top_p_keeps_at_least_the_top_token():
    logits = np.array([[10.0, 0.0, -1.0, -2.0]], np.float32)  # the top token alone has p > 0.99
    ours = np.asarray(S.apply_top_p(jnp.asarray(logits), jnp.float32(1e-6)))
    assert np.isneginf(ours).tolist() == [[False, True, True, True]]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(seed, min_p):
    logits, context = random_logits(seed), random_context(seed)
    ours = S.apply_min_p(jnp.asarray(logits), jnp.float32(min_p))
    assert_same_filtering(ours, hf_process([hf.MinPLogitsWarper(min_p)], logits, context))


CHAINS = [
    S.SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    S.SamplingParams(temperature=1.5, top_k=8, top_p=0.5, repetition_penalty=0.8),
    S.SamplingParams(temperature=0.5, top_p=0.95),
    S.SamplingParams(temperature=1.2, min_p=0.2),
    S.SamplingParams(temperature=1.0, top_k=5),
    S.SamplingParams(temperature=1.0),
]


@pytest.mark.parametrize("params", CHAINS, ids=repr)
@pytest.mark.parametrize("seed", range(3))
def test_full_chain_matches_transformers_generate_order(params, seed):
    logits, context = random_logits(seed), random_context(seed)
    ours = process_logits(jnp.asarray(logits), S.sampler_state(params), seen_mask(context))
    assert_same_filtering(ours, hf_process(hf_chain(params), logits, context))


# -- sampling -------------------------------------------------------------------------------------

def test_greedy_is_argmax_after_repetition_penalty():
    logits, context = random_logits(1), random_context(1)
    seen = seen_mask(context)
    key = jax.random.key(0)
    greedy = sample(jnp.asarray(logits), key, S.sampler_state(S.SamplingParams()), seen)
    assert greedy.dtype == jnp.int32 and greedy.shape == (BATCH,)
    np.testing.assert_array_equal(greedy, logits.argmax(-1))

    params = S.SamplingParams(repetition_penalty=3.0, top_k=3, top_p=0.5)  # filters don't move argmax
    penalised = hf_process(hf_chain(S.SamplingParams(temperature=1.0, repetition_penalty=3.0)), logits, context)
    np.testing.assert_array_equal(sample(jnp.asarray(logits), key, S.sampler_state(params), seen),
                                  penalised.argmax(-1))


def test_first_argmax_is_numpys_argmax_ties_nans_and_infinities_included():
    rows = np.array([[1.0, 3.0, 3.0, 2.0],                     # a tie: the first wins
                     [np.nan, 1.0, np.nan, 5.0],               # NaN counts as the maximum
                     [-np.inf, -np.inf, -np.inf, -np.inf],
                     [np.inf, 0.0, np.inf, 1.0]], np.float32)
    rows = np.concatenate([rows, random_logits(3).astype(np.float32)[:, :4]])
    np.testing.assert_array_equal(jax.jit(S.first_argmax)(jnp.asarray(rows)), rows.argmax(-1))


def test_repetition_penalty_steers_greedy_away_from_seen_token():
    logits = jnp.array([[2.0, 1.9, 0.0]])
    seen = S.update_seen(jnp.zeros((1, 3), bool), jnp.array([0]))
    settings = S.sampler_state(S.SamplingParams(repetition_penalty=1.2))
    assert int(sample(logits, jax.random.key(0), settings, seen)[0]) == 1


def test_same_seed_same_samples_different_seed_different():
    logits = jnp.asarray(random_logits(2, batch=64, scale=1.0))
    seen = jnp.zeros(logits.shape, bool)
    settings = S.sampler_state(S.SamplingParams(temperature=1.0))
    a = sample(logits, jax.random.key(7), settings, seen)
    b = sample(logits, jax.random.key(7), settings, seen)
    c = sample(logits, jax.random.key(8), settings, seen)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("params", [
    S.SamplingParams(temperature=1.0),
    S.SamplingParams(temperature=0.8, top_k=6, top_p=0.9, repetition_penalty=1.5),
    S.SamplingParams(temperature=1.3, min_p=0.1, repetition_penalty=0.7),
], ids=repr)
def test_sample_frequencies_follow_the_filtered_distribution(params):
    vocab, draws = 12, 40_000
    logits, context = random_logits(3, batch=1, vocab=vocab, scale=1.0), random_context(3, 1, vocab, 4)
    seen, settings = seen_mask(context, vocab), S.sampler_state(params)
    keys = jax.random.split(jax.random.key(params.seed), draws)
    tokens = jax.jit(jax.vmap(lambda k: S.sample(jnp.asarray(logits), k, settings, seen)[0]))(keys)
    counts = np.bincount(np.asarray(tokens), minlength=vocab)

    expected = torch.softmax(torch.from_numpy(hf_process(hf_chain(params), logits, context)), -1)[0].numpy()
    assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
    kept = expected > 0
    chi2 = (((counts[kept] - draws * expected[kept]) ** 2) / (draws * expected[kept])).sum()
    dof = kept.sum() - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof) + 10, (chi2, dof)  # ~6 sigma above the chi2 mean


def test_changing_settings_does_not_recompile():
    traces = 0

    def step(logits, key, settings, seen):
        nonlocal traces
        traces += 1
        return S.sample(logits, key, settings, seen)

    step = jax.jit(step)
    logits, seen = jnp.asarray(random_logits(4)), jnp.zeros((BATCH, VOCAB), bool)
    for params in [S.SamplingParams(), *CHAINS, S.SamplingParams(top_k=3, seed=9)]:
        step(logits, jax.random.key(params.seed), S.sampler_state(params), seen).block_until_ready()
    assert traces == 1


def test_update_seen_marks_tokens_and_ignores_padding():
    seen = jnp.zeros((2, 5), bool)
    seen = S.update_seen(seen, jnp.array([[1, 3, -1], [4, 4, -1]]))
    seen = S.update_seen(seen, jnp.array([0, 2]))
    assert np.asarray(seen).tolist() == [
        [True, True, False, True, False],
        [False, False, True, False, True],
    ]


# -- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(top_p=0.0), dict(top_p=1.01), dict(top_p=-0.5), dict(top_p=float("nan")),
    dict(top_k=-1), dict(top_k=2.5),
    dict(min_p=-0.01), dict(min_p=1.5),
    dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
    dict(seed=-1), dict(seed=2**32), dict(seed=1.5),
    dict(max_tokens=0), dict(max_tokens=-3), dict(max_tokens=2.5), dict(max_tokens=True),
])
def test_validate_rejects_bad_values(bad):
    params = S.SamplingParams(**bad)
    with pytest.raises(UsageError) as err:
        params.validate()
    assert err.value.hint
    with pytest.raises(UsageError):
        S.sampler_state(params)


def test_validate_accepts_edges():
    for ok in [S.SamplingParams(), S.SamplingParams(temperature=2.0, top_p=1.0, top_k=1, min_p=1.0,
                                                    repetition_penalty=0.01, seed=3, max_tokens=1),
               S.SamplingParams(seed=None), S.SamplingParams(seed=2**32 - 1)]:
        ok.validate()


def test_max_tokens_message_names_the_flag_and_the_chat_setting():
    with pytest.raises(UsageError) as err:
        S.SamplingParams(max_tokens=0).validate()
    assert "max_tokens must be positive, got 0" in str(err.value)
    assert "--max-tokens" in err.value.hint and "/set max_tokens" in err.value.hint


# -- seeds and keys -------------------------------------------------------------------------------

def test_seeded_draws_a_seed_only_when_none_was_given():
    assert S.SamplingParams(seed=5).seeded().seed == 5
    drawn = {S.SamplingParams(seed=None).seeded().seed for _ in range(8)}
    assert all(isinstance(s, int) and 0 <= s < S.SEED_LIMIT for s in drawn)
    assert len(drawn) > 1  # fresh randomness each time (8 equal 32-bit draws: p = 2**-224)


def test_reply_keys_differ_per_reply_and_replay_per_seed():
    keys = [np.asarray(S.reply_key(7, n)).tolist() for n in range(4)]
    assert len({tuple(k) for k in keys}) == 4                     # each reply draws afresh
    assert np.asarray(S.reply_key(7, 2)).tolist() == keys[2]      # and replays exactly
    assert np.asarray(S.reply_key(8, 0)).tolist() != keys[0]
