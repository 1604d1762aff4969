"""Tests that run only in the verl environment (`.ci/run` creates `.venv-verl`: torch CPU, verl, `gmpo[verl]`).

`import verl` is unconditional: without verl these tests fail at collection instead of being skipped.
"""

import pytest
import verl  # noqa: F401  (a missing verl must fail the run)
from verl.workers.config import ActorConfig

from gmpo.verl import GMPOPolicyLossConfig


@pytest.fixture
def actor_config():
    """verl's actor config for loss_mode=gmpo, as verl's driver builds it from Hydra (paper bounds, verl's delta)."""

    def build(eps_low=0.4, eps_high=0.4, delta=3.0, loss_agg_mode="seq-mean-token-mean", **variant):
        return ActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_micro_batch_size_per_gpu=1,
            clip_ratio_low=eps_low,
            clip_ratio_high=eps_high,
            clip_ratio_c=delta,
            loss_agg_mode=loss_agg_mode,
            policy_loss=GMPOPolicyLossConfig(loss_mode="gmpo", **variant),
        )

    return build
