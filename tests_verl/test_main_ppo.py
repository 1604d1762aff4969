"""verl's own trainer end to end on CPU: `python -m verl.trainer.main_ppo` with loss_mode=gmpo and vLLM rollouts.

Each launch is a subprocess as a user runs it (`main_ppo_run.py`: GRPO on the built-in addition policy, a parquet of
addition prompts, an exact-match reward, FSDP2 actor, vLLM's CPU build generating); the CPU support is loaded
through verl's own `VERL_USE_EXTERNAL_MODULES` (`cpu_main_ppo.py`). Two launches, shared by the tests (each costs
about 2 minutes of start-up):

- gmpo: several GRPO steps, the mini-batch in MICRO_BATCHES micro-batches, greedy validation before and after;
- geo_mean with the same split, one step.

Rollout requests carry seeds, so both launches' first steps sample the same completions from the same weights
(checked below): their first updates are on the same data, and `actor/grad_norm` (the gradient's norm before
clipping) compares the losses. On-policy (ratio 1) geo_mean's per-micro-batch mean makes its gradient k times
GMPO's with k equal micro-batches. That gmpo split k ways equals geo_mean on one micro-batch (the whole mini-batch's
gradient) is `test_main_ppo_slow.py`'s third launch (and, inside verl's engine, `test_engine_microbatch.py`).
"""

import math

import pytest

from tests_verl.main_ppo_run import grpo_overrides, read_jsonl, run_main_ppo

PROMPTS, GROUP, MICRO_BATCHES, STEPS = 16, 8, 8, 3
ROWS = PROMPTS * GROUP
GMPO_METRICS = {"actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl",
                "actor/gmpo/log_ratio_max", "actor/gmpo/log_ratio_min", "actor/gmpo/seq_weight_mean",
                "actor/gmpo/seq_weight_max", "actor/gmpo/seq_weight_min"}
# verl's greedy validation accuracy (the mean of the reward over the validation prompts, temperature 0).
ACCURACY = "val-core/addition/acc/mean@1"
# verl logs max |pi_vLLM - pi_FSDP| over the step's response tokens. Both float32, with the same weights the two
# differ by rounding (measured <= 2.4e-6, about twenty float32 ulps of 1); one optimizer step of weights not synced
# moves probabilities by orders of magnitude more.
SYNCED_PROBS_DIFF = 1e-4
LR = 1e-4


def launch(tmp_path_factory, name: str, loss_mode: str, micro_batch: int, steps: int, *extra: str) -> dict:
    out = tmp_path_factory.mktemp(name)
    overrides = grpo_overrides(out, loss_mode=loss_mode, steps=steps, prompts=PROMPTS, group=GROUP,
                               micro_batch=micro_batch, lr=LR)
    result = run_main_ppo(out, overrides + list(extra))
    log = (out / "main_ppo.log").read_text()
    assert result.returncode == 0, f"main_ppo exited {result.returncode}:\n{log[-6000:]}"
    return {"metrics": {r["step"]: r["data"] for r in read_jsonl(out / "metrics.jsonl")},
            "syncs": read_jsonl(out / "weight_syncs.jsonl"), "log": log}


@pytest.fixture(scope="module")
def gmpo_run(tmp_path_factory):
    return launch(tmp_path_factory, "gmpo", "gmpo", ROWS // MICRO_BATCHES, STEPS,
                  "trainer.val_before_train=True", f"trainer.test_freq={STEPS}")


@pytest.fixture(scope="module")
def geo_mean_split(tmp_path_factory):
    return launch(tmp_path_factory, "geo-mean-split", "geo_mean", ROWS // MICRO_BATCHES, 1)


def training_steps(run: dict) -> list[dict]:
    return [run["metrics"][step] for step in sorted(run["metrics"]) if "actor/grad_norm" in run["metrics"][step]]


def test_every_step_trains_and_logs_the_gmpo_metrics_under_their_names(gmpo_run):
    steps = training_steps(gmpo_run)
    assert len(steps) == STEPS, sorted(gmpo_run["metrics"])
    for metrics in steps:
        assert GMPO_METRICS <= set(metrics), sorted(set(metrics))
        assert all(math.isfinite(metrics[name]) for name in GMPO_METRICS), metrics
        assert metrics["actor/grad_norm"] > 0 and math.isfinite(metrics["actor/grad_norm"]), metrics
        # One update per step on the step's own rollouts: old log-probs are this policy's, so ratio 1, nothing clipped.
        assert abs(metrics["actor/gmpo/log_ratio_max"]) < 1e-5 and abs(metrics["actor/gmpo/log_ratio_min"]) < 1e-5
        assert metrics["actor/pg_clipfrac"] == metrics["actor/pg_clipfrac_lower"] == 0.0, metrics
    assert "loss_mode=gmpo ignores" not in gmpo_run["log"], "seq-mean-token-mean was passed: no warning expected"


def test_the_weights_reach_vllm_at_start_and_after_every_update(gmpo_run):
    syncs = gmpo_run["syncs"]
    assert len(syncs) == STEPS + 1, syncs
    assert all(s["tensors"] == syncs[0]["tensors"] > 0 for s in syncs), syncs
    sums = [s["sum"] for s in syncs]
    assert all(before != after for before, after in zip(sums, sums[1:])), f"an update left the weights as they were: {sums}"
    for metrics in training_steps(gmpo_run):
        assert metrics["training/rollout_probs_diff_max"] < SYNCED_PROBS_DIFF, metrics


def test_the_reward_moves(gmpo_run):
    before, after = gmpo_run["metrics"][0][ACCURACY], gmpo_run["metrics"][STEPS][ACCURACY]
    sampled = [m["critic/score/mean"] for m in training_steps(gmpo_run)]
    assert after != before and len(set(sampled)) > 1, (before, after, sampled)


def first_update(run: dict) -> dict:
    return training_steps(run)[0]


def test_both_launches_first_train_on_the_same_completions(gmpo_run, geo_mean_split):
    keys = ("critic/score/mean", "response_length/mean", "critic/advantages/max", "critic/advantages/min")
    reference, other = first_update(gmpo_run), first_update(geo_mean_split)
    assert all(other[k] == pytest.approx(reference[k], rel=1e-6) for k in keys), (
        {k: (reference[k], other[k]) for k in keys})


def test_geo_mean_split_k_ways_is_k_times_gmpo(gmpo_run, geo_mean_split):
    """On the same data and the same split; tolerance: float32 sums in another order, far below the factor k."""
    split = first_update(geo_mean_split)["actor/grad_norm"]
    gmpo = first_update(gmpo_run)["actor/grad_norm"]
    assert split / gmpo == pytest.approx(MICRO_BATCHES, rel=1e-3), (split, gmpo)
