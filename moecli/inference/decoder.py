"""Autoregressive decoding: prefill the prompt into the KV cache, then one token per step.

Everything runs in two jitted functions with static shapes, so nothing recompiles while you chat:
- `prefill` takes a chunk of new tokens padded up to a length bucket (powers of two), writes their
  keys/values at cache.pos and advances cache.pos by the real (unpadded) count. Padding sits after
  the real tokens, so causal masking keeps it from affecting them, and the next write overwrites it.
- `decode` feeds one token, samples the next on the device (`moecli.inference.sampling`) and returns only
  the token id to the host — never the [vocab] logits.
Both donate the cache, so XLA updates it in place.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from moecli.inference.engine import Model
from moecli.errors import UsageError
from moecli.model.transformer import Cache
from moecli.inference.sampling import SamplingParams, reply_key, sample, sampler_state, update_seen

MIN_BUCKET = 16
MAX_SNAPSHOTS = 4  # recurrent states kept for `Decoder.rewind` (a chat needs the last turn's)


def routing_of(routing):
    """The parts of a Routing worth bringing to the host: (experts, weights), or None (no MoE)."""
    return None if routing is None else (routing.experts, routing.weights)


def bucket(n: int, limit: int) -> int:
    """The padded length for a chunk of n tokens: the next power of two >= n (at least 16),
    capped at `limit` (the room left in the cache)."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), limit)


