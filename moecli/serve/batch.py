"""Continuous batching on the device: one cache for up to `max_batch` sequences, each at its own position.

What: "iteration-level scheduling" (Yu et al. 2022, "Orca"): instead of decoding a fixed batch from start
to end, requests join and leave a running batch between decode steps, so the weights each step reads
(at batch 1 a decode step is a stream of them through memory) serve every active sequence at once.

How it is laid out here:
- One `Cache` of `max_batch` rows whose `pos` is int32 [max_batch]: each row writes its keys/values at,
  and its queries attend up to, its own position (`moecli.model.cache.write_at`, the per-row masks of
  `moecli.model.ops.attention_mask`, RoPE at [batch, seq] positions). Every attention kind and every
  family goes through those, recurrent states included (a row's state is its own).
- The active sequences occupy rows 0..n-1; a decode step runs on the first `bucket(n)` rows (1, 2, 4,
  ... max_batch), so the step's shapes - and its compiled program - are one of a few, whatever requests
  come and go, and one client alone costs a batch-1 step. A retired row is filled by moving the last
  active row into it (`move`).
- A prompt is prefilled alone into a batch-1 staging cache (`moecli.inference.decoder.Decoder`, which
  `moecli.serve.scheduler` feeds chunk by chunk between decode steps), then copied into a free row (`put`).
- Sampling runs per row with each row's own settings and PRNG key, split as `Decoder.tokens` splits it,
  so a seeded request draws the same tokens batched as alone.
"""
from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moecli.inference.engine import Model
from moecli.inference.sampling import (SamplingParams, apply_repetition_penalty, first_argmax, sample,
                                       sampler_state, update_seen)
from moecli.model.cache import Cache

tree_map = jax.tree_util.tree_map


def bucket(n: int, max_batch: int) -> int:
    """The rows a decode step runs for n active sequences: the next power of two >= n, at most max_batch."""
    return min(max_batch, 1 << max(0, n - 1).bit_length())


def sample_rows(logits: jax.Array, keys: jax.Array, settings: dict, seen: jax.Array) -> jax.Array:
    """`moecli.inference.sampling.sample` for each row with its own settings ([rows] arrays) and key
    ([rows, 2]): int32 [rows]. A batch where every row is greedy takes the argmax directly (the
    per-row draw computes every filter, sorts over the vocabulary included, for every row)."""

    def greedy(logits):
        return first_argmax(apply_repetition_penalty(logits, seen, settings["repetition_penalty"][:, None]))

    def per_row(logits):
        one = lambda lg, key, s, sn: sample(lg[None], key, s, sn[None])[0]  # noqa: E731
        return jax.vmap(one)(logits, keys, settings, seen)

    return lax.cond(jnp.all(settings["temperature"] == 0), greedy, per_row, logits.astype(jnp.float32))


