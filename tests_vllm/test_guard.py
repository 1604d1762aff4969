"""The stale-sampler guard: it fires on a sync that does nothing, and stays quiet where vLLM's sampling log-probs
differ from the trainer's by construction (renormalised sampling, a structured-outputs grammar)."""

import logging

import pytest

from gmpo.trl.sampler_guard import StaleSamplerError

from .conftest import vllm_trainer

METRIC = "sampling/weights_logp_difference"


def logged(trainer, name):
    return [log[name] for log in trainer.state.log_history if name in log]


def test_a_sync_that_does_nothing_stops_the_run(tmp_path):
    trainer = vllm_trainer(tmp_path, max_steps=8)
    trainer.vllm_generation.sync_weights = lambda: None  # vLLM keeps the initial weights
    with pytest.raises(StaleSamplerError, match=r"at step 2: .*above stale_sampler_threshold=0.1.*'stop'"):
        trainer.train()
    assert trainer.state.global_step == 2  # the first rollout after an optimizer step


def test_warn_trains_on_and_logs_the_difference(tmp_path, caplog):
    trainer = vllm_trainer(tmp_path, max_steps=4, stale_sampler_policy="warn")
    trainer.vllm_generation.sync_weights = lambda: None
    with caplog.at_level(logging.WARNING, logger="gmpo.trl.sampler_guard"):
        trainer.train()
    assert trainer.state.global_step == 4
    first, *later = logged(trainer, METRIC)
    assert first < 0.1 < min(later), (first, later)  # same weights at step 0, stale after
    assert sum("does not sample from the trainer's weights" in r.getMessage() for r in caplog.records) == len(later)


@pytest.mark.parametrize("settings", [
    dict(top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    dict(vllm_structured_outputs_regex="[0-9]{2,3}"),
], ids=["renormalised", "grammar"])
def test_quiet_where_sampling_logprobs_differ_by_construction(tmp_path, settings):
    trainer = vllm_trainer(tmp_path, max_steps=6, **settings)  # stale_sampler_policy='stop'
    trainer.train()
    weights, sampling = logged(trainer, METRIC), logged(trainer, "sampling/sampling_logp_difference/mean")
    assert len(weights) == 3 and max(weights) < 0.1
    # TRL's own difference compares the sampling distribution with the trainer's: far larger, whatever the weights.
    assert max(sampling) > 2 * max(weights), (sampling, weights)
