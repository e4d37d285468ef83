"""Continuous batching on the device: one cache for up to `max_batch` sequences, each at its own position.

What: "iteration-level scheduling" (Yu et al. 2022, "Orca"): instead of decoding a fixed batch from start
to end, requests join and leave a running batch between decode steps, so the weights each step reads
(at batch 1 a decode step is a stream of them through memory) serve every active sequence at once.

How it is laid out here:
- One `Cache` of `max_batch` rows whose `pos` is int32 [max_batch]: each row writes its keys/values at,
  and its queries attend up to, its own position (`moecli.model.cache.write_at`, the per-row masks of
  `moecli.model.ops.attention_mask`, RoPE at [batch, seq] positions). Every attention kind and every
  family goes through those, recurrent states included (a row's state is its own).
- The active sequences occupy rows 0..n-1 of a state of `bucket(n)` rows (1, 2, 4, ... max_batch): the
  state grows or shrinks (`resize`, a copy) only when n crosses a bucket, so a decode step's shapes -
  and its compiled program - are one of a few whatever requests come and go, and one client alone costs
  a batch-1 step. (Slicing the active rows out of a max_batch-row cache instead made XLA:CPU copy the
  whole cache every step around the kernels' custom calls.) A retired row is filled by moving the last
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
        self.rows = 1  # the state's rows now: bucket(active sequences), at least 1
        cache = model.init_cache(self.rows, context)
        self.cache = cache._replace(pos=jnp.zeros((self.rows,), jnp.int32))
        self.seen = jnp.zeros((self.rows, model.config.vocab_size), bool)
        defaults = sampler_state(SamplingParams())
        self.settings = {name: jnp.zeros((self.rows,), value.dtype) for name, value in defaults.items()}
        self.keys = jnp.zeros((self.rows, *jax.random.PRNGKey(0).shape), jax.random.PRNGKey(0).dtype)
        self.expert_mask = jnp.zeros((max(1, sum(model.config.moe_layers)), model.config.n_experts), bool)
        self._programs: dict[tuple, object] = {}
        self._lock = threading.Lock()

        def decode(params, tokens, n_active, cache, seen, settings, keys, expert_mask):
            logits, new, _ = model.apply(params, tokens[:, None], cache, expert_mask)
            active = jnp.arange(tokens.shape[0]) < n_active  # a bucket's padding rows keep their position
            new = new._replace(pos=jnp.where(active, new.pos, cache.pos))
            seen = update_seen(seen, tokens)
            split = jax.vmap(jax.random.split)(keys)                         # [rows, 2, key]
            return sample_rows(logits[:, -1], split[:, 1], settings, seen), new, seen, split[:, 0]

        def resize(state, rows):  # every array's leading [rows] axis cut or zero-padded to `rows`
            def fit(x):
                if x.shape[0] >= rows:
                    return x[:rows]
                return jnp.concatenate([x, jnp.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
            return tree_map(fit, state)

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
                        "resize": jax.jit(resize, static_argnums=1),  # new shapes: nothing to donate
                        "put": jax.jit(put, donate_argnums=(0, 1, 2, 3)),
                        "move": jax.jit(move, donate_argnums=(0, 1, 2, 3)),
                        "take": jax.jit(take)}

    @property
    def compiles(self) -> int:
        """Programs compiled so far (a test checks that traffic compiles nothing new)."""
        return len(self._programs)

    def _run(self, name: str, key, *args):
        """A step's program for the state's current rows (and `key`), compiled on first use."""
        with self._lock:
            if (name, self.rows, key) not in self._programs:
                self._programs[(name, self.rows, key)] = self._jitted[name].lower(*args).compile()
        return self._programs[(name, self.rows, key)](*args)

    def fit(self, n: int) -> None:
        """Give the state bucket(n) rows, for n active sequences in rows 0..n-1 (a copy when that changes)."""
        target = bucket(max(n, 1), self.max_batch)
        while self.rows != target:  # a bucket at a time: only neighbouring sizes, so few resize programs
            rows = bucket(self.rows + 1 if target > self.rows else self.rows // 2, self.max_batch)
            state = (self.cache, self.seen, self.settings, self.keys)
            with self._lock:
                key = ("resize", self.rows, rows)
                if key not in self._programs:
                    self._programs[key] = self._jitted["resize"].lower(state, rows).compile()
            self.cache, self.seen, self.settings, self.keys = self._programs[key](state)
            self.rows = rows

    def precompile(self) -> None:
        """Compile every program for every bucket by running each once on an empty state (then cleared),
        so no client waits on a compilation later, whatever traffic comes."""
        empty = self.model.init_cache(1, self.context)
        sizes = sorted({bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
        for rows in sizes:
            self.fit(rows)
            self.put(rows - 1, empty, jnp.zeros((1, self.model.config.vocab_size), bool), SamplingParams(),
                     jax.random.PRNGKey(0))
            self.step([0] * rows)
            self.move(rows - 1, 0)
            self.take(0)
        for rows in reversed(sizes):
            self.fit(rows)
        zero = lambda x: jnp.zeros_like(x)  # noqa: E731  nothing of the runs stays
        self.cache, self.seen, self.keys = tree_map(zero, self.cache), zero(self.seen), zero(self.keys)

    def step(self, tokens: list[int]) -> np.ndarray:
        """Feed each active row (0..len(tokens)-1) its token at its own position; returns the next
        token of each, sampled with the row's settings."""
        n = len(tokens)
        self.fit(n)
        ids = np.zeros(self.rows, np.int32)
        ids[:n] = tokens
        next_tokens, self.cache, self.seen, self.keys = self._run(
            "decode", 0, self.model.params, jnp.asarray(ids), jnp.int32(n), self.cache, self.seen,
            self.settings, self.keys, self.expert_mask)
        return np.asarray(next_tokens)[:n]

    def put(self, row: int, staged: Cache, staged_seen: jax.Array, params: SamplingParams, key: jax.Array) -> None:
        """Copy a prefilled batch-1 cache (and its seen tokens) into `row`, with the request's sampling
        settings and the PRNG key its next draw splits."""
        self.fit(row + 1)
        self.cache, self.seen, self.settings, self.keys = self._run(
            "put", 0, self.cache, self.seen, self.settings, self.keys, jnp.int32(row), staged, staged_seen,
            sampler_state(params), key)

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s sequence moves to row `dst` (filling a retired row, so the active rows stay 0..n-1)."""
        self.cache, self.seen, self.settings, self.keys = self._run(
            "move", 0, self.cache, self.seen, self.settings, self.keys, jnp.int32(src), jnp.int32(dst))

    def take(self, row: int) -> Cache:
        """A copy of `row` as a batch-1 cache with a scalar `pos`."""
        return self._run("take", 0, self.cache, jnp.int32(row))
