"""verl's `loss_mode=gmpo` against the float64 whole-mini-batch reference, called as verl 0.9.1 calls it.

Simulation of verl's FSDP engine (verl/workers/engine/fsdp/transformer_impl.py `forward_backward_batch` and
verl/workers/utils/losses.py `ppo_loss`): the mini-batch's rows are dealt to D ranks, each rank's rows are cut into
micro-batches (any sizes, any order, as dynamic batching makes them), each micro-batch is right-padded to its own
longest row, `config.global_batch_info` gets dp_size / batch_num_tokens / global_batch_size (= all N rows) /
loss_scale_factor, the registered loss is called with verl's keywords and each micro-batch loss is back-propagated
unscaled; a rank's gradient is the sum over its micro-batches and the ranks' gradients are averaged (FSDP's
all-reduce). The reported pg_loss is summed over micro-batches and averaged over ranks (verl's SUM metric).

Tolerances: both sides run in float64 and differ only in summation order, so torch.testing's float64 defaults
(rtol 1e-7, atol 1e-7) hold with many orders of magnitude to spare.
"""

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from tests_verl.reference import reference_loss

N, T_MAX = 8, 6
EPS = 0.4

# Rank -> micro-batches -> row indices of the mini-batch.
SPLITS = {
    "one": [[list(range(8))]],
    "equal4": [[[0, 1], [2, 3], [4, 5], [6, 7]]],
    "uneven": [[[0], [1, 2, 3, 4, 5], [6, 7]]],
    "dynamic": [[[5, 0, 3], [7], [1, 2, 4, 6]]],
    "dp2_equal": [[[0, 1], [2, 3]], [[4, 5], [6, 7]]],
    "dp2_uneven": [[[3], [0, 1, 2]], [[7, 4, 6], [5]]],
}
VARIANTS = {
    "gmpo": {},
    "p1": {"mean_power": 1.0},
    "p-1": {"mean_power": -1.0},
    "p0.5": {"mean_power": 0.5},
    "sequence": {"clip_level": "sequence"},
    "sequence_product": {"clip_level": "sequence_product"},
    "no_length_norm": {"length_normalization": False},
}


def make_batch(seed: int, is_weights: bool):
    """N rows of lengths 1..T_MAX (row 2 fully masked, row 6 with A = 0), log-ratios ~ N(0, 0.7) so that both
    bounds, both advantage signs and the dual clip all act."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T_MAX + 1, (N,), generator=gen).tolist()
    theta = torch.randn(N, T_MAX, generator=gen, dtype=torch.float64) - 1.0
    old = theta + 0.7 * torch.randn(N, T_MAX, generator=gen, dtype=torch.float64)
    advantages = torch.randn(N, generator=gen, dtype=torch.float64)
    advantages[6] = 0.0
    masks = [torch.ones(n, dtype=torch.bool) for n in lengths]
    masks[2][:] = False
    u = 0.5 + 1.5 * torch.rand(N, T_MAX, generator=gen, dtype=torch.float64) if is_weights else None
    return lengths, theta.requires_grad_(), old, advantages, masks, u


def pad_micro_batch(rows, lengths, theta, old, advantages, masks, u):
    """The micro-batch as verl's to_padded_tensor gives it: right-padded with 0 to its longest row."""
    width = max(lengths[i] for i in rows)

    def pad(values):
        return torch.stack([torch.nn.functional.pad(v, (0, width - v.numel())) for v in values])

    log_prob = torch.stack([theta[i, :width] for i in rows])  # the padding carries gradient: it must get none
    old_mb = pad([old[i, : lengths[i]] for i in rows])
    mask = pad([masks[i] for i in rows]).bool()
    adv = pad([advantages[i].expand(lengths[i]) * masks[i] for i in rows])  # verl: scores * response_mask
    weights = None if u is None else pad([u[i, : lengths[i]] for i in rows])
    return log_prob, old_mb, adv, mask, weights


def run_verl_split(split, batch, config):
    """(pg_loss as verl reports it, gradient after FSDP's average over ranks) for one split of the mini-batch."""
    lengths, theta, old, advantages, masks, u = batch
    loss_fn = get_policy_loss_fn("gmpo")
    dp_size = len(split)
    total_tokens = sum(int(m.sum()) for m in masks)
    config.global_batch_info.update(
        dp_size=dp_size, batch_num_tokens=total_tokens, global_batch_size=N, loss_scale_factor=None
    )
    rank_losses, rank_grads = [], []
    for micro_batches in split:
        loss_sum, grad = 0.0, torch.zeros_like(theta)
        for rows in micro_batches:
            log_prob, old_mb, adv, mask, weights = pad_micro_batch(rows, *batch)
            loss, _ = loss_fn(
                old_log_prob=old_mb,
                log_prob=log_prob,
                advantages=adv,
                response_mask=mask,
                loss_agg_mode=config.loss_agg_mode,
                config=config,
                rollout_is_weights=weights,
            )
            (g,) = torch.autograd.grad(loss, theta)
            loss_sum, grad = loss_sum + loss.detach(), grad + g
        rank_losses.append(loss_sum)
        rank_grads.append(grad)
    return sum(rank_losses) / dp_size, sum(rank_grads) / dp_size


