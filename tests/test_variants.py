"""The power-mean family (`mean_power`) and the paper's sequence-level clip ("sequence_product") against float64
references written from the formulas, and against the formulas of the authors' code (GitHub callsys/GMPO)."""

import math

import pytest
import torch
from torch.testing import assert_close

from gmpo.objective import gmpo_objective

from .reference import reference_loss
from .test_objective import random_batch

POWERS = [-10.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 10.0]


def loss_and_grad(fn, log_ratio):
    """fn(x) and d fn / d x at x = log_ratio (NaN padding replaced by 0: it must get no gradient either way)."""
    x = log_ratio.nan_to_num(0.0).requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("seed", range(3))
def test_power_mean_matches_explicit_power_sums(power, seed):
    log_ratio, mask, advantages = random_batch(seed)
    ours = loss_and_grad(lambda x: gmpo_objective(x, mask, advantages, 0.3, 0.5, mean_power=power).loss, log_ratio)
    ref = loss_and_grad(lambda x: reference_loss(x, mask, advantages, 0.3, 0.5, power=power), log_ratio)
    assert_close(ours, ref)  # float64 in and out: default float64 tolerances


@pytest.mark.parametrize("power", [-1.0, 2.0])
def test_power_mean_with_dual_clip_and_token_weights(power):
    log_ratio, mask, advantages = random_batch(4, scale=1.0)
    u = torch.rand(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5
    u[0, 0] = 0.0  # a zeroed token: a 0 inside the mean for p > 0, out of the row for p <= 0
    ours = loss_and_grad(lambda x: gmpo_objective(x, mask, advantages, 0.3, 0.5, delta=1.4, mean_power=power,
                                                  token_weight=u).loss, log_ratio)
    ref = loss_and_grad(lambda x: reference_loss(x, mask, advantages, 0.3, 0.5, delta=1.4, power=power,
                                                 token_weight=u), log_ratio)
    assert_close(ours, ref)


def test_zero_power_keeps_the_geometric_row_weight_of_token_weights():
    # p = 0 with token factors u_it inside the mean equals the geometric mean of the clipped ratios times the
    # geometric mean of u over the same tokens: the row weight GMPO applied before the power mean existed.
    log_ratio, mask, advantages = random_batch(6)
    u = torch.rand(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) + 0.5
    u[3, 1] = 0.0  # leaves the row (p = 0)
    kept = mask * (u > 0)
    row_weight = torch.exp(torch.where(kept > 0, u, 1.0).log().sum(-1) / kept.sum(-1).clamp(min=1))
    inside = gmpo_objective(log_ratio, mask, advantages, 0.4, 0.4, token_weight=u).loss
    outside = gmpo_objective(log_ratio, kept, advantages, 0.4, 0.4, row_weight=row_weight).loss
    assert_close(inside, outside)


def test_small_powers_approach_the_geometric_mean():
    log_ratio, mask, advantages = random_batch(8, scale=0.3)
    geometric = gmpo_objective(log_ratio, mask, advantages, 0.4, 0.4).loss
    for power in (1e-7, -1e-7):
        # M_p = M_0 (1 + p var/2 + O(p^2)) for log-ratios of variance < 0.1: the gap is ~1e-8, far above float64 eps
        near = gmpo_objective(log_ratio, mask, advantages, 0.4, 0.4, mean_power=power).loss
        assert_close(near, geometric, rtol=1e-6, atol=0)


@pytest.mark.parametrize("power", [-10.0, -1.0, 1.0, 10.0])
def test_power_mean_is_stable_on_4000_token_rows(power):
    # float32 inputs, log-ratios up to +-10: |p c| reaches 100, and exp(100) overflows float32 (max ~exp(88.7)), so
    # a ratio-space power sum would give inf or 0 here; the log-space one must not.
    length = 4000
    g = torch.Generator().manual_seed(0)
    log_ratio = (torch.rand(3, length, generator=g) * 20 - 10).requires_grad_()
    mask = torch.ones(3, length)
    advantages = torch.tensor([1.0, -1.0, 0.5])
    out = gmpo_objective(log_ratio, mask, advantages, 0.4, 0.4, mean_power=power)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(log_ratio.grad).all()
    # Reference in float64 with explicit power sums (exp(+-60) is fine in float64).
    ref = reference_loss(log_ratio.detach().double(), mask, advantages.double(), 0.4, 0.4, power=power)
    assert_close(out.loss.double(), ref, rtol=1e-4, atol=0)  # float32: 4000-term sums, ~1e-7 * sqrt(4000) relative


@pytest.mark.parametrize("power", [-1.0, 1.0, 3.0])
def test_clipped_tokens_get_no_gradient_for_any_power(power):
    log_ratio = torch.tensor([[0.9, -0.9, 0.1], [0.9, -0.9, 0.1]], dtype=torch.float64, requires_grad=True)
    gmpo_objective(log_ratio, torch.ones(2, 3), torch.tensor([1.0, -1.0]), 0.4, 0.4, mean_power=power).loss.backward()
    grad = log_ratio.grad
    assert grad[0, 0] == 0 and grad[1, 1] == 0, grad
    assert (grad[0, 1:] != 0).all() and grad[1, 0] != 0 and grad[1, 2] != 0, grad


def authors_harmonic_row(log_diff, advantage, cliprange):
    """The authors' `hmpo` branch for one row (micro-batch 1), restated from the formula: flip the log-ratio by the
    advantage's sign (A >= 0 counts as positive), keep max(s, clamp(s, -cliprange, cliprange)), flip back, and take
    |o| / sum_t exp(-l_t); the loss is -A times that."""
    sign = -1.0 if advantage >= 0 else 1.0
    kept = [sign * max(sign * d, min(max(sign * d, -cliprange), cliprange)) for d in log_diff]
    harmonic = len(kept) / sum(math.exp(-k) for k in kept)
    return -advantage * harmonic


def test_minus_one_is_the_authors_harmonic_mean():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        n = int(torch.randint(1, 60, (1,), generator=g))
        log_diff = torch.randn(1, n, generator=g, dtype=torch.float64) * 0.5
        advantage = float(torch.randn(1, generator=g))
        ours = gmpo_objective(log_diff, torch.ones(1, n), torch.tensor([advantage]), 0.4, 0.4, mean_power=-1.0)
        expected = authors_harmonic_row(log_diff[0].tolist(), advantage, 0.4)
        assert_close(ours.loss, torch.tensor(expected, dtype=torch.float64)), trial


def authors_seqclip_row(log_diff, advantage, cliprange):
    """The authors' `gmpo_seqclip` branch for one row, restated from the formula: s = sum_t log-ratio, flip by the
    advantage's sign (A >= 0 counts as positive), keep max(s, clamp(s, -cliprange, cliprange)), flip back, divide by
    |o| and exponentiate; the loss is -A times that."""
    sign = -1.0 if advantage >= 0 else 1.0
    s = sign * sum(log_diff)
    kept = sign * max(s, min(max(s, -cliprange), cliprange))
    return -advantage * math.exp(kept / len(log_diff))


def test_sequence_product_is_the_authors_seqclip_on_single_rows():
    g = torch.Generator().manual_seed(2)
    acted = {"low": 0, "high": 0}
    for _ in range(40):
        n = int(torch.randint(1, 80, (1,), generator=g))
        drift = 0.05 * torch.randn(1, generator=g, dtype=torch.float64)  # so that long rows' sums leave (-0.4, 0.4)
        log_diff = torch.randn(1, n, generator=g, dtype=torch.float64) * 0.2 + drift
        advantage = float(torch.randn(1, generator=g))
        x = log_diff.clone().requires_grad_()
        ours = gmpo_objective(x, torch.ones(1, n), torch.tensor([advantage]), 0.4, 0.4, clip_level="sequence_product")
        ours.loss.backward()
        expected = authors_seqclip_row(log_diff[0].tolist(), advantage, 0.4)
        assert_close(ours.loss, torch.tensor(expected, dtype=torch.float64))
        # The gradient of the same formula: each token gets -A w / |o| when the sum is inside its one-sided bound.
        total = float(log_diff.sum())
        clipped = (advantage > 0 and total > 0.4) or (advantage < 0 and total < -0.4)
        grad = torch.zeros_like(x) if clipped else torch.full_like(x, -advantage * math.exp(total / n) / n)
        assert_close(x.grad, grad)
        acted["high"] += int(ours.stats.high_clipped)
        acted["low"] += int(ours.stats.low_clipped)
        assert int(ours.stats.high_clipped + ours.stats.low_clipped) == int(clipped) and ours.stats.clip_units == 1
    assert acted["low"] > 0 and acted["high"] > 0, acted  # both sides of the clip were exercised


@pytest.mark.parametrize("delta", [None, 1.2])
def test_sequence_product_matches_product_form_on_batches(delta):
    log_ratio, mask, advantages = random_batch(9, scale=0.3)
    log_ratio[5] = torch.where(mask[5] > 0, 0.1, torch.nan)  # row 5 (A < 0, 5 tokens): sum 0.5 > log(1.2) = 0.18,
    assert advantages[5] < 0 and mask[5].sum() == 5  # so the dual clip acts on it
    kwargs = dict(clip_level="sequence_product", delta=delta)
    ours = loss_and_grad(lambda x: gmpo_objective(x, mask, advantages, 0.2, 0.25, **kwargs).loss, log_ratio)
    ref = loss_and_grad(lambda x: reference_loss(x, mask, advantages, 0.2, 0.25, **kwargs), log_ratio)
    assert_close(ours, ref)


def test_sequence_product_bounds_a_40_token_row_to_exp_of_eps_over_length():
    # 40 tokens of log-ratio 0.05, A > 0: the sum 2.0 is clipped to 0.4, so w = exp(0.4 / 40) = exp(0.01) = 1.01005.
    # The mean clip ("sequence") keeps the mean 0.05 < 0.4 unclipped: w = exp(0.05) = 1.05127.
    log_ratio, mask, advantages = torch.full((1, 40), 0.05), torch.ones(1, 40), torch.tensor([1.0])
    product = gmpo_objective(log_ratio, mask, advantages, 0.4, 0.4, clip_level="sequence_product")
    mean = gmpo_objective(log_ratio, mask, advantages, 0.4, 0.4, clip_level="sequence")
    assert_close(product.seq_weight, torch.tensor([math.exp(0.01)]))
    assert_close(mean.seq_weight, torch.tensor([math.exp(0.05)]))
    assert (product.stats.high_clipped, mean.stats.high_clipped) == (1, 0)


def test_mean_power_needs_the_token_level_and_length_normalization():
    args = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1), 0.4, 0.4
    for kwargs in (dict(clip_level="sequence"), dict(clip_level="sequence_product"),
                   dict(length_normalization=False)):
        with pytest.raises(ValueError, match="mean_power"):
            gmpo_objective(*args, mean_power=1.0, **kwargs)


@pytest.mark.parametrize("power", [1e-4, -1e-4, 0.05])
def test_small_powers_are_accurate_in_float32(power):
    # log M_p = mean(c) + O(p var): computed as logsumexp(p c) - log n it would lose ~eps32 * log(n) / |p| = 5e-3 at
    # p = 1e-4; the centred form keeps float32's ~1e-6 relative error for any small |p|.
    g = torch.Generator().manual_seed(3)
    log_ratio = torch.randn(2, 4000, generator=g) * 0.3
    mask, advantages = torch.ones(2, 4000), torch.tensor([1.0, -1.0])
    out = gmpo_objective(log_ratio, mask, advantages, 0.4, 0.4, mean_power=power)
    ref = reference_loss(log_ratio.double(), mask, advantages.double(), 0.4, 0.4, power=power)
    assert_close(out.loss.double(), ref, rtol=1e-5, atol=0)
