"""GMPOTrainer with mean_power=1 against trl.GRPOTrainer(loss_type="grpo") on the same batch, and the new options
through the trainer against the float64 reference.

With p = 1 the row weight is (1/|o_i|) sum_t c_it u_it, which is GRPO's per-row token mean of the one-sided clipped
ratio times the token IS weight; GRPO's linear bounds (1 - e, 1 + eh) are GMPO's log-space bounds
epsilon = log(1 / (1 - e)), epsilon_high = log(1 + eh). TRL 1.16's GRPOTrainer._compute_loss multiplies the policy
term by the off-policy mask and the IS ratio before adding beta * KL, and its dual clip caps only the unclipped ratio,
so with delta >= 1 + eh both objectives are the same function of the parameters: loss and gradient must agree.
"""

import math

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from gmpo import GMPOTrainer

from .conftest import count_ones_reward, tiny_config
from .reference import reference_loss
from .test_trainer_loss import assert_close, make_inputs, reference_logps_and_entropy

E, EH = 0.2, 0.28  # GRPO's linear clip: ratios in (0.8, 1.28)


@pytest.fixture
def pair(tiny_model_dir, prompt_dataset, tmp_path):
    """A GMPOTrainer with p = 1 and GRPO's bounds in log space, and a GRPOTrainer, on the same float64 weights."""
    def build(delta=None):
        gmpo = GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                           args=tiny_config(tmp_path / "gmpo", mean_power=1.0, epsilon=math.log(1 / (1 - E)),
                                            epsilon_high=math.log(1 + EH), delta=delta))
        grpo = GRPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                           args=GRPOConfig(output_dir=str(tmp_path / "grpo"), loss_type="grpo", epsilon=E,
                                           epsilon_high=EH, delta=delta, use_cpu=True, bf16=False,
                                           per_device_train_batch_size=8, num_generations=4, report_to="none"))
        for t in (gmpo, grpo):
            t.model.double().train()
            t.current_gradient_accumulation_steps = 2  # both divide by it in training
        return gmpo, grpo
    return build


def loss_and_grad(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters()])


def assert_same(gmpo, grpo, inputs):
    (loss_a, grad_a), (loss_b, grad_b) = loss_and_grad(gmpo, inputs), loss_and_grad(grpo, inputs)
    assert grad_a.abs().sum() > 0
    # Both trainers get the same float32 log-probs from TRL's fused LM head (see test_trainer_loss): float32 tolerances.
    assert_close(loss_a, loss_b)
    assert_close(grad_a, grad_b)


def set_both(trainers, **attributes):
    for t in trainers:
        for name, value in attributes.items():
            setattr(t, name, value)


@pytest.mark.parametrize("delta", [None, 1.35])
def test_p1_equals_grpo(pair, delta):
    gmpo, grpo = pair(delta)
    inputs = make_inputs(gmpo.model, spread=1.0)  # ratios well past both bounds and past delta
    assert_same(gmpo, grpo, inputs)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask"])
def test_p1_equals_grpo_with_token_is_correction(pair, mode):
    gmpo, grpo = pair()
    set_both((gmpo, grpo), use_vllm=True, vllm_importance_sampling_correction=True,
             vllm_importance_sampling_mode=mode)
    inputs = make_inputs(gmpo.model, spread=0.5)
    is_ratio = torch.rand(inputs["completion_ids"].shape, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1)) + 0.5
    if mode == "token_mask":
        is_ratio[0, 1] = 0.0  # a masked token: a 0 in the row's mean, still counted in |o_0| (as GRPO does)
        is_ratio[3, :] = 0.0  # a fully masked row contributes 0
    inputs["importance_sampling_ratio"] = is_ratio
    assert_same(gmpo, grpo, inputs)


