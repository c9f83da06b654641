"""Deprecated alias of `rewardserve_client.retry` (replicas, group affinity, retries), kept for one release
with service.client; new code imports `rewardserve_client.retry`."""

from __future__ import annotations

from rewardserve_client.retry import (AFFINITY_CHARS, DEFAULT_BATCH, RETRYABLE_OVERLOAD, Attempt,  # noqa: F401
                                      RewardServeError, _Base, _error_of, _Replicas, affinity_text, in_order,
                                      parse_retry_after, reassemble, replica_index)
