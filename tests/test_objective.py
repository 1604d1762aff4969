"""The vectorised objective against float64 loops written from the paper's product form (Eq. 4)."""

import math

import pytest
import torch
from torch.testing import assert_close

from gmpo.objective import gmpo_objective, masked_geometric_mean, sign_aware_clip

from .reference import reference_loss

INF = math.inf


def random_batch(seed, rows=6, length=9, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(rows, length, generator=g, dtype=torch.float64) * scale
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    lengths[1] = 0  # an empty row
    mask = (torch.arange(length) < lengths[:, None]).double()
    log_ratio = torch.where(mask > 0, log_ratio, torch.nan)  # padding must be ignored, even when NaN
    advantages = torch.randn(rows, generator=g, dtype=torch.float64)
    advantages[2] = 0.0
    return log_ratio, mask, advantages


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "bounds", [(0.4, 0.4), (0.2, 0.7), (INF, INF), (0.0, 0.3)], ids=["paper", "asymmetric", "no-clip", "zero-low"]
)
def test_matches_product_form(seed, bounds):
    log_ratio, mask, advantages = random_batch(seed)
    out = gmpo_objective(log_ratio, mask, advantages, *bounds)
    assert_close(out.loss, reference_loss(log_ratio, mask, advantages, *bounds))


@pytest.mark.parametrize("option", [dict(delta=1.3), dict(clip_level="sequence"), dict(normalize=False),
                                    dict(clip_level="sequence", normalize=False)])
def test_ablations_and_dual_clip_match_product_form(option):
    log_ratio, mask, advantages = random_batch(7, scale=0.3)
    kwargs = dict(option)
    normalize = kwargs.pop("normalize", True)
    out = gmpo_objective(log_ratio, mask, advantages, 0.2, 0.25, length_normalization=normalize, **kwargs)
    assert_close(out.loss, reference_loss(log_ratio, mask, advantages, 0.2, 0.25, normalize=normalize, **kwargs))


def test_row_weight_scales_rows():
    log_ratio, mask, advantages = random_batch(3)
    row_weight = torch.rand(6, dtype=torch.float64)
    out = gmpo_objective(log_ratio, mask, advantages, 0.4, 0.4, row_weight=row_weight)
    assert_close(out.loss, reference_loss(log_ratio, mask, advantages, 0.4, 0.4, row_weight=row_weight))


def test_gradient_matches_autograd_of_reference():
    log_ratio, mask, advantages = random_batch(11)
    ours = log_ratio.nan_to_num(0.0).requires_grad_()
    theirs = log_ratio.nan_to_num(0.0).requires_grad_()
    gmpo_objective(ours, mask, advantages, 0.3, 0.5).loss.backward()
    reference_loss(theirs, mask, advantages, 0.3, 0.5).backward()
    assert_close(ours.grad, theirs.grad)


