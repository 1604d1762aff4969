"""The launch lines in docs/verl.md, composed with verl's own `ppo_trainer` config as `verl.trainer.main_ppo` does.

verl's GMPO example itself needs GPUs (an 8B model, tensor-parallel vLLM); `test_main_ppo.py` runs verl's trainer
on CPU with a tiny policy. Here: Hydra composes verl's config with the settings of verl's GMPO example
(`examples/gmpo_trainer/run_qwen3_8b_fsdp.sh`) followed by the documented lines, verl's `validate_config` (which the
driver runs before it starts Ray) accepts them, the actor config the workers build is ours, and the loss it selects
computes the documented variant (hand-worked values below).
"""

import math
import os
import re

import pytest
import torch
import verl
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils.config import omega_conf_to_dataclass, validate_config

from gmpo.verl import GMPOPolicyLossConfig

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "verl.md")
CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
# What verl's GMPO example passes that reaches the actor config or validate_config (data paths and loggers left out).
EXAMPLE = [
    "algorithm.adv_estimator=grpo", "algorithm.use_kl_in_reward=False", "data.train_batch_size=1024",
    "data.max_prompt_length=1024", "data.max_response_length=2048", "actor_rollout_ref.model.use_remove_padding=True",
    "actor_rollout_ref.actor.policy_loss.loss_mode=geo_mean", "actor_rollout_ref.actor.clip_ratio_low=0.4",
    "actor_rollout_ref.actor.clip_ratio_high=0.4", "actor_rollout_ref.actor.ppo_mini_batch_size=256",
    "actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24576",
    "actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_coef=0.001",
    "actor_rollout_ref.actor.kl_loss_type=low_var_kl", "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.n=5", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=24576",
    "actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True", "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=24576",
    "trainer.n_gpus_per_node=8", "trainer.nnodes=1",
]
# One row, A = 1, two tokens with log-ratios 0.2 and 0.6, eps = 0.4: w for each documented variant, by hand.
LOG_RATIO = (0.2, 0.6)
EXPECTED_WEIGHT = {
    "launch": math.exp((0.2 + 0.4) / 2),  # token clip: (0.2, min(0.6, 0.4)), geometric mean
    "clip_level=sequence_product": math.exp(0.4 / 2),  # sum 0.8 clipped to 0.4, then 1/|o|
    "clip_level=sequence": math.exp(0.4),  # mean 0.4, at the bound
    "length_normalization=false": math.exp(0.2 + 0.4),  # product of the clipped ratios
    "mean_power=-1.0": 2 / (math.exp(-0.2) + math.exp(-0.4)),  # harmonic mean of e^0.2, e^0.4
}


def documented_lines(marker: str) -> list[str]:
    """The `key=value` lines of the first code block after `<!-- marker` in docs/verl.md."""
    text = open(DOC).read()
    block = re.search(re.escape(f"<!-- {marker}") + r".*?```bash\n(.*?)```", text, re.S)
    assert block, f"docs/verl.md has no code block after <!-- {marker}"
    lines = [line.strip().rstrip("\\").strip() for line in block.group(1).splitlines()]
    return [line for line in lines if "=" in line and not line.startswith("bash ")]


def actor_config(extra: list[str]):
    """verl's config composed with the example and `extra`, validated as the driver does; the workers' actor config."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        config = compose("ppo_trainer", overrides=EXAMPLE + extra)
    validate_config(config, use_reference_policy=True, use_critic=False)
    return omega_conf_to_dataclass(config.actor_rollout_ref.actor)


def row_weight(config) -> float:
    """w of the one-row case through verl's registry (A = 1: loss = -w)."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = get_policy_loss_fn(config.policy_loss.loss_mode)(
        old_log_prob=torch.zeros(1, 2), log_prob=torch.tensor([LOG_RATIO]), advantages=mask.float(),
        response_mask=mask, loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=None,
    )
    return -loss.item()


def test_the_documented_launch_lines_turn_verls_example_into_gmpo():
    config = actor_config(documented_lines("verl-launch-overrides"))
    assert isinstance(config.policy_loss, GMPOPolicyLossConfig) and config.policy_loss.loss_mode == "gmpo"
    assert (config.clip_ratio_low, config.clip_ratio_high, config.clip_ratio_c) == (0.4, 0.4, 3.0)
    assert config.use_dynamic_bsz and config.loss_agg_mode == "seq-mean-token-mean"
    assert row_weight(config) == pytest.approx(EXPECTED_WEIGHT["launch"], rel=1e-6)  # float32 inputs


@pytest.mark.parametrize("line", documented_lines("verl-variant-overrides"))
def test_each_documented_variant_reaches_the_loss(line):
    config = actor_config(documented_lines("verl-launch-overrides") + [line])
    key, value = line.split("=")
    key = key.rsplit(".", 1)[1]
    assert str(getattr(config.policy_loss, key)).lower() == value.lower()
    assert row_weight(config) == pytest.approx(EXPECTED_WEIGHT[f"{key}={value}"], rel=1e-6)


def test_a_bad_value_in_a_documented_line_stops_the_driver_with_the_valid_values():
    line = next(x for x in documented_lines("verl-variant-overrides") if ".clip_level=" in x)
    # Hydra wraps the config class's ValueError; its text is what the user sees.
    with pytest.raises(InstantiationException, match=r"clip_level must be one of \['token', 'sequence', 'sequence_product'\]"):
        actor_config(documented_lines("verl-launch-overrides") + [line.split("=")[0] + "=tokens"])