def reference(batch, delta, variant):
    lengths, theta, old, advantages, masks, u = batch
    rows = []
    for i in range(N):
        keep = masks[i]
        weights = None if u is None else u[i, : lengths[i]][keep]
        rows.append((theta[i, : lengths[i]][keep], old[i, : lengths[i]][keep], float(advantages[i]), weights))
    loss = reference_loss(
        rows,
        EPS,
        EPS,
        delta=delta,
        clip_level=variant.get("clip_level", "token"),
        length_normalization=variant.get("length_normalization", True),
        p=variant.get("mean_power", 0.0),
    )
    (grad,) = torch.autograd.grad(loss, theta)
    return loss.detach(), grad


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
@pytest.mark.parametrize("split", SPLITS, ids=list(SPLITS))
def test_micro_batches_and_ranks_give_the_whole_batch_gradient(actor_config, split, variant):
    config = actor_config(eps_low=EPS, eps_high=EPS, delta=3.0, **VARIANTS[variant])
    batch = make_batch(seed=0, is_weights=False)
    loss, grad = run_verl_split(SPLITS[split], batch, config)
    ref_loss, ref_grad = reference(batch, 3.0, VARIANTS[variant])
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert grad.abs().sum() > 0, "the batch must produce a gradient, or the comparison shows nothing"


@pytest.mark.parametrize("variant", ["gmpo", "p1", "sequence", "sequence_product", "no_length_norm"])
@pytest.mark.parametrize("split", ["uneven", "dp2_uneven"])
def test_rollout_is_weights_enter_as_token_factors(actor_config, split, variant):
    config = actor_config(eps_low=EPS, eps_high=EPS, delta=3.0, **VARIANTS[variant])
    batch = make_batch(seed=1, is_weights=True)
    loss, grad = run_verl_split(SPLITS[split], batch, config)
    ref_loss, ref_grad = reference(batch, 3.0, VARIANTS[variant])
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    unweighted, _ = reference(batch[:5] + (None,), 3.0, VARIANTS[variant])
    assert not torch.isclose(ref_loss, unweighted), "the weights must change the loss, or this test shows nothing"


@pytest.mark.parametrize("delta", [1.2, 3.0, None])
def test_clip_ratio_c_is_the_dual_clip(actor_config, delta):
    config = actor_config(eps_low=math.inf, eps_high=math.inf, delta=delta)  # only the dual clip can act
    batch = make_batch(seed=2, is_weights=False)
    loss, grad = run_verl_split(SPLITS["dp2_uneven"], batch, config)
    ref_loss, ref_grad = reference_with_bounds(batch, delta)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    if delta == 1.2:
        uncapped, _ = reference_with_bounds(batch, None)
        assert not torch.isclose(ref_loss, uncapped), "delta=1.2 must cap some ratio in this batch"


def reference_with_bounds(batch, delta):
    lengths, theta, old, advantages, masks, _ = batch
    rows = [
        (theta[i, : lengths[i]][masks[i]], old[i, : lengths[i]][masks[i]], float(advantages[i]), None)
        for i in range(N)
    ]
    loss = reference_loss(rows, math.inf, math.inf, delta=delta)
    (grad,) = torch.autograd.grad(loss, theta)
    return loss.detach(), grad


def test_a_micro_batch_of_empty_rows_adds_nothing(actor_config):
    config = actor_config()
    config.global_batch_info.update(dp_size=1, batch_num_tokens=0, global_batch_size=4, loss_scale_factor=None)
    log_prob = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    loss, metrics = get_policy_loss_fn("gmpo")(
        old_log_prob=torch.zeros(2, 3, dtype=torch.float64),
        log_prob=log_prob,
        advantages=torch.zeros(2, 3, dtype=torch.float64),
        response_mask=torch.zeros(2, 3, dtype=torch.bool),
        loss_agg_mode="seq-mean-token-mean",
        config=config,
    )
    loss.backward()
    assert loss.item() == 0.0 and log_prob.grad.abs().sum().item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values()), metrics
