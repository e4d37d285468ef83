"""Token sampling that runs on device, inside a jitted decode step.

Each technique is a small function from logits to logits, where a removed token gets -inf.
`sample` chains them in the order Hugging Face transformers uses (`_get_logits_processor`):

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw

so the same settings give the same distribution as `model.generate(do_sample=True, ...)`.

The settings travel as 0-d arrays (`sampler_state`), not as Python constants, so a jitted step
traces once and serves every temperature, top-k, top-p, ... a user may pick, greedy included.
That is why top-k uses a sort-based threshold (k may be traced) rather than `lax.top_k`, and
why a disabled filter is skipped with `lax.cond` rather than a Python `if`. Nothing leaves the
device: the chosen token ids are the only output.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from moecli.errors import UsageError


def is_integer(x) -> bool:
    """An int (NumPy's included) but not a bool: True is an int to Python, not a token count."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


SEED_LIMIT = 2**32  # JAX keeps a seed's low 32 bits: 2**32 would replay seed 0


@dataclass(frozen=True)
class SamplingParams:
    """Everything a user sets about one reply, as plain Python values, checked in one place
    (`validate`). The defaults mean greedy decoding, deterministic, of at most 256 tokens."""

    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0  # nucleus; 1 disables
    top_k: int = 0  # 0 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1 disables
    seed: int | None = 0  # None: drawn at random (see `seeded`)
    max_tokens: int = 256  # the most tokens a reply may have

    def validate(self) -> None:
        """Raise `UsageError` for a value no sampler can use (NaN and infinity included).

        The one place these settings are checked: the CLI flags, `/set` in a chat, the Python
        API and the decoder all call it, so a bad value reads the same wherever it comes from."""
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0, got {self.temperature}", "use 0 for greedy, ~0.7 for sampling"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}", "use 1 to disable nucleus sampling"),
            (is_integer(self.top_k) and self.top_k >= 0,
             f"top_k must be an integer >= 0, got {self.top_k}", "use 0 to disable top-k"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}", "use 0 to disable min-p"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}", "use 1 to disable it, ~1.1 to discourage repeats"),
            (self.seed is None or (is_integer(self.seed) and 0 <= self.seed < SEED_LIMIT),
             f"seed must be an integer in [0, 2**32), got {self.seed}", "e.g. --seed 1 (or /set seed 1 in a chat)"),
            (is_integer(self.max_tokens) and self.max_tokens > 0,
             f"max_tokens must be positive, got {self.max_tokens}",
             "pass --max-tokens 1 or more (in a chat: /set max_tokens 256)"),
        ]
        for ok, message, hint in checks:
            if not ok:
                raise UsageError(message, hint)

    def seeded(self) -> SamplingParams:
        """These settings with a definite seed: a fresh random one when `seed` is None, so a run
        that asked for no seed can still say which one it used, and be replayed with it."""
        return self if self.seed is not None else dataclasses.replace(self, seed=random_seed())


def random_seed() -> int:
    """A seed from the operating system's randomness (not from JAX, whose keys are all derived)."""
    return secrets.randbelow(SEED_LIMIT)


def reply_key(seed: int, reply: int = 0) -> jax.Array:
    """The PRNG key for reply number `reply` (0, 1, 2, ...) of a conversation seeded with `seed`.

    Folding the reply's index into the seed's key gives every reply fresh randomness, while the
    whole conversation stays reproducible: the same seed and inputs give the same replies."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), reply)


def sampler_state(params: SamplingParams) -> dict[str, jax.Array]:
    """The numeric settings as 0-d device arrays: new values never recompile a jitted step.

    The seed and max_tokens are not here: the key comes from `reply_key`, and the loop counts tokens.
    """
    params.validate()
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return {
        "temperature": f32(params.temperature),
        "top_p": f32(params.top_p),
        "top_k": jnp.asarray(params.top_k, jnp.int32),
        "min_p": f32(params.min_p),
        "repetition_penalty": f32(params.repetition_penalty),
    }


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """Make tokens already in the context (prompt and output) less likely (CTRL, Keskar et al. 2019).

    A positive logit is divided by the penalty and a negative one multiplied, so a penalty > 1
    always pushes a seen token down, whatever its sign. Each token is penalised once, however
    often it occurred.
    """
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Sharpen (< 1) or flatten (> 1) the distribution by dividing the logits by the temperature.

    Temperature 0 is greedy and handled in `sample`; here it divides by 1 to stay finite.
    """
    return logits / jnp.where(temperature > 0, temperature, 1.0)


