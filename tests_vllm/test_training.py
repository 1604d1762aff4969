"""GMPOTrainer trains with a real vLLM sampler in colocate mode, with each of TRL's importance-sampling modes."""

import math

import pytest
import torch

from .conftest import vllm_trainer

IS_METRICS = ["sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
              "sampling/importance_sampling_ratio/max", "sampling/sampling_logp_difference/mean",
              "sampling/weights_logp_difference"]


@pytest.mark.parametrize("mode, clip", [
    ("token_truncate", dict(vllm_importance_sampling_clip_max=3.0)),
    ("token_mask", dict(vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0)),
    ("sequence_truncate", dict(vllm_importance_sampling_clip_max=2.0)),
    ("sequence_mask", dict(vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0)),
])
def test_trains_with_the_vllm_sampler(tmp_path, mode, clip):
    trainer = vllm_trainer(tmp_path, vllm_importance_sampling_mode=mode, **clip)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    rollouts = [log for log in trainer.state.log_history if "reward" in log]
    assert len(rollouts) == 2  # 4 steps, a rollout every 2
    for log in rollouts:
        assert all(math.isfinite(log[name]) for name in IS_METRICS), log
        # A synced bfloat16 sampler against the float32 trainer: ratios near 1 (loose: kernels differ by CPU).
        assert 0.8 < log["sampling/importance_sampling_ratio/mean"] < 1.25, log
        assert log["sampling/sampling_logp_difference/mean"] < 0.1, log
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 4 and all(math.isfinite(log["loss"]) for log in steps)
