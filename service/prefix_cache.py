"""Prefix cache: the keys/values of recently computed prompts, kept across batches (issue 21).

Why: the n samples of one GRPO group start with the same prompt, but they finish generating at different
times, so they reach the server one request each, in different batches. Under causal attention the keys and
values of token t depend only on tokens 0..t, so the stored keys/values of any computed sequence, cut to
its first L tokens, are exactly those of that L-token prefix: an entry need not know where "the prompt"
ends, and a later item that shares its first L ids runs only its own tokens on top.

What this module is: a token tree (a radix tree, as SGLang's RadixAttention) of the prefixes computed
recently. Each node holds a run of token ids and the state of exactly those tokens (TransformersRuntime:
one (keys, values) pair per layer, for the node's positions); a path from a root spells a prefix, and its
nodes' states, joined, are the prefix's keys/values. So a group's prompt is held once and each sample's own
tail once beside it, and groups that share a system prompt share that node without evicting each other's
prompts. The state is never looked into here (the runtime gives `slice_state` to split a node), so this
module imports no torch.

Roots are found by a hash of (model, salt, the first `min_tokens` ids), and every match is confirmed on the
ids themselves, node by node: a hash collision can never hand out another prefix's state.

Policy:
  * `lookup(ids, limit)`: the longest stored prefix L ≥ min_tokens of `ids` (capped at `limit`, the caller's
    safe prefix: before each row's reward token) and the node states that make it up (`Hit.segments`);
  * `store(ids, state, nbytes, start)`: `state` holds the tokens ids[start:] computed on top of a hit of
    `start` tokens (0: a miss); the node where they diverge is split there;
  * bounded by `budget_tokens` (tokens of all nodes); the least recently used leaves go first (a lookup
    touches its whole path); a run longer than the whole budget is simply not cached; budget 0 stores
    nothing (sharing inside one batch still works and is still counted here);
  * the cache belongs to one loaded model: the model key (sha256 of the bundle's manifest) is part of every
    hash and the engine builds a new cache with each runtime, so a model change never serves a stale prefix.

Used from the model thread (the batcher runs one model run at a time, and its `covers` question comes from
the event loop only while no run is in flight), so it needs no lock.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from service.metrics import Metrics


@dataclass(eq=False)
class _Node:
    ids: tuple[int, ...]
    state: Any  # the runtime's keys/values of exactly these ids (at their positions in the prefix)
    nbytes: int
    parent: "_Node | None" = None
    key: bytes = b""  # roots: their bucket
    children: dict[int, "_Node"] = field(default_factory=dict)  # by first id


@dataclass(frozen=True)
class Hit:
    length: int  # L: tokens of the asked ids whose state is stored
    segments: tuple[tuple[Any, int], ...]  # (node state, tokens of it used), root first: joined, the L tokens
    nodes: tuple[_Node, ...] = ()


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of equal leading ids of a and b."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n], dtype=np.int64), np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


def _slice(state, start: int, end: int):
    return state[start:end]


class PrefixCache:
    def __init__(self, budget_tokens: int, min_tokens: int, model: bytes = b"", metrics: Metrics | None = None,
                 slice_state: Callable[[Any, int, int], Any] = _slice):
        """`slice_state(state, start, end)`: the state of a node's tokens start..end, an independent copy
        (the runtime clones the tensors, so that evicting one half frees its memory); default: a sequence
        slice (tests store lists)."""
        if min_tokens < 1:
            raise ValueError("min_tokens must be at least 1 (prefix sharing on)")
        self.budget_tokens = budget_tokens
        self.min_tokens = min_tokens
        self.model = model
        self.metrics = metrics
        self.slice_state = slice_state
        self._roots: dict[bytes, list[_Node]] = {}
        self._lru: OrderedDict[int, _Node] = OrderedDict()  # id(node) → node, least recently used first
        self.tokens = 0
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        """Nodes held."""
        return len(self._lru)

    def key(self, ids: Sequence[int], salt: bytes = b"") -> bytes:
        """Hash of (model, salt, first min_tokens ids); a hint only, every match is confirmed on the ids."""
        digest = hashlib.blake2b(self.model, digest_size=16)
        digest.update(len(salt).to_bytes(4, "little") + salt)
        digest.update(np.asarray(ids[: self.min_tokens], dtype=np.int64).tobytes())
        return digest.digest()

    def _walk(self, ids: Sequence[int], salt: bytes) -> tuple[list[_Node], int, int]:
        """The path matching `ids` from the best root: (nodes, matched tokens, tokens of the last node used)."""
        best, best_n = None, 0
        for root in self._roots.get(self.key(ids, salt), ()):
            n = common_length(root.ids, ids)  # confirmed on the ids, never on the hash alone
            if n > best_n:
                best, best_n = root, n
        if best is None or best_n < self.min_tokens:
            return [], 0, 0
        path, matched, used = [best], best_n, best_n
        node = best
        while used == len(node.ids) and matched < len(ids):
            child = node.children.get(int(ids[matched]))
            if child is None:
                break
            used = common_length(child.ids, ids[matched:])
            path.append(child)
            matched += used
            node = child
        return path, matched, used

    def lookup(self, ids: Sequence[int], limit: int | None = None, salt: bytes = b"") -> Hit | None:
        """The longest stored prefix of `ids` (at least min_tokens, at most `limit` tokens), or None. Counts
        a hit or a miss (only when the cache can hold anything) and touches the path (LRU)."""
        limit = len(ids) if limit is None else min(limit, len(ids))
        path, matched, used = self._walk(ids[:limit], salt) if limit >= self.min_tokens else ([], 0, 0)
        if self.budget_tokens > 0:
            if path:
                self.hits += 1
            else:
                self.misses += 1
            if self.metrics is not None:
                (self.metrics.prefix_cache_hits if path else self.metrics.prefix_cache_misses).inc()
        if not path:
            return None
        for node in path:
            self._lru.move_to_end(id(node))
        segments = tuple((n.state, len(n.ids)) for n in path[:-1]) + ((path[-1].state, used),)
        return Hit(matched, segments, tuple(path))

    def covers(self, ids: Sequence[int], salt: bytes = b"") -> bool:
        """Whether at least min_tokens leading ids of `ids` are stored (no counting, no LRU touch): the
        batcher asks this to send an item that has no partner in the queue down the shared path."""
        return len(ids) >= self.min_tokens and bool(self._walk(ids, salt)[0])

    def store(self, ids: Sequence[int], state: Any, nbytes: int, start: int = 0, salt: bytes = b"") -> bool:
        """Keep `state`, the keys/values of ids[start:] computed on top of the stored first `start` tokens
        (0: on nothing); True if stored. Nothing is stored when those first `start` tokens are no longer
        exactly what the cache holds, or when the tokens are more than the whole budget."""
        ids = tuple(int(t) for t in ids)
        if len(ids) <= start or len(ids) < self.min_tokens or len(ids) - start > self.budget_tokens:
            return False
        path, matched, used = self._walk(ids, salt)
        if matched != start:  # (start 0: nothing of it held, the miss it was computed after)
            return False
        if not path:
            node = _Node(ids, state, int(nbytes), key=self.key(ids, salt))
            self._roots.setdefault(node.key, []).append(node)
        else:
            parent = path[-1]
            if used < len(parent.ids):
                parent = self._split(parent, used)
            node = _Node(ids[start:], state, int(nbytes), parent=parent)
            parent.children[node.ids[0]] = node
        for n in path:
            self._lru.move_to_end(id(n))
        self._lru[id(node)] = node
        self.tokens += len(node.ids)
        self.bytes += node.nbytes
        self._evict()
        self._update()
        return id(node) in self._lru

    def record(self, computed: int, reused: int) -> None:
        """Prefix tokens of one shared run: computed now vs reused (from this cache or from a batch-mate)."""
        if self.metrics is not None:
            self.metrics.prefix_tokens_computed.inc(computed)
            self.metrics.prefix_tokens_reused.inc(reused)
            self.metrics.prompt_reuse_tokens.inc(reused)

    def clear(self) -> None:
        self._roots.clear()
        self._lru.clear()
        self.tokens = self.bytes = 0
        self._update()

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node` after `at` of its tokens: it keeps the head (same place in the tree), a new child the
        tail with the old children. Returns the head."""
        n = len(node.ids)
        head_bytes = node.nbytes * at // n
        tail = _Node(node.ids[at:], self.slice_state(node.state, at, n), node.nbytes - head_bytes, parent=node,
                     children=node.children)
        for child in tail.children.values():
            child.parent = tail
        node.ids, node.state, node.nbytes = node.ids[:at], self.slice_state(node.state, 0, at), head_bytes
        node.children = {tail.ids[0]: tail}
        self._lru[id(tail)] = tail
        return node

    def _evict(self) -> None:
        while self.tokens > self.budget_tokens:
            victim = next(n for n in self._lru.values() if not n.children)  # the least recently used leaf
            self._remove(victim)

    def _remove(self, node: _Node) -> None:
        if node.parent is not None:
            node.parent.children.pop(node.ids[0], None)
        else:
            roots = self._roots.get(node.key, [])
            if node in roots:
                roots.remove(node)
            if not roots:
                self._roots.pop(node.key, None)
        del self._lru[id(node)]
        self.tokens -= len(node.ids)
        self.bytes -= node.nbytes

    def _update(self) -> None:
        if self.metrics is not None:
            self.metrics.prefix_cache_bytes.set(self.bytes)
            self.metrics.prefix_cache_tokens.set(self.tokens)
