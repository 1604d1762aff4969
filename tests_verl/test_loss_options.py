"""Options, errors, the loss_agg_mode warning and the metrics of verl's `loss_mode=gmpo`."""

import logging
import math
import os

import pytest
import torch
import verl
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils.config import validate_config

import gmpo.verl.loss as verl_loss
from gmpo.verl import GMPOPolicyLossConfig

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
# The smallest overrides under which verl's validate_config accepts its default ppo_trainer config on its own.
BASE_OVERRIDES = [
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.n=4",
    "trainer.n_gpus_per_node=2",
    "actor_rollout_ref.actor.policy_loss.loss_mode=gmpo",
    "actor_rollout_ref.actor.policy_loss._target_=gmpo.verl.GMPOPolicyLossConfig",
]


def call(config, advantages=None, log_ratio=None, mask=None, **kwargs):
    """One micro-batch of 3 rows x 4 tokens through verl's registry."""
    log_ratio = (
        torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.9, 0.1, -0.9, 0.2], [-0.6, 0.5, 0.0, 0.0]])
        if log_ratio is None
        else log_ratio
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool) if mask is None else mask
    if advantages is None:
        advantages = torch.tensor([1.0, -1.0, 0.5]).unsqueeze(-1) * mask
    kwargs.setdefault("loss_agg_mode", config.loss_agg_mode)
    return get_policy_loss_fn("gmpo")(
        old_log_prob=torch.zeros_like(log_ratio),
        log_prob=log_ratio,
        advantages=advantages,
        response_mask=mask,
        config=config,
        **kwargs,
    )


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"clip_level": "row"}, r"policy_loss\.clip_level must be one of \['token', 'sequence', 'sequence_product'\]"),
        ({"clip_level": "sequence", "mean_power": 1.0}, r"policy_loss\.mean_power=1\.0 needs clip_level='token'"),
        ({"length_normalization": False, "mean_power": -1.0}, r"needs clip_level='token' and length_normalization"),
        ({"mean_power": math.inf}, r"policy_loss\.mean_power .* must be a finite number"),
        ({"mean_power": True}, r"policy_loss\.mean_power .* must be a finite number"),
        ({"length_normalization": "yes"}, r"policy_loss\.length_normalization must be true or false"),
    ],
)
def test_a_bad_variant_fails_when_the_config_is_built(variant, message):
    with pytest.raises(ValueError, match=message):
        GMPOPolicyLossConfig(loss_mode="gmpo", **variant)


def test_gmpo_variants_with_another_loss_mode_are_an_error():
    with pytest.raises(ValueError, match=r"apply only with actor_rollout_ref\.actor\.policy_loss\.loss_mode=gmpo"):
        GMPOPolicyLossConfig(loss_mode="vanilla", clip_level="sequence")