def apply_top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Keep only the k most likely tokens, cutting off the long tail of unlikely ones.

    k may be a traced value, so instead of `lax.top_k` (static k) the k-th largest logit is read
    from a descending sort and used as a threshold; ties with it survive, as in transformers.
    """
    k = jnp.clip(top_k, 1, logits.shape[-1])
    kth = jnp.take(-jnp.sort(-logits, axis=-1), k - 1, axis=-1)[..., None]
    return jnp.where(logits < kth, -jnp.inf, logits)


def apply_top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability adds up to at least top_p, and always the most likely one.

    Mirrors transformers: sort ascending, drop the tokens whose cumulative probability is
    <= 1 - top_p. That count of dropped tokens gives the smallest surviving logit, a threshold.
    Tokens tied with it all survive (transformers splits a tie by its arbitrary sort order).
    """
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    n_drop = jnp.sum(cumulative <= 1 - top_p, axis=-1, keepdims=True)
    n_drop = jnp.minimum(n_drop, logits.shape[-1] - 1)  # keep at least one token
    threshold = jnp.take_along_axis(ascending, n_drop, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Min-p (Nguyen et al. 2024): drop tokens less likely than min_p times the top token.

    The cut-off scales with the model's confidence: strict when one token dominates, lenient
    when many are plausible. The top token always survives since min_p <= 1.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    floor = min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < floor, -jnp.inf, logits)


def _unless(disabled: jax.Array, fn, logits: jax.Array, value: jax.Array) -> jax.Array:
    """`fn(logits, value)`, skipped at run time (no recompile) when `disabled` is true."""
    return lax.cond(disabled, lambda x, _: x, fn, logits, value)


def process_logits(logits: jax.Array, settings: dict[str, jax.Array], seen: jax.Array) -> jax.Array:
    """The logits `sample` draws from: penalty, temperature and filters, in transformers' order.

    Removed tokens are -inf. float32 [batch, vocab] in and out.
    """
    s = settings
    logits = logits.astype(jnp.float32)
    logits = _unless(s["repetition_penalty"] == 1, lambda x, p: apply_repetition_penalty(x, seen, p),
                     logits, s["repetition_penalty"])
    logits = apply_temperature(logits, s["temperature"])
    logits = _unless(s["top_k"] <= 0, apply_top_k, logits, s["top_k"])
    logits = _unless(s["top_p"] >= 1, apply_top_p, logits, s["top_p"])
    logits = _unless(s["min_p"] <= 0, apply_min_p, logits, s["min_p"])
    return logits


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, -1) (the first maximum; a NaN counts as the maximum) as int32, computed as a
    max and a min over the positions that hold it: two plain reductions, which XLA:CPU vectorises,
    where its argmax (one reduction over value-index pairs) took ~0.7 ms over a 49k vocabulary."""
    top = jnp.max(x, axis=-1, keepdims=True)  # NaN if any is NaN
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


def sample(logits: jax.Array, key: jax.Array, settings: dict[str, jax.Array], seen: jax.Array) -> jax.Array:
    """Pick the next token of each row: int32 [batch] from float32 logits [batch, vocab].

    Temperature 0 takes the argmax after the repetition penalty (the other filters cannot
    change the argmax); otherwise a categorical draw from `process_logits`. The branch is a
    `lax.cond` on the traced temperature, so switching between the two does not recompile.
    """

    def greedy(logits):
        return first_argmax(apply_repetition_penalty(logits, seen, settings["repetition_penalty"]))

    def draw(logits):
        filtered = process_logits(logits, settings, seen)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    return lax.cond(settings["temperature"] > 0, draw, greedy, logits.astype(jnp.float32))


def update_seen(seen: jax.Array, token_ids: jax.Array) -> jax.Array:
    """Mark `token_ids` (int [batch] or [batch, n]) as seen in the bool [batch, vocab] mask.

    Build the initial mask with `update_seen(jnp.zeros((b, vocab), bool), prompt_ids)`.
    Negative ids (padding) are ignored.
    """
    ids = jnp.asarray(token_ids).reshape(seen.shape[0], -1)
    ids = jnp.where(ids < 0, seen.shape[-1], ids)  # out of range: dropped by the scatter
    rows = jnp.arange(seen.shape[0])[:, None]
    return seen.at[rows, ids].set(True, mode="drop")
