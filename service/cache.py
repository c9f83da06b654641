"""Score cache: best-of-N and repeated rollouts send the same (prompt, response) again and again.

Keyed by what the model really computes on, a hash of (model identity, token ids, token type ids), so
two texts that tokenize identically (after truncation) share an entry and nothing textual can alias.
The model identity is the sha256 of the bundle's manifest, which itself holds the sha256 of every
bundle file: a different model, tokenizer or text format can never hit an old entry.

Bounded LRU by entry count (`cache_size`; 0 disables the cache). Identical items inside one request
are always scored once, cache or not. Used on the event loop only, so it needs no lock.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Awaitable, Callable, Sequence

import numpy as np

from service.encoding import Encoded
from service.metrics import Metrics


def model_key(manifest_json: str) -> bytes:
    return hashlib.sha256(manifest_json.encode("utf-8")).digest()


class ScoreCache:
    def __init__(self, size: int, model: bytes = b"", metrics: Metrics | None = None):
        self.size = size
        self.model = model
        self.metrics = metrics
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, item: Encoded) -> bytes:
        digest = hashlib.blake2b(self.model, digest_size=16)
        digest.update(np.asarray(item.ids, dtype=np.int64).tobytes())
        digest.update(b"|")
        digest.update(np.asarray(item.type_ids, dtype=np.int64).tobytes())
        return digest.digest()

    def get(self, key: bytes) -> float | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: float) -> None:
        if self.size <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    async def score(self, items: Sequence[Encoded],
                    run: Callable[[list[Encoded]], Awaitable[np.ndarray]]) -> np.ndarray:
        """Raw scores for `items` (input order): cached ones from memory, each distinct remaining item
        computed once by `run` (which gets the distinct misses, in first-seen order)."""
        values = np.zeros(len(items), dtype=np.float32)
        todo: list[Encoded] = []
        todo_keys: list[bytes] = []
        slot_of: dict[bytes, int] = {}
        waiting: list[tuple[int, int]] = []  # (item index, index into todo)
        hits = 0
        for i, item in enumerate(items):
            key = self.key(item)
            cached = self.get(key)
            if cached is not None:
                values[i] = cached
                hits += 1
                continue
            slot = slot_of.get(key)
            if slot is None:
                slot = slot_of[key] = len(todo)
                todo.append(item)
                todo_keys.append(key)
            else:
                hits += 1  # the same tokens twice in one request: computed once
            waiting.append((i, slot))
        computed = await run(todo)
        for key, value in zip(todo_keys, computed):
            self.put(key, float(value))
        for i, slot in waiting:
            values[i] = computed[slot]
        if self.metrics is not None:
            self.metrics.cache_hits.inc(hits)
            self.metrics.cache_misses.inc(len(todo))
            self.metrics.cache_entries.set(len(self._entries))
        return values