def test_the_driver_rejects_a_bad_variant_before_any_worker_starts():
    """verl's main_ppo runs validate_config before ray.init; it builds the actor config, and with it ours."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        good = compose(
            "ppo_trainer", overrides=BASE_OVERRIDES + ["+actor_rollout_ref.actor.policy_loss.mean_power=-1"]
        )
        bad = compose(
            "ppo_trainer", overrides=BASE_OVERRIDES + ["+actor_rollout_ref.actor.policy_loss.clip_level=row"]
        )
    validate_config(good, use_reference_policy=False, use_critic=False)
    with pytest.raises(InstantiationException, match=r"clip_level must be one of"):
        validate_config(bad, use_reference_policy=False, use_critic=False)


@pytest.mark.parametrize(
    "bounds, message",
    [
        ({"delta": 1.0}, r"clip_ratio_c is GMPO's dual-clip cap .* must be > 1"),
        ({"eps_low": -0.1}, r"clip_ratio_low \(or clip_ratio\) is a GMPO clip bound in log space"),
        ({"eps_high": math.nan}, r"clip_ratio_high \(or clip_ratio\) is a GMPO clip bound in log space"),
    ],
)
def test_bad_actor_bounds_fail_at_the_first_call(actor_config, bounds, message):
    with pytest.raises(ValueError, match=message):
        call(actor_config(**bounds))


def test_advantages_that_vary_along_a_row_are_an_error(actor_config):
    advantages = torch.tensor([[1.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"advantages vary along a row's valid tokens"):
        call(actor_config(), advantages=advantages)


def test_dp_without_the_global_batch_size_is_an_error(actor_config):
    config = actor_config()
    config.global_batch_info.update(dp_size=2, global_batch_size=None)
    with pytest.raises(ValueError, match=r"dp_size=2 needs config\.global_batch_info\['global_batch_size'\]"):
        call(config)


def test_no_config_is_an_error():
    with pytest.raises(ValueError, match=r"loss_mode=gmpo needs verl's actor config"):
        get_policy_loss_fn("gmpo")(
            old_log_prob=torch.zeros(1, 2), log_prob=torch.zeros(1, 2), advantages=torch.ones(1, 2),
            response_mask=torch.ones(1, 2, dtype=torch.bool), loss_agg_mode="token-mean", config=None,
        )  # fmt: skip


def test_another_loss_agg_mode_warns_once_and_changes_nothing(actor_config, caplog, monkeypatch):
    monkeypatch.setattr(verl_loss, "_warned_agg_modes", set())
    reference, _ = call(actor_config(loss_agg_mode="seq-mean-token-mean"))
    with caplog.at_level(logging.WARNING, logger="gmpo.verl.loss"):
        first, _ = call(actor_config(loss_agg_mode="token-mean"))
        second, _ = call(actor_config(loss_agg_mode="token-mean"))
    warnings = [r.getMessage() for r in caplog.records if "loss_agg_mode" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "'token-mean'" in warnings[0] and "loss_agg_mode=seq-mean-token-mean" in warnings[0]
    assert torch.equal(first, reference) and torch.equal(second, reference)


def test_clip_fractions_are_one_sided_by_the_advantage_sign(actor_config):
    # eps = 0.4. Row 0 (A > 0): 0.5 and 0.7 above eps_high are clipped, -0.5 below -eps_low is left open.
    # Row 1 (A < 0): -0.8 below -eps_low is clipped, 0.6 above eps_high is left open. Row 2: no token clipped.
    log_ratio = torch.tensor([[0.5, 0.7, -0.5, 0.0], [-0.8, 0.6, 0.1, 0.0], [0.2, -0.1, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)  # 9 tokens
    advantages = torch.tensor([1.0, -1.0, 1.0]).unsqueeze(-1) * mask
    _, metrics = call(actor_config(), advantages=advantages, log_ratio=log_ratio, mask=mask)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(2 / 9)
    assert metrics["actor/pg_clipfrac_lower"].item() == pytest.approx(1 / 9)
    assert metrics["actor/gmpo/log_ratio_max"].item() == pytest.approx(0.7)
    assert metrics["actor/gmpo/log_ratio_min"].item() == pytest.approx(-0.8)
    assert metrics["actor/ppo_kl"].item() == pytest.approx(-(0.5 + 0.7 - 0.5 - 0.8 + 0.6 + 0.1 + 0.2 - 0.1) / 9)


def test_sequence_level_fractions_count_rows(actor_config):
    # Row means: 0.5 (A > 0: clipped), -0.5 (A < 0: clipped), 0.5 (A < 0: open side, not clipped).
    log_ratio = torch.tensor([[0.5, 0.5], [-0.5, -0.5], [0.5, 0.5]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0, -1.0]).unsqueeze(-1).expand(3, 2)
    _, metrics = call(actor_config(clip_level="sequence"), advantages=advantages, log_ratio=log_ratio, mask=mask)
    assert metrics["actor/pg_clipfrac"].item() == pytest.approx(1 / 3)
    assert metrics["actor/pg_clipfrac_lower"].item() == pytest.approx(1 / 3)


def test_row_weight_statistics(actor_config):
    # No clip acts (|r| < 0.4 everywhere): w_i = exp(mean_t r_it) = exp(0.2), exp(-0.1), exp(0.3).
    log_ratio = torch.tensor([[0.2, 0.2], [-0.1, -0.1], [0.3, 0.3]], dtype=torch.float64)
    mask = torch.ones(3, 2, dtype=torch.bool)
    _, metrics = call(actor_config(), log_ratio=log_ratio, mask=mask, advantages=torch.ones(3, 2, dtype=torch.float64))
    weights = [math.exp(0.2), math.exp(-0.1), math.exp(0.3)]
    assert metrics["actor/gmpo/seq_weight_mean"].item() == pytest.approx(sum(weights) / 3)
    assert metrics["actor/gmpo/seq_weight_max"].item() == pytest.approx(max(weights))
    assert metrics["actor/gmpo/seq_weight_min"].item() == pytest.approx(min(weights))


def test_metrics_are_detached_tensors(actor_config):
    log_ratio = torch.tensor([[0.1, 0.2]], requires_grad=True)
    _, metrics = call(actor_config(), log_ratio=log_ratio, mask=torch.ones(1, 2, dtype=torch.bool),
                      advantages=torch.ones(1, 2))  # fmt: skip
    assert metrics and all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in metrics.values())


def verl_aggregate(per_rank_metrics):
    """A metric as verl 0.9.1 reports it for one mini-batch: ppo_loss wraps each micro-batch's value in a MEAN
    Metric, train_mini_batch combines the ranks with Metric.aggregate_dp (mean over ranks, then over micro-batches)."""
    from verl.utils.metric import AggregationType, Metric

    names = per_rank_metrics[0][0].keys()
    out = {}
    for name in names:
        ranks = []
        for micro_batches in per_rank_metrics:
            metric = Metric(AggregationType.MEAN)
            for values in micro_batches:
                metric.extend(Metric.from_dict({name: values[name]}, AggregationType.MEAN)[name])
            ranks.append(metric)
        out[name] = float(Metric.aggregate_dp(ranks))
    return out


def test_sequence_level_fractions_are_exact_under_verls_averaging_with_equal_micro_batches(actor_config):
    """The docstring's exact case: rows are the clip units and every micro-batch has 2 rows with tokens."""
    gen = torch.Generator().manual_seed(3)
    log_ratio = 0.8 * torch.randn(8, 1, generator=gen, dtype=torch.float64) + 0.2 * torch.randn(
        8, 5, generator=gen, dtype=torch.float64
    )
    mask = torch.rand(8, 5, generator=gen) < 0.8
    mask[:, 0] = True
    advantages = torch.randn(8, 1, generator=gen, dtype=torch.float64) * mask
    config = actor_config(clip_level="sequence")
    config.global_batch_info.update(dp_size=2, global_batch_size=8, batch_num_tokens=int(mask.sum()))
    split = [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    per_rank = [[call(config, advantages[r], log_ratio[r], mask[r])[1] for r in ranks] for ranks in split]
    reported = verl_aggregate(per_rank)
    # Whole-batch fractions from the definition: the row's mean log-ratio beyond the bound on its advantage's side.
    row_mean = (log_ratio * mask).sum(-1) / mask.sum(-1)
    adv = advantages[:, 0]
    assert 0 < ((adv > 0) & (row_mean > 0.4)).sum() and 0 < ((adv < 0) & (row_mean < -0.4)).sum()
    assert reported["actor/pg_clipfrac"] == pytest.approx(float(((adv > 0) & (row_mean > 0.4)).double().mean()))
    assert reported["actor/pg_clipfrac_lower"] == pytest.approx(float(((adv < 0) & (row_mean < -0.4)).double().mean()))
