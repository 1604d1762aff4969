"""The study's fixed rules, as pure functions (no torch, no TRL): budget, schedule, collapse, target, statistics.

Notation: N completions per rollout (the generation batch), R rollouts per run, so every condition samples the same
N * R completions. U = optimizer updates per rollout = (steps_per_generation / gradient_accumulation_steps) *
num_iterations, TRL's meaning of the three fields. Accuracies are held-out greedy char accuracy in [0, 1].
"""

import math
import statistics
from dataclasses import dataclass

UPDATES = (1, 2, 4, 8, 16, 32)
ROLLOUT_ROWS = 256  # N: 32 prompts x 8 completions per rollout
ROLLOUTS = 8  # R: budget = N * R = 2,048 completions per run
EVAL_ROLLOUTS = (2, 4, 6, 8)  # held-out evaluation after these rollouts (plus the shared start, rollout 0)
COLLAPSE_MARGIN = 0.05  # collapsed: final accuracy below the start by more than this (absolute)
TARGET_ACCURACY = 0.61  # time to accuracy: first evaluation at or above this


@dataclass(frozen=True)
class Schedule:
    """TRL settings that give `updates` optimizer updates per rollout of `rollout_rows` completions."""

    per_device_train_batch_size: int
    steps_per_generation: int
    gradient_accumulation_steps: int
    num_iterations: int
    max_steps: int

    @property
    def updates(self) -> int:
        return self.steps_per_generation // self.gradient_accumulation_steps * self.num_iterations


def schedule(updates: int, rollout_rows: int = ROLLOUT_ROWS, rollouts: int = ROLLOUTS, min_rows: int = 8) -> Schedule:
    """Split each rollout into `updates` disjoint mini-batches, one optimizer step each, as the paper does (1,024
    rollouts, 128 per step: 8 updates). Each completion is used in exactly one update; where a mini-batch would
    fall below `min_rows`, the rollout is split into rollout_rows / min_rows mini-batches and reused with
    num_iterations passes instead. gradient_accumulation_steps stays 1 (one micro-batch per update)."""
    splits = min(updates, rollout_rows // min_rows)
    if splits < 1 or updates % splits or rollout_rows % splits:
        raise ValueError(f"updates={updates}: {rollout_rows} rows do not split into {splits} equal mini-batches")
    return Schedule(per_device_train_batch_size=rollout_rows // splits, steps_per_generation=splits,
                    gradient_accumulation_steps=1, num_iterations=updates // splits, max_steps=updates * rollouts)


def completions_sampled(s: Schedule, rollouts_done: int | None = None) -> int:
    """Completions generated after `rollouts_done` rollouts (all of the run's when None): TRL samples
    per_device_train_batch_size * steps_per_generation rows every steps_per_generation * num_iterations steps."""
    generate_every = s.steps_per_generation * s.num_iterations
    done = -(-s.max_steps // generate_every) if rollouts_done is None else rollouts_done
    return done * s.per_device_train_batch_size * s.steps_per_generation


def collapsed(final: float, start: float, margin: float = COLLAPSE_MARGIN) -> bool:
    """Collapse, fixed before the run: the final held-out accuracy is below the start by more than `margin`."""
    return final < start - margin


def first_reaching(curve: list[tuple[float, float]], target: float = TARGET_ACCURACY) -> float | None:
    """x of the first point (x, accuracy) with accuracy >= target; None if no point reaches it."""
    return next((x for x, acc in curve if acc >= target), None)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)); SE is nan for fewer than 2 values."""
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def compare(a: list[float], b: list[float]) -> int:
    """+1 if mean(a) > mean(b) by more than two combined SEs (2 * sqrt(se_a^2 + se_b^2)), -1 if below by more,
    0 otherwise (no difference called, also when either side has fewer than 2 values)."""
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    bound = 2 * math.sqrt(sa**2 + sb**2)
    if math.isnan(bound):
        return 0
    return (ma - mb > bound) - (mb - ma > bound)


def largest_sustained(finals: dict[int, list[float]]) -> int:
    """Largest U such that no U' <= U ends below U = 1 by more than two combined SEs (`compare` == -1)."""
    best = 1
    for u in sorted(finals):
        if u > 1 and compare(finals[u], finals[1]) < 0:
            break
        best = u
    return best


# Learning rates a decade apart (see the pilots in docs/results.md). The first decides the advice: every U and 5
# seeds there; at the second, 3 seeds and the U grid cut to fit the time budget.
LEARNING_RATES = (1e-5, 1e-4)
SEEDS = {1e-5: (0, 1, 2, 3, 4), 1e-4: (0, 1, 2)}
UPDATES_AT = {1e-5: UPDATES, 1e-4: (1, 2, 8, 32)}
OBJECTIVES = ("grpo-0.2", "grpo-e0.4", "gmpo-e0.4", "gmpo-e0.2")
OBJECTIVES_TRAINER = {o: o.split("-")[0] for o in OBJECTIVES}
# At U = 1 every ratio is exactly 1 (TRL skips the old log-probs), so the clip cannot act and the two objectives
# of one trainer give the same update: their U = 1 condition is run once, under the name on the right.
ON_POLICY_TWIN = {"grpo-0.2": "grpo-0.2", "grpo-e0.4": "grpo-0.2", "gmpo-e0.4": "gmpo-e0.4", "gmpo-e0.2": "gmpo-e0.4"}
# The sampler mismatch (bf16 sampler, no IS correction): (condition, U, lr, seeds).
MISMATCH = (("gmpo-e0.4-bf16", 8, 1e-5, (0, 1, 2)), ("grpo-0.2-bf16", 8, 1e-5, (0, 1, 2)))


def baseline(objective: str) -> str:
    """The objective whose U = 1 run is `objective`'s 1-update reference."""
    return ON_POLICY_TWIN.get(objective.removesuffix("-bf16"), objective)


def grid(objectives=OBJECTIVES, updates=UPDATES_AT, seeds=SEEDS, mismatch=MISMATCH) -> list[tuple]:
    """(objective, U, lr, seed) of every run, seed-major, so that a study stopped early has every condition at the
    first seeds (learning rates in the order of `seeds`, the mismatch conditions after each seed's grid); U = 1
    once per trainer (`ON_POLICY_TWIN`)."""
    runs = []
    for s in sorted({s for ss in seeds.values() for s in ss}):
        runs += [(o, u, lr, s) for lr in seeds if s in seeds[lr] for u in updates[lr] for o in objectives
                 if u > 1 or baseline(o) == o]
        runs += [(o, u, lr, s) for o, u, lr, ss in mismatch if s in ss]
    return runs


def smallest_near_best(finals: dict[int, list[float]]) -> int:
    """Rule 3: the smallest U whose final accuracy is not below the best-mean U's by more than two combined SEs."""
    best = max(finals, key=lambda u: statistics.fmean(finals[u]))
    return min(u for u in finals if compare(finals[u], finals[best]) >= 0)


def clip_winners(best: dict[str, list[float]], trainer: dict[str, str]) -> list[str]:
    """Rule 2: the objectives whose best final accuracies beat every objective of the other trainer by more than
    two combined SEs (empty: no clip-range advice follows). `trainer` maps objective -> "grpo" or "gmpo"."""
    return [o for o in best if all(compare(best[o], best[x]) == 1 for x in best if trainer[x] != trainer[o])
            and any(trainer[x] != trainer[o] for x in best)]
