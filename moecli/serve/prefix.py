"""Prefix reuse: recent sequences' caches, so a request that starts the same way skips prefilling that part.

What: requests to a server repeat themselves - the same system prompt, a chat that resends every
earlier turn - and prefilling a prefix again computes exactly the keys and values already computed
for it (causal attention: a position's keys depend only on the tokens before it). Serving engines keep
those caches (vLLM's automatic prefix caching, SGLang's RadixAttention, Zheng et al. 2023); moecli
keeps whole batch-1 caches of recently finished requests in a least-recently-used list within a
byte budget, and a new request starts from the one sharing the longest prefix with its prompt.

Rewindable caches (keys and values, latents) can start from any common prefix: the positions after
it are masked and then overwritten. A recurrent state (`moecli.model.deltanet`) has folded in every
token it saw, so an entry is reused only when its whole sequence is a prefix of the prompt.
"""
from __future__ import annotations

from collections import OrderedDict

import jax

from moecli.inference.conversation import common_prefix
from moecli.model.cache import Cache


def cache_bytes(cache: Cache) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(cache.layers))


class PrefixCache:
    """An LRU of (token ids, the batch-1 cache holding exactly them), at most `budget` bytes in all."""

    def __init__(self, budget: int, rewindable: bool):
        self.budget, self.rewindable = budget, rewindable
        self.entries: OrderedDict[tuple[int, ...], Cache] = OrderedDict()
        self.hits = self.reused_tokens = 0

    @property
    def used(self) -> int:
        return sum(cache_bytes(cache) for cache in self.entries.values())

    def store(self, ids: list[int], cache: Cache) -> None:
        """Keep `cache` (which holds exactly `ids`), evicting the least recently used beyond the budget."""
        if not ids or cache_bytes(cache) > self.budget:
            return
        key = tuple(ids)
        self.entries.pop(key, None)
        self.entries[key] = cache
        while self.used > self.budget:
            self.entries.popitem(last=False)

    def match(self, prompt: list[int]) -> tuple[int, Cache | None]:
        """How many of the prompt's first tokens an entry holds (always fewer than the whole prompt:
        the last token must run to give the next token's logits), and that entry's cache (shared: the
        caller copies it before a step consumes it); (0, None) without a match."""
        best, best_key = 0, None
        for key in self.entries:
            n = common_prefix(list(key), prompt)
            if self.rewindable:
                n = min(n, len(prompt) - 1)
            elif n < len(key) or n >= len(prompt):  # a state holds all of its tokens or is no use
                continue
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self.entries.move_to_end(best_key)
        self.hits, self.reused_tokens = self.hits + 1, self.reused_tokens + best
        return best, self.entries[best_key]