class Decoder:
    """A KV cache of fixed length plus the compiled prefill/decode steps for one model.

    The cache survives between calls, so a chat only prefills each new turn's tokens."""

    def __init__(self, model: Model, max_len: int, batch: int = 1):
        self.model, self.max_len, self.batch = model, max_len, batch
        self.cache: Cache = model.init_cache(batch, max_len)
        self.seen = jnp.zeros((batch, model.config.vocab_size), bool)
        self.pos = 0  # host copy of cache.pos, so the loop never waits on the device to read it
        self.ids: list[int] = []  # the tokens the cache holds, positions 0..pos-1
        # Expert ablation: True switches an expert off. An input array, so toggling never recompiles.
        self.expert_mask = jnp.zeros((max(1, sum(model.config.moe_layers)), model.config.n_experts), bool)
        # With capture_routing on, routing[i] = (experts, weights) [n_moe_layers, top_k] of ids[i].
        self.capture_routing, self.routing = False, []
        # Layers whose cache cannot be rewound (recurrent states): copies of them at the end of each prefill,
        # (pos, per layer the copy or None), so `rewind` can go back to a turn's prompt (`rewind`).
        self.keep = tuple(not r for r in self.cache.rewindable())
        self.snapshots: list[tuple[int, tuple]] = []

        def prefill(params, ids, n_real, cache, seen, expert_mask):
            logits, cache, routing = model.apply(params, ids, cache, expert_mask, n_real - 1)
            cache = cache._replace(pos=cache.pos - ids.shape[1] + n_real)
            last = logits[:, 0]                                                # [batch, vocab]
            mask = jnp.arange(ids.shape[1]) < n_real
            seen = update_seen(seen, jnp.where(mask, ids, -1))  # padding (-1) is ignored
            return last, cache, seen, routing_of(routing)

        def decode(params, token, cache, seen, expert_mask, settings, key):
            logits, cache, routing = model.apply(params, token[:, None], cache, expert_mask)
            seen = update_seen(seen, token[:, None])
            key, sub = jax.random.split(key)  # here, not in the loop: one dispatch a token, not two
            return sample(logits[:, -1], sub, settings, seen), cache, seen, routing_of(routing), key

        self._jitted = {"prefill": jax.jit(prefill, donate_argnums=(3, 4)),
                        "decode": jax.jit(decode, donate_argnums=(2, 3)), "sample": jax.jit(sample)}
        self._compiled: dict[tuple, object] = {}
        self._compiling = threading.Lock()  # `precompile` may run in another thread
        self.compile_s = 0.0  # seconds spent compiling (or fetching from the persistent cache)

    def _program(self, name: str, size: int, *args):
        """The compiled program of a step for one chunk size, compiled ahead of time on first use so
        compile time is measured apart from run time. Sizes are few: the prompt-length buckets, and
        1 for decode."""
        key = (name, size)
        with self._compiling:
            if key not in self._compiled:
                start = time.perf_counter()
                self._compiled[key] = self._jitted[name].lower(*args).compile()
                self.compile_s += time.perf_counter() - start
        return self._compiled[key]

    def _run(self, name: str, size: int, *args):
        return self._program(name, size, *args)(*args)

    def compiled(self, name: str, size: int = 1) -> bool:
        return (name, size) in self._compiled

    def precompile(self, prompt_sizes: tuple[int, ...] = (MIN_BUCKET,)) -> None:
        """Compile the decode step and the prefill for chunks of `prompt_sizes` tokens without running
        them (lowering reads only the arguments' shapes, so the cache is untouched). `moe chat` runs
        this in a background thread while the user types the first message; with JAX's persistent
        compilation cache a later launch finds the programs on disk."""
        settings = sampler_state(SamplingParams())
        key = jax.random.PRNGKey(0)
        token = jnp.zeros((self.batch,), jnp.int32)
        self._program("decode", 1, self.model.params, token, self.cache, self.seen, self.expert_mask, settings, key)
        logits = jnp.zeros((self.batch, self.model.config.vocab_size), jnp.float32)
        self._program("sample", 1, logits, key, settings, self.seen)
        for n in prompt_sizes:
            size = bucket(n, self.max_len)
            ids = jnp.zeros((self.batch, size), jnp.int32)
            self._program("prefill", size, self.model.params, ids, jnp.int32(n), self.cache, self.seen,
                          self.expert_mask)

    def _record(self, routing, n: int) -> None:
        """Keep the routing of the n tokens just fed (batch row 0), when capture is on."""
        if self.capture_routing and routing is not None:
            experts, weights = (np.asarray(a)[:, 0, :n] for a in routing)     # [layers, n, k]
            self.routing.extend(zip(experts.transpose(1, 0, 2), weights.transpose(1, 0, 2)))

    def set_expert_mask(self, disabled: dict[int, set[int]]) -> None:
        """Switch off experts: {moe_layer_index: {expert, ...}}; an empty dict restores all."""
        c = self.model.config
        mask = np.zeros(self.expert_mask.shape, bool)
        for layer, experts in disabled.items():
            mask[layer, list(experts)] = True
            if c.n_experts - len(experts) < c.top_k:
                raise UsageError(f"layer {layer} would keep {c.n_experts - len(experts)} experts, fewer than "
                                 f"top_k={c.top_k}", "switch fewer experts off")
        self.expert_mask = jnp.asarray(mask)

    def reset(self) -> None:
        self.cache = self.model.init_cache(self.batch, self.max_len)
        self.seen = jnp.zeros_like(self.seen)
        self.pos, self.ids, self.routing, self.snapshots = 0, [], [], []

    def rewind(self, pos: int) -> None:
        """Forget everything after position `pos` (the stale entries are masked, then overwritten).
        A recurrent state cannot forget (`Cache.rewindable`): it goes back to the latest snapshot at or
        before `pos` (each prefill's end: in a chat, the previous turn's prompt) or to the start, and the
        tokens from there to `pos` are fed again — the same cache as if never gone past `pos`."""
        if pos >= self.pos or not any(self.keep):
            return self.keep_only(pos)
        replay = self.ids[:pos]
        self.snapshots = [snap for snap in self.snapshots if snap[0] <= pos]
        if not self.snapshots:
            self.reset()
        else:  # copies again: the next step donates (consumes) the cache it is given
            at, saved = self.snapshots[-1]
            layers = tuple(layer if copy is None else jax.tree_util.tree_map(jnp.copy, copy)
                           for layer, copy in zip(self.cache.layers, saved))
            self.cache = Cache(layers, self.cache.pos)
            self.keep_only(at)
        if replay[self.pos:]:
            self.feed(replay[self.pos:])

    def keep_only(self, pos: int) -> None:
        """Positions 0..pos-1 kept (the rewindable layers forget the rest), for `rewind`."""
        self.cache = self.cache._replace(pos=jnp.asarray(pos, jnp.int32))
        self.pos, self.ids, self.routing = pos, self.ids[:pos], self.routing[:pos]
        self.seen = jnp.zeros_like(self.seen).at[:, jnp.asarray(self.ids, jnp.int32)].set(bool(self.ids))

    def feed(self, ids: list[int]) -> jax.Array:
        """Prefill `ids` after what the cache holds; returns the logits predicting the next token."""
        if not ids:
            raise UsageError("nothing to prefill", "give a non-empty prompt")
        room = self.max_len - self.pos
        if len(ids) > room:
            raise UsageError(f"{len(ids)} tokens do not fit the {room} left in the context window",
                             "shorten the prompt, lower --max-tokens, or start a new conversation")
        size = bucket(len(ids), room)
        padded = np.zeros((self.batch, size), np.int32)
        padded[:, :len(ids)] = ids
        logits, self.cache, self.seen, routing = self._run(
            "prefill", size, self.model.params, jnp.asarray(padded), jnp.int32(len(ids)), self.cache,
            self.seen, self.expert_mask)
        self.pos += len(ids)
        self.ids.extend(ids)
        self._record(routing, len(ids))
        if any(self.keep):  # a recurrent state: copied here, so a later turn can come back (`rewind`)
            self.snapshots = self.snapshots[-(MAX_SNAPSHOTS - 1):] + [(self.pos, tuple(
                jax.tree_util.tree_map(jnp.copy, layer) if keep else None
                for layer, keep in zip(self.cache.layers, self.keep)))]
        return logits

    def tokens(self, prompt: list[int], params: SamplingParams, max_new_tokens: int | None = None,
               stop_ids: tuple[int, ...] = (), reply: int = 0):
        """Yield up to max_new_tokens (default: params.max_tokens) sampled token ids after `prompt`,
        stopping after a stop id. `reply` numbers the replies of a conversation: it is folded into
        the seed's key (`reply_key`), so each reply draws fresh randomness yet replays exactly.

        Each step dispatches the next decode before reading the current token on the host (JAX runs
        asynchronously, so the round trip is hidden), and every token yielded is already in the
        cache: a chat can continue from wherever the consumer stopped reading. One exception keeps
        the first token quick: while the decode step is not compiled yet, the first token is shown
        before compiling it, and enters the cache when the consumer asks for the next one
        (`ids` and `pos` always say what the cache holds)."""
        if max_new_tokens is not None:
            params = dataclasses.replace(params, max_tokens=max_new_tokens)
        params.validate()
        max_new_tokens = params.max_tokens
        settings = sampler_state(params)
        key = reply_key(params.seeded().seed, reply)
        logits = self.feed(prompt)
        key, sub = jax.random.split(key)
        token = self._run("sample", 1, logits, sub, settings, self.seen)
        for i in range(max_new_tokens):
            full = self.pos >= self.max_len
            shown = i == 0 and not full and not self.compiled("decode")
            if shown:  # tracing and compiling the decode step takes ~0.5 s: show the token first
                yield int(token[0])
            if not full:
                next_token, self.cache, self.seen, routing, key = self._run(
                    "decode", 1, self.model.params, token, self.cache, self.seen, self.expert_mask, settings, key)
                self.pos += 1
            tid = int(token[0])
            if not full:
                self.ids.append(tid)
                self._record(routing, 1)
            if not shown:
                yield tid
            if tid in stop_ids or full:
                return
            token = next_token


def generate_tokens(model: Model, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: float = 1.0, seed: int | None = 0,
                    stop_ids: tuple[int, ...] = ()) -> list[int]:
    """KV-cached generation for one prompt; returns the new token ids (greedy at temperature 0;
    the same seed gives the same ids, seed=None a random draw)."""
    prompt = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed, max_tokens=max_new_tokens)
    params.validate()
    decoder = Decoder(model, max_len=bucket(len(prompt) + max_new_tokens, 1 << 30))
    return list(decoder.tokens(prompt, params, stop_ids=stop_ids))
