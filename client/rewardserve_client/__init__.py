"""rewardserve's Python client, installable alone: `pip install ./client` gives this package and httpx,
nothing of the server (docs/dependencies.md says why).

    from rewardserve_client import RewardServeClient, RewardServeReward
    from rewardserve_client.verl import compute_score     # verl's custom_reward_function

Modules: client (the sync and async clients), retry (replicas, group affinity, retries), trl (GRPOTrainer
reward functions), verl (verl's custom reward function). `service.client` is an alias of this package
for one release.
"""

from rewardserve_client.client import AsyncRewardServeClient, RewardServeClient
from rewardserve_client.retry import (AFFINITY_CHARS, DEFAULT_BATCH, Attempt, RewardServeError, affinity_text,
                                      parse_retry_after, replica_index)
from rewardserve_client.trl import AsyncRewardServeReward, RewardServeReward

__version__ = "0.1.0"
__all__ = ["AFFINITY_CHARS", "DEFAULT_BATCH", "AsyncRewardServeClient", "AsyncRewardServeReward", "Attempt",
           "RewardServeClient", "RewardServeError", "RewardServeReward", "affinity_text", "parse_retry_after",
           "replica_index"]
