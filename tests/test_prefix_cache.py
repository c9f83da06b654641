"""Unit tests of the prefix cache (service/prefix_cache.py): longest-prefix lookup confirmed on the ids,
a forced hash collision, LRU eviction under the token budget, a group's prompt held once, metrics.

The cache never looks into what it stores. Here the state of a run of tokens is the list of those token
ids, so the segments of a hit, joined, must spell exactly the ids of the prefix found: a wrong split or a
wrong node shows up as wrong ids (tests/test_prefix_sharing.py runs the cache on a real model)."""

from __future__ import annotations

from service.metrics import Metrics
from service.prefix_cache import PrefixCache, common_length

K = 4
PROMPT_A = list(range(100, 120))  # 20 ids
PROMPT_B = list(range(200, 220))
SYSTEM = list(range(500, 508))  # a system prompt two groups share (longer than K)


class CollidingCache(PrefixCache):
    """Every prefix hashes the same: only the comparison on the ids can tell entries apart."""

    def key(self, ids, salt=b""):
        return b"same"


def joined(hit) -> list[int]:
    return [t for state, used in hit.segments for t in state[:used]]


def put(cache: PrefixCache, ids: list[int], salt: bytes = b"") -> bool:
    """What the runtime does: look up, compute the rest on the hit, store the rest."""
    hit = cache.lookup(ids, salt=salt)
    start = hit.length if hit is not None else 0
    return cache.store(ids, ids[start:], len(ids) - start, start=start, salt=salt)


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_common_length():
    assert common_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_length([1, 2], [1, 2, 3]) == 2
    assert common_length([], [1]) == 0 and common_length([5], [6]) == 0


def test_lookup_returns_the_longest_stored_prefix_capped_and_at_least_the_minimum():
    cache = PrefixCache(1000, K)
    a1 = PROMPT_A + [1, 2, 3]
    assert put(cache, a1)
    hit = cache.lookup(PROMPT_A + [1, 2, 9, 9])
    assert hit.length == len(PROMPT_A) + 2 and joined(hit) == PROMPT_A + [1, 2]
    hit = cache.lookup(PROMPT_A + [1, 2, 9, 9], limit=7)  # the caller's safe prefix caps it
    assert hit.length == 7 and joined(hit) == PROMPT_A[:7]
    assert cache.lookup(PROMPT_A[:K - 1] + [0] * 30) is None  # fewer than K ids in common
    assert cache.lookup(PROMPT_A[:K]) is not None and cache.lookup(PROMPT_A[:K], limit=K - 1) is None
    assert cache.lookup(PROMPT_B) is None


def test_a_forced_hash_collision_never_returns_another_prefixs_state():
    """All prefixes in one bucket: the lookup still returns the prefix whose ids really match, or nothing."""
    cache = CollidingCache(1000, K)
    put(cache, PROMPT_A + [1])
    put(cache, PROMPT_B + [2])
    hit = cache.lookup(PROMPT_B + [7, 7])
    assert hit.length == len(PROMPT_B) and joined(hit) == PROMPT_B
    assert joined(cache.lookup(PROMPT_A + [7, 7])) == PROMPT_A
    assert cache.lookup(list(range(300, 330))) is None  # same hash, other ids: a miss, never A's or B's state
    assert not cache.covers(list(range(300, 330))) and cache.covers(PROMPT_A + [5])
    assert cache.lookup(PROMPT_A[:K - 1] + PROMPT_B) is None  # K-1 ids of A in common: no hit either


def test_a_groups_prompt_is_held_once_and_groups_sharing_a_system_prompt_keep_their_own():
    """Sample 1 of group A stores its whole prefix; sample 2 hits it for the prompt and stores only its own
    tail (the node splits where they diverge). Group B, with the same system prompt, splits the system
    prompt off and keeps A's prompt: later samples of A still find all of it."""
    cache = PrefixCache(1000, K)
    a = SYSTEM + PROMPT_A
    b = SYSTEM + PROMPT_B
    put(cache, a + [1, 2, 3])
    assert cache.tokens == len(a) + 3
    put(cache, a + [4, 5])
    assert cache.tokens == len(a) + 3 + 2  # the prompt once, each sample's own tail once
    put(cache, b + [6])
    assert cache.tokens == len(a) + 3 + 2 + len(PROMPT_B) + 1  # the system prompt once for both groups
    for ids, want in ((a + [9], a), (a + [4, 5, 9], a + [4, 5]), (b + [9], b), (SYSTEM + [0] * 5, SYSTEM)):
        hit = cache.lookup(ids)
        assert hit.length == len(want) and joined(hit) == want
    assert not put(cache, a + [4, 5])  # already held: nothing new to store
    assert cache.tokens == len(a) + 3 + 2 + len(PROMPT_B) + 1


