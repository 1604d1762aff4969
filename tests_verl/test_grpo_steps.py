"""GRPO training steps with loss_mode=gmpo through verl's FSDP2 engine (`train_batch`) on 2 CPU processes.

On fixed completions, so that every step is reproducible across machines (`test_main_ppo.py` runs the whole trainer
with vLLM generating): `grpo_steps_worker.py` runs the rest of verl's update on 2 ranks: its GRPO advantages, the old
log-probs from the engine's forward-only pass, two PPO epochs of `train_batch` (AdamW) per step. Observable
behaviour: the surrogate GRPO maximises goes up, the first epoch of each step is on-policy (ratio 1, nothing
clipped), the second clips, and verl's metrics carry our names and finite values.
"""

import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EPOCHS = 2


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("grpo-steps")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "grpo_steps_worker.py"), str(out_dir / "tiny-qwen2"), str(out_dir / "record.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"GRPO worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads((out_dir / "record.json").read_text())


def test_the_grpo_surrogate_rises_every_step(record):
    surrogate = record["surrogate"]
    assert all(after > before for before, after in zip(surrogate, surrogate[1:])), surrogate


def test_the_first_epoch_is_on_policy_and_the_second_clips(record):
    """Old log-probs come from the engine's own forward pass: the first epoch's ratios are 1 (float32 rounding of the
    same computation: |log-ratio| well below 1e-4), so nothing is clipped; after one AdamW step some are."""
    on_policy, off_policy = record["metrics"][0::EPOCHS], record["metrics"][EPOCHS - 1 :: EPOCHS]
    for metrics in on_policy:
        assert max(abs(metrics["actor/gmpo/log_ratio_max"]), abs(metrics["actor/gmpo/log_ratio_min"])) < 1e-4, metrics
        assert metrics["actor/pg_clipfrac"] == metrics["actor/pg_clipfrac_lower"] == 0.0, metrics
    assert any(m["actor/pg_clipfrac"] + m["actor/pg_clipfrac_lower"] > 0 for m in off_policy), off_policy


def test_verls_metrics_carry_our_names_and_finite_values(record):
    names = {"actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl",
             "actor/gmpo/log_ratio_max", "actor/gmpo/log_ratio_min", "actor/gmpo/seq_weight_mean",
             "actor/gmpo/seq_weight_max", "actor/gmpo/seq_weight_min"}
    for metrics in record["metrics"]:
        assert names <= set(metrics), sorted(set(metrics))
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert all(math.isfinite(g) and g > 0 for g in record["grad_norm"]), record["grad_norm"]
