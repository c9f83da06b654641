"""Deprecated alias of `rewardserve_client` (the client now installs alone: `pip install ./client`), kept for
one release so `from service.client import RewardServeClient` keeps working. New code imports
`rewardserve_client`; this module goes in the next release.

It imports what the client needs first (httpx, then the client package) so that a missing one is an
ImportError that says how to install the client, rather than a bare "No module named ...".
"""

from __future__ import annotations

import warnings

try:
    import httpx  # noqa: F401  (the client's one third-party dependency)

    from rewardserve_client.client import (AsyncRewardServeClient, RewardServeClient, _Api, _as_item,  # noqa: F401
                                           _field, _Request)
    from rewardserve_client.retry import (AFFINITY_CHARS, DEFAULT_BATCH, Attempt, RewardServeError,  # noqa: F401
                                          affinity_text, in_order, parse_retry_after, reassemble, replica_index)
    from rewardserve_client.trl import AsyncRewardServeReward, RewardServeReward, _trl_items  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"service.client is an alias of the rewardserve_client package ({exc}): install the client "
                      "with `pip install ./client` from a rewardserve checkout") from exc

warnings.warn("service.client is deprecated: import rewardserve_client (pip install ./client)", DeprecationWarning,
              stacklevel=2)