def test_eviction_by_lru_keeps_the_tokens_within_the_budget():
    metrics = Metrics()
    cache = PrefixCache(50, K, metrics=metrics)
    prompts = [list(range(s, s + 20)) for s in (1000, 2000, 3000)]
    put(cache, prompts[0])
    put(cache, prompts[1])
    assert cache.tokens == 40 and cache.bytes == 40
    assert cache.lookup(prompts[0] + [1]) is not None  # p0 is now the most recently used
    put(cache, prompts[2])  # 60 > 50: the least recently used (p1) goes
    assert cache.tokens == 40 <= cache.budget_tokens and len(cache) == 2
    assert cache.lookup(prompts[1] + [1]) is None
    assert joined(cache.lookup(prompts[0] + [1])) == prompts[0] and joined(cache.lookup(prompts[2] + [1])) == prompts[2]
    assert sample(metrics, "rewardserve_prefix_cache_bytes") == 40 == cache.bytes
    assert sample(metrics, "rewardserve_prefix_cache_tokens") == 40
    # lookups: p0 (put), p1 (put, miss), p0, p2 (put, miss), p1 (miss), p0, p2; p0's first put missed too
    assert sample(metrics, "rewardserve_prefix_cache_hits_total") == cache.hits == 3
    assert sample(metrics, "rewardserve_prefix_cache_misses_total") == cache.misses == 4


def test_eviction_takes_leaves_first_and_a_prompt_stays_while_its_samples_come():
    """A group's prompt node outlives its samples' tails: the tails are the leaves, evicted first."""
    cache = PrefixCache(len(PROMPT_A) + 6, K)
    put(cache, PROMPT_A + [1, 2, 3])
    put(cache, PROMPT_A + [4, 5, 6])  # 26 tokens: the budget
    put(cache, PROMPT_A + [7, 8, 9])  # 29 > 26: the oldest leaf ([1, 2, 3]) goes, not the prompt
    assert cache.tokens == len(PROMPT_A) + 6
    assert joined(cache.lookup(PROMPT_A + [1, 2, 3])) == PROMPT_A
    assert joined(cache.lookup(PROMPT_A + [7, 8, 9, 0])) == PROMPT_A + [7, 8, 9]


def test_a_run_larger_than_the_budget_is_not_cached_and_budget_zero_stores_nothing():
    cache = PrefixCache(30, K)
    assert not put(cache, list(range(31))) and len(cache) == 0
    assert put(cache, list(range(30))) and len(cache) == 1
    off = PrefixCache(0, K)
    assert not put(off, PROMPT_A) and off.lookup(PROMPT_A) is None and len(off) == 0
    assert off.hits == off.misses == 0  # a cache that holds nothing counts nothing


def test_a_store_on_a_prefix_the_cache_no_longer_holds_is_refused():
    cache = PrefixCache(100, K)
    put(cache, PROMPT_A)
    assert not cache.store(PROMPT_B + [1], [1], 1, start=len(PROMPT_B))  # B's first tokens are not held
    assert not cache.store(PROMPT_A + [1, 2], [2], 1, start=len(PROMPT_A) + 1)  # nor A's first 21
    assert cache.tokens == len(PROMPT_A)


def test_the_model_and_the_salt_are_part_of_the_key():
    a, b = PrefixCache(100, K, model=b"model-a"), PrefixCache(100, K, model=b"model-b")
    assert a.key(PROMPT_A) != b.key(PROMPT_A)
    assert a.key(PROMPT_A) == a.key(PROMPT_A[:K] + [0])  # only the first K ids are hashed
    put(a, PROMPT_A, salt=b"key-1")
    assert a.lookup(PROMPT_A, salt=b"key-2") is None and a.lookup(PROMPT_A, salt=b"key-1") is not None


def test_record_counts_computed_and_reused_tokens_and_clear_empties():
    metrics = Metrics()
    cache = PrefixCache(100, K, metrics=metrics)
    cache.record(computed=10, reused=30)
    assert sample(metrics, "rewardserve_prefix_tokens_computed_total") == 10
    assert sample(metrics, "rewardserve_prefix_tokens_reused_total") == 30
    assert sample(metrics, "rewardserve_prompt_reuse_tokens_total") == 30
    put(cache, PROMPT_A)
    cache.clear()
    assert len(cache) == 0 and cache.tokens == cache.bytes == 0 and cache.lookup(PROMPT_A) is None
