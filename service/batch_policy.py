"""Which queued items run together: the batcher's (service/batcher.py) batch-composition policy, as pure
functions of the queue. The batcher owns the queue state and calls these; kept apart so that each stays
small enough to read whole.

  * `select_batch`: a plain batch (padding budget and efficiency floor, see the batcher's docstring).

Prefix sharing across requests (issue 21): RLHF trainers send one request per sample, and a GRPO group's n
samples start with the same prompt:

  * `share_key`: an item may share when it is not truncated and longer than the minimum (service/encoding
    `shareable`); its key is its first `min_tokens` ids, compared as a tuple, so a match is on the ids;
  * `select_group`: the oldest item (the seed: nothing starves) and queued items with its key, most shared
    tokens first, while the common prefix stays within 90 % of the best partner's (groups that only share a
    system prompt are not merged into a run that shares just that, where each item's own prompt would be
    computed per row; samples of one group whose responses happen to start alike still join), up to
    `max_items`, and while the tokens computed (the prefix once plus every item's rest) stay within
    `max_tokens`. The common prefix stops before each item's reward token (encoding.group_prefix);
  * a seed without partners still runs on the shared path, alone, when the prefix cache holds its start or
    when it would run alone anyway, so that its prompt is kept for its group's later samples
    (`Batcher._select_group`); `leave_for_groups` tells a plain batch which items to leave for a group.
"""

from __future__ import annotations

from typing import Sequence

from service.encoding import Encoded, SharedPrefix, group_prefix, shareable

PARTNER_SHARE = 0.9  # a partner joins while the common prefix is at least this share of the best partner's


def select_batch(queue: Sequence, max_items: int, max_tokens: int, floor: float, leave=None) -> tuple[list, bool]:
    """Oldest item first, then others that keep longest × n within `max_tokens` and real/padded tokens at or
    above the efficiency `floor`: with a floor, the oldest such items (the floor already keeps lengths similar,
    and age order stops young items from overtaking old ones, which is what made p99 grow); without one, the
    nearest in length. `leave`: a predicate of items to leave for shared-prefix groups (leave_for_groups).
    Returns (batch, full). Queue items have `encoded` and `n_tokens`."""
    seed = queue[0]
    if isinstance(seed.encoded, SharedPrefix):
        return [seed], True
    batch, width, real = [seed], seed.n_tokens, seed.n_tokens
    # the queue is in arrival order; sorted() is stable, so among equally near items the older one wins
    candidates = queue[1:] if floor > 0 else sorted(queue[1:], key=lambda it: abs(it.n_tokens - seed.n_tokens))
    for item in candidates:
        if len(batch) == max_items:
            break
        if isinstance(item.encoded, SharedPrefix) or (leave is not None and leave(item)):
            continue
        new_width = max(width, item.n_tokens)
        padded = new_width * (len(batch) + 1)
        if padded > max_tokens or real + item.n_tokens < floor * padded - 1e-9:
            continue  # a shorter (or nearer-sized) one further down the list may still fit
        batch.append(item)
        width = new_width
        real += item.n_tokens
    return batch, len(batch) == max_items or len(batch) < len(queue)


def share_key(encoded: Encoded | SharedPrefix, min_tokens: int) -> tuple[int, ...] | None:
    """The first min_tokens ids of an item that may share them across requests, else None."""
    if not isinstance(encoded, Encoded) or not shareable(encoded, min_tokens):
        return None
    return tuple(encoded.ids[:min_tokens])


def select_group(queue: Sequence, min_tokens: int, pad_token_id: int, max_items: int,
                 max_tokens: int) -> tuple[list, int] | None:
    """The seed (queue[0]) and its partners, with their common prefix; None when the seed cannot share.
    Queue items have `encoded`, `n_tokens` and `share_key`."""
    seed = queue[0]
    if seed.share_key is None:
        return None
    prefix = group_prefix([seed.encoded], pad_token_id)
    if prefix < min_tokens:
        return None
    partners = sorted(((group_prefix([seed.encoded, item.encoded], pad_token_id), item) for item in queue[1:]
                       if item.share_key == seed.share_key), key=lambda pair: -pair[0])  # stable: age order
    group = [seed]
    for common, item in partners:
        if len(group) == max_items or common < max(min_tokens, PARTNER_SHARE * partners[0][0]):
            break
        common = min(prefix, common)
        if common + sum(it.n_tokens - common for it in group) + item.n_tokens - common > max_tokens:
            continue
        group.append(item)
        prefix = common
    return group, prefix


def leave_for_groups(queue: Sequence, cache):
    """For a plain batch: a predicate that is true of the items to leave out, those that will run shared (they
    have queued partners, or the prefix cache holds their start). None: prefix sharing is off."""
    if cache is None:
        return None
    seen, grouped = set(), set()
    for item in queue:
        if item.share_key is not None:
            (grouped if item.share_key in seen else seen).add(item.share_key)
    return lambda item: item.share_key is not None and (item.share_key in grouped or cache.covers(item.encoded.ids))