def test_p1_equals_grpo_with_off_policy_mask(pair):
    gmpo, grpo = pair()
    set_both((gmpo, grpo), off_policy_mask_threshold=0.5)
    inputs = make_inputs(gmpo.model, spread=0.3)
    logps, _ = reference_logps_and_entropy(gmpo.model, inputs)
    inputs["sampling_per_token_logps"] = logps.clone()
    inputs["sampling_per_token_logps"][3] += 2.0  # row 3 (A < 0) drifted: dropped by both
    assert_same(gmpo, grpo, inputs)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_p1_equals_grpo_with_kl(pair, bias_correction):
    gmpo, grpo = pair()
    set_both((gmpo, grpo), beta=0.3)
    for t in (gmpo, grpo):
        t.args.use_bias_correction_kl = bias_correction
    inputs = make_inputs(gmpo.model, spread=0.5)
    logps, _ = reference_logps_and_entropy(gmpo.model, inputs)
    inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, dtype=torch.float64,
                                                              generator=torch.Generator().manual_seed(2))
    assert_same(gmpo, grpo, inputs)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_sequence_level_equals_grpo_with_kl(tiny_model_dir, prompt_dataset, tmp_path, bias_correction):
    """importance_sampling_level="sequence" with p = 0: w_i = exp(clip(s_i)) is GRPO's sequence-level coef clipped to
    (1 - e, 1 + eh), and with use_bias_correction_kl both weight each token's KL by exp(s_i) (TRL's coef_1)."""
    common = dict(beta=0.3, use_bias_correction_kl=bias_correction, importance_sampling_level="sequence")
    gmpo = GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                       args=tiny_config(tmp_path / "gmpo", epsilon=math.log(1 / (1 - E)),
                                        epsilon_high=math.log(1 + EH), **common))
    grpo = GRPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                       args=GRPOConfig(output_dir=str(tmp_path / "grpo"), loss_type="grpo", epsilon=E,
                                       epsilon_high=EH, use_cpu=True, bf16=False, per_device_train_batch_size=8,
                                       num_generations=4, report_to="none", **common))
    for t in (gmpo, grpo):
        t.model.double().train()
        t.current_gradient_accumulation_steps = 2
    inputs = make_inputs(gmpo.model, spread=0.5)  # mean log-ratios past both bounds on some rows
    logps, _ = reference_logps_and_entropy(gmpo.model, inputs)
    inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, dtype=torch.float64,
                                                              generator=torch.Generator().manual_seed(2))
    assert_same(gmpo, grpo, inputs)


@pytest.mark.parametrize("power, mode", [(-1.0, "token_mask"), (2.0, "token_mask"), (-1.0, None)])
def test_power_mean_through_the_trainer(trainer, power, mode):
    trainer.args.mean_power = power
    inputs = make_inputs(trainer.model, spread=0.8)
    token_weight = None
    if mode is not None:
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        trainer.vllm_importance_sampling_mode = mode
        token_weight = torch.rand(inputs["completion_ids"].shape, dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(3)) + 0.5
        token_weight[0, 2] = 0.0
        inputs["importance_sampling_ratio"] = token_weight
    logps, _ = reference_logps_and_entropy(trainer.model, inputs)
    expected = reference_loss(logps - inputs["old_per_token_logps"], inputs["completion_mask"].double(),
                              inputs["advantages"], 0.4, 0.4, power=power, token_weight=token_weight)
    assert_close(trainer._compute_loss(trainer.model, inputs), expected)


def test_sequence_product_through_the_trainer(trainer):
    trainer.args.importance_sampling_level = "sequence_product"
    inputs = make_inputs(trainer.model, spread=0.2)
    logps, _ = reference_logps_and_entropy(trainer.model, inputs)
    expected = reference_loss(logps - inputs["old_per_token_logps"], inputs["completion_mask"].double(),
                              inputs["advantages"], 0.4, 0.4, clip_level="sequence_product")
    assert_close(trainer._compute_loss(trainer.model, inputs), expected)
    # Units are rows: 3 rows with tokens, and with spread 0.2 the summed log-ratios leave (-0.4, 0.4) on some of them.
    assert trainer._metrics["train"]["clip_ratio/region_mean"][0] > 0
