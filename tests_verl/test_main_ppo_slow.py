"""A longer run of verl's main_ppo on CPU (slow, outside CI): gmpo against geo_mean at verl's GMPO example's batching.

    .venv-verl/bin/python -m pytest -q -s -m slow tests_verl/test_main_ppo_slow.py

verl's example (examples/gmpo_trainer/run_qwen3_8b_fsdp.sh: train batch 1024 prompts x 5, mini-batch 256, i.e. 4
updates per step, dynamic batching, clip 0.4, low-variance KL loss 0.001) scaled to the addition policy on CPU: 32
prompts x 5, mini-batch 8 prompts, micro-batches of at most MAX_TOKENS tokens (uneven), STEPS steps, without the KL
term: verl builds its reference model with FSDP2's CPU offload into pinned memory, which needs an accelerator. Both
launches sample the same first rollouts (seeded requests); greedy accuracy on 256 held-out prompts before and after.
Prints one line per loss and leaves the figures in <basetemp>/slow-*/summary.json.

The second test is the one-micro-batch point of `test_main_ppo.py`: geo_mean with the mini-batch as one micro-batch
against gmpo split 8 ways, on the same completions.
"""

import json
import math

import pytest

from tests_verl.main_ppo_run import grpo_overrides, read_jsonl, run_main_ppo
from tests_verl.test_main_ppo import GROUP as CI_GROUP
from tests_verl.test_main_ppo import MICRO_BATCHES
from tests_verl.test_main_ppo import PROMPTS as CI_PROMPTS

PROMPTS, GROUP, MINI_BATCH, STEPS, LR = 32, 5, 8, 20, 1e-4
MAX_TOKENS = 96  # tokens per micro-batch: rows of 10-11 tokens, 40 rows per mini-batch -> about 5 uneven ones
ACCURACY = "val-core/addition/acc/mean@1"
EXAMPLE_BATCHING = [
    f"actor_rollout_ref.actor.ppo_mini_batch_size={MINI_BATCH}",
    "actor_rollout_ref.actor.use_dynamic_bsz=True",
    f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={MAX_TOKENS}",
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
    "trainer.val_before_train=True",
    f"trainer.test_freq={STEPS}",
]


def summarize(loss_mode: str, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"slow-{loss_mode}")
    overrides = grpo_overrides(out, loss_mode=loss_mode, steps=STEPS, prompts=PROMPTS, group=GROUP, lr=LR)
    result = run_main_ppo(out, overrides + EXAMPLE_BATCHING, timeout=3600)
    assert result.returncode == 0, (out / "main_ppo.log").read_text()[-6000:]
    metrics = {r["step"]: r["data"] for r in read_jsonl(out / "metrics.jsonl")}
    train = [metrics[s] for s in sorted(metrics) if "actor/grad_norm" in metrics[s]]
    summary = {
        "loss_mode": loss_mode,
        "accuracy_before": metrics[0][ACCURACY],
        "accuracy_after": metrics[STEPS][ACCURACY],
        "first_grad_norm": train[0]["actor/grad_norm"],
        "first_score_mean": train[0]["critic/score/mean"],
        "score_mean_last5": sum(m["critic/score/mean"] for m in train[-5:]) / 5,
        "step_seconds_median": sorted(m["timing_s/step"] for m in train)[len(train) // 2],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    assert len(train) == STEPS and all(math.isfinite(m["actor/grad_norm"]) for m in train)
    return summary


@pytest.mark.slow
def test_gmpo_and_geo_mean_at_the_examples_batching(tmp_path_factory):
    gmpo, geo_mean = (summarize(mode, tmp_path_factory) for mode in ("gmpo", "geo_mean"))
    assert gmpo["first_score_mean"] == geo_mean["first_score_mean"], "the first rollouts should be the same"
    assert gmpo["accuracy_before"] == geo_mean["accuracy_before"]


def first_grad_norm(tmp_path_factory, loss_mode: str, micro_batch: int) -> tuple[float, float]:
    out = tmp_path_factory.mktemp(f"one-step-{loss_mode}-{micro_batch}")
    overrides = grpo_overrides(out, loss_mode=loss_mode, steps=1, prompts=CI_PROMPTS, group=CI_GROUP,
                               micro_batch=micro_batch, lr=LR)
    result = run_main_ppo(out, overrides)
    assert result.returncode == 0, (out / "main_ppo.log").read_text()[-6000:]
    metrics = read_jsonl(out / "metrics.jsonl")[0]["data"]
    print(loss_mode, micro_batch, metrics["actor/grad_norm"], metrics["critic/score/mean"])
    return metrics["actor/grad_norm"], metrics["critic/score/mean"]


@pytest.mark.slow
def test_gmpo_split_is_geo_mean_on_one_micro_batch(tmp_path_factory):
    rows = CI_PROMPTS * CI_GROUP
    whole, whole_score = first_grad_norm(tmp_path_factory, "geo_mean", rows)
    split, split_score = first_grad_norm(tmp_path_factory, "gmpo", rows // MICRO_BATCHES)
    assert whole_score == split_score, "the first rollouts should be the same"
    assert split == pytest.approx(whole, rel=1e-3)
