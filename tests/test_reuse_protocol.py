"""The updates-per-rollout study's fixed rules (benchmarks/reuse/protocol.py): pure logic, no training."""

import math

import pytest

from benchmarks.reuse import protocol as p


def test_every_condition_samples_the_same_completions():
    budgets = {u: p.completions_sampled(p.schedule(u)) for u in p.UPDATES}
    assert set(budgets.values()) == {p.ROLLOUT_ROWS * p.ROLLOUTS}, budgets
    # with num_iterations reuse too (mini-batches floored at 64 rows): still one rollout per U optimizer steps
    for u in p.UPDATES:
        s = p.schedule(u, min_rows=64)
        assert p.completions_sampled(s) == p.ROLLOUT_ROWS * p.ROLLOUTS, s
        assert p.completions_sampled(s, 3) == 3 * p.ROLLOUT_ROWS


@pytest.mark.parametrize("updates", p.UPDATES)
def test_updates_map_to_trl_fields(updates):
    s = p.schedule(updates)
    assert s.updates == updates
    # one micro-batch per update, each completion in exactly one update: the rollout is split U ways
    assert (s.gradient_accumulation_steps, s.num_iterations) == (1, 1)
    assert s.steps_per_generation == updates
    assert s.per_device_train_batch_size * updates == p.ROLLOUT_ROWS
    assert s.max_steps == updates * p.ROLLOUTS


def test_num_iterations_takes_over_below_the_row_floor():
    s = p.schedule(32, rollout_rows=256, min_rows=16)  # 256 / 16 = 16 mini-batches, each used twice
    assert (s.per_device_train_batch_size, s.steps_per_generation, s.num_iterations) == (16, 16, 2)
    assert s.updates == 32
    with pytest.raises(ValueError, match="updates=3"):
        p.schedule(3)


def test_collapse_and_target_rules():
    start = 0.571
    assert p.collapsed(start - p.COLLAPSE_MARGIN - 0.001, start)
    assert not p.collapsed(start - p.COLLAPSE_MARGIN + 0.001, start)
    assert not p.collapsed(0.7, start)
    curve = [(1000, 0.58), (2000, p.TARGET_ACCURACY), (3000, 0.65)]
    assert p.first_reaching(curve) == 2000  # at or above the target counts
    assert p.first_reaching([(1000, 0.58), (2000, 0.59)]) is None


def test_standard_error_and_two_se_rule():
    m, se = p.mean_se([1.0, 2.0, 3.0])
    assert (m, se) == (2.0, pytest.approx(1 / math.sqrt(3)))  # sample std 1, n = 3
    assert math.isnan(p.mean_se([1.0])[1])
    a, b = [0.60, 0.61, 0.62], [0.55, 0.56, 0.57]  # each SE 0.00577, combined 0.00816: bound 0.0163 < gap 0.05
    assert p.compare(a, b) == 1 and p.compare(b, a) == -1
    close = [0.56, 0.58, 0.60]  # SE 0.01155, combined with b's 0.01414: bound 0.0283 > gap 0.02
    assert p.compare(close, b) == 0
    assert p.compare([0.9], [0.1]) == 0  # one value has no SE: no difference is called


def test_largest_sustained_stops_at_the_first_loss():
    base = [0.60, 0.61, 0.62]
    finals = {1: base, 2: [0.61, 0.62, 0.63], 4: [0.50, 0.51, 0.52], 8: [0.60, 0.61, 0.62]}
    assert p.largest_sustained(finals) == 2  # U = 4 loses, so U = 8 does not count
    assert p.largest_sustained({1: base, 2: base, 4: base}) == 4


def test_grid_runs_on_policy_once_per_trainer_and_is_seed_major():
    runs = p.grid()
    assert len(runs) == len(set(runs))
    assert {o for o, u, lr, s in runs if u == 1 and not o.endswith("-bf16")} == {"grpo-0.2", "gmpo-e0.4"}
    assert p.baseline("gmpo-e0.2") == "gmpo-e0.4" and p.baseline("grpo-0.2-bf16") == "grpo-0.2"
    main = [r for r in runs if not r[0].endswith("-bf16")]
    # U = 1 twice (once per trainer), every U > 1 once per objective, at each seed of each learning rate
    assert len(main) == sum((2 + len(p.OBJECTIVES) * (len(p.UPDATES_AT[lr]) - 1)) * len(p.SEEDS[lr])
                            for lr in p.LEARNING_RATES)
    assert p.UPDATES_AT[p.LEARNING_RATES[0]] == p.UPDATES == (1, 2, 4, 8, 16, 32)
    assert [s for *_, s in main] == sorted(s for *_, s in main)  # seed-major: a partial study has whole seeds
    assert all(len(p.SEEDS[lr]) >= 5 for lr in p.LEARNING_RATES[:1])  # the deciding learning rate
    assert sorted(r for r in runs if r[0].endswith("-bf16")) == sorted(
        (o, u, lr, s) for o, u, lr, ss in p.MISMATCH for s in ss)
    assert [s for *_, s in runs] == sorted(s for *_, s in runs)


def test_advice_rules():
    finals = {1: [0.58, 0.59, 0.60], 2: [0.60, 0.62, 0.64], 8: [0.62, 0.63, 0.64], 32: [0.60, 0.61, 0.62]}
    # best mean U = 8 (0.63, SE 0.0058); U = 2: 0.62, SE 0.0115, bound 2 * 0.0129 = 0.026 > gap 0.01: near best;
    # U = 1: 0.59, bound 0.016 < gap 0.04: below
    assert p.smallest_near_best(finals) == 2
    kind = {"g1": "grpo", "g2": "grpo", "m1": "gmpo"}
    assert p.clip_winners({"g1": [0.60, 0.61, 0.62], "g2": [0.59, 0.60, 0.61], "m1": [0.66, 0.67, 0.68]}, kind) == ["m1"]
    assert p.clip_winners({"g1": [0.60, 0.61, 0.62], "g2": [0.64, 0.66, 0.68], "m1": [0.66, 0.67, 0.68]}, kind) == []