def test_clipped_tokens_get_no_gradient():
    # Row 0 has A > 0: only r > eps_high is clipped. Row 1 has A < 0: only r < -eps_low is clipped.
    log_ratio = torch.tensor([[0.9, -0.9, 0.1], [0.9, -0.9, 0.1]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 3)
    gmpo_objective(log_ratio, mask, torch.tensor([1.0, -1.0]), 0.4, 0.4).loss.backward()
    grad = log_ratio.grad
    assert grad[0, 0] == 0 and grad[1, 1] == 0, grad
    assert (grad[0, 1:] != 0).all() and grad[1, 0] != 0 and grad[1, 2] != 0, grad


def test_hand_worked_case():
    # One row, A = 2, three tokens with log-ratios 0.5, -0.1, 0.0 and eps = 0.4 in log space.
    # A > 0 so only the top is clipped: c = (0.4, -0.1, 0.0); mean = 0.3 / 3 = 0.1; w = e^0.1 = 1.1051709...
    # A second, empty row contributes 0, and the mean runs over both rows: loss = -(2 * 1.1051709) / 2.
    log_ratio = torch.tensor([[0.5, -0.1, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    out = gmpo_objective(log_ratio, mask, torch.tensor([2.0, -3.0]), 0.4, 0.4)
    assert_close(out.loss, torch.tensor(-1.1051709))
    assert out.per_row_loss[1] == 0
    assert out.stats.high_clipped == 1 and out.stats.low_clipped == 0 and out.stats.clip_units == 3


def test_clip_is_one_sided_by_advantage_sign():
    r = torch.tensor([[-1.0, -0.2, 0.2, 1.0]])
    assert_close(sign_aware_clip(r, torch.tensor([[1.0]]), 0.4, 0.4), torch.tensor([[-1.0, -0.2, 0.2, 0.4]]))
    assert_close(sign_aware_clip(r, torch.tensor([[-1.0]]), 0.4, 0.4), torch.tensor([[-0.4, -0.2, 0.2, 1.0]]))


def test_infinite_bounds_give_plain_geometric_mean():
    log_ratio, mask, advantages = random_batch(5)
    out = gmpo_objective(log_ratio, mask, advantages, INF, INF)
    valid = mask > 0
    geometric = torch.exp(torch.where(valid, log_ratio, 0).sum(-1) / valid.sum(-1).clamp(min=1))
    assert_close(out.seq_weight, geometric)
    assert out.stats.low_clipped == 0 and out.stats.high_clipped == 0


def test_long_rows_do_not_overflow():
    # 4,000 tokens whose ratios are all e^5: the product overflows float64, the log-space mean does not.
    length = 4000
    log_ratio = torch.full((2, length), 5.0)
    log_ratio[1, ::2] = -5.0
    mask = torch.ones(2, length)
    advantages = torch.tensor([-1.0, -1.0])
    out = gmpo_objective(log_ratio, mask, advantages, 0.4, 0.4)
    assert torch.isfinite(out.loss)
    # log-space float64 reference: A < 0 keeps max(r, -0.4): row 0 mean 5.0, row 1 mean (5 - 0.4) / 2 = 2.3
    expected = -(-math.exp(5.0) - math.exp(2.3)) / 2
    assert_close(out.loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


def test_all_empty_rows_give_zero_loss_and_no_nan():
    log_ratio = torch.randn(3, 4, requires_grad=True)
    out = gmpo_objective(log_ratio, torch.zeros(3, 4), torch.tensor([1.0, -1.0, 2.0]), 0.4, 0.4)
    out.loss.backward()
    assert out.loss == 0 and not torch.isnan(log_ratio.grad).any()
    assert out.stats.num_rows == 0 and out.stats.log_ratio_max == -INF


def test_statistics():
    log_ratio = torch.tensor([[0.5, -0.6, 0.0], [0.1, -0.7, 0.2]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = gmpo_objective(log_ratio, mask, torch.tensor([1.0, -1.0]), 0.4, 0.4)
    s = out.stats
    assert s.log_ratio_max == 0.5 and s.log_ratio_min == pytest.approx(-0.7)
    # row 0 (A > 0): 0.5 > 0.4 is high-clipped; -0.6 is not (one-sided). row 1 (A < 0): -0.7 < -0.4 is low-clipped.
    assert (s.low_clipped, s.high_clipped, s.clip_units) == (1, 1, 5)
    assert_close(s.seq_weight_max, out.seq_weight.max().detach())
    assert s.num_rows == 2


def test_masked_geometric_mean():
    values = torch.tensor([[2.0, 8.0, 5.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert_close(masked_geometric_mean(values, mask), torch.tensor([4.0, 1.0]))


def test_unknown_clip_level_is_rejected():
    with pytest.raises(ValueError, match="clip_level"):
        gmpo_objective(torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1), 0.4, 0.4, clip_level="row")


def test_bf16_inputs_are_computed_in_float32():
    log_ratio, mask, advantages = random_batch(2, scale=0.2)
    log_ratio = log_ratio.nan_to_num(0.0)
    out16 = gmpo_objective(log_ratio.bfloat16(), mask, advantages.bfloat16(), 0.4, 0.4)
    out32 = gmpo_objective(log_ratio.float(), mask, advantages.float(), 0.4, 0.4)
    assert out16.loss.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: inputs are rounded to ~0.4% relative error before the float32 math
    assert_close(out16.loss, out32.loss, rtol=2e-2, atol=2e-2)