class Batch:
    """The device state of a running batch: the cache, each row's seen tokens (repetition penalty),
    sampling settings and PRNG key, and the compiled steps over them. Not thread-safe: one thread
    (the scheduler's) drives it."""

    def __init__(self, model: Model, max_batch: int, context: int):
        self.model, self.max_batch, self.context = model, max_batch, context
        cache = model.init_cache(max_batch, context)
        self.cache = cache._replace(pos=jnp.zeros((max_batch,), jnp.int32))
        self.seen = jnp.zeros((max_batch, model.config.vocab_size), bool)
        defaults = sampler_state(SamplingParams())
        self.settings = {name: jnp.zeros((max_batch,), value.dtype) for name, value in defaults.items()}
        self.keys = jnp.zeros((max_batch, *jax.random.PRNGKey(0).shape), jax.random.PRNGKey(0).dtype)
        self.expert_mask = jnp.zeros((max(1, sum(model.config.moe_layers)), model.config.n_experts), bool)
        self._programs: dict[tuple, object] = {}
        self._lock = threading.Lock()
        self.compiles = 0  # programs compiled so far (a test checks that traffic compiles nothing new)

        def decode(params, tokens, n_active, cache, seen, settings, keys, expert_mask):
            size = tokens.shape[0]
            rows = lambda tree: tree_map(lambda x: x[:size], tree)  # noqa: E731  the bucket's rows
            part = rows(cache)
            logits, new, _ = model.apply(params, tokens[:, None], part, expert_mask)
            active = jnp.arange(size) < n_active  # the padding rows of a bucket keep their position
            new = new._replace(pos=jnp.where(active, new.pos, part.pos))
            row_seen = update_seen(seen[:size], tokens)
            split = jax.vmap(jax.random.split)(keys[:size])                  # [size, 2, key]
            next_tokens = sample_rows(logits[:, -1], split[:, 1], rows(settings), row_seen)
            cache = tree_map(lambda full, rows_: full.at[:size].set(rows_), cache, new)
            return next_tokens, cache, seen.at[:size].set(row_seen), keys.at[:size].set(split[:, 0])

        def put(cache, seen, settings, keys, row, staged, staged_seen, row_settings, key):
            cache = Cache(tree_map(lambda full, one: full.at[row].set(one[0]), cache.layers, staged.layers),
                          cache.pos.at[row].set(staged.pos))
            settings = {name: settings[name].at[row].set(row_settings[name]) for name in settings}
            return cache, seen.at[row].set(staged_seen[0]), settings, keys.at[row].set(key)

        def move(cache, seen, settings, keys, src, dst):
            copy = lambda x: x.at[dst].set(x[src])  # noqa: E731
            return tree_map(copy, cache), copy(seen), tree_map(copy, settings), copy(keys)

        def take(cache, row):  # one row as a batch-1 cache (a copy), for the prefix cache
            return Cache(tree_map(lambda x: x[row][None], cache.layers), cache.pos[row])

        self._jitted = {"decode": jax.jit(decode, donate_argnums=(3, 4, 6)),
                        "put": jax.jit(put, donate_argnums=(0, 1, 2, 3)),
                        "move": jax.jit(move, donate_argnums=(0, 1, 2, 3)),
                        "take": jax.jit(take)}

    def _run(self, name: str, size: int, *args):
        """A step's program for `size` rows, compiled on first use (`compiles` counts them)."""
        with self._lock:
            if (name, size) not in self._programs:
                self._programs[(name, size)] = self._jitted[name].lower(*args).compile()
                self.compiles += 1
        return self._programs[(name, size)](*args)

    def step(self, tokens: list[int]) -> np.ndarray:
        """Feed each active row (0..len(tokens)-1) its token at its own position; returns the next
        token of each, sampled with the row's settings."""
        n = len(tokens)
        size = bucket(n, self.max_batch)
        ids = np.zeros(size, np.int32)
        ids[:n] = tokens
        next_tokens, self.cache, self.seen, self.keys = self._run(
            "decode", size, self.model.params, jnp.asarray(ids), jnp.int32(n), self.cache, self.seen,
            self.settings, self.keys, self.expert_mask)
        return np.asarray(next_tokens)[:n]

    def put(self, row: int, staged: Cache, staged_seen: jax.Array, params: SamplingParams, key: jax.Array) -> None:
        """Copy a prefilled batch-1 cache (and its seen tokens) into `row`, with the request's sampling
        settings and the PRNG key its next draw splits."""
        self.cache, self.seen, self.settings, self.keys = self._run(
            "put", 1, self.cache, self.seen, self.settings, self.keys, jnp.int32(row), staged, staged_seen,
            sampler_state(params), key)

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s sequence moves to row `dst` (filling a retired row, so the active rows stay 0..n-1)."""
        self.cache, self.seen, self.settings, self.keys = self._run(
            "move", 1, self.cache, self.seen, self.settings, self.keys, jnp.int32(src), jnp.int32(dst))

    def take(self, row: int) -> Cache:
        """A copy of `row` as a batch-1 cache with a scalar `pos`."""
        return self._run("take", 1, self.cache, jnp.int32(row))
