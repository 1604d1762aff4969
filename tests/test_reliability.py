"""Bad data and guard rails: odd rewards, empty or truncated completions, NaN sampler log-probs, extreme ratios, bf16,
and a non-finite gradient. Each must leave the loss finite and the weights free of NaN/inf."""

import logging
import math

import pytest
import torch
from torch.testing import assert_close
from transformers import TrainerCallback

from gmpo import GMPOTrainer, gmpo_objective

from .conftest import build_tokenizer, count_ones_reward, tiny_config
from .test_trainer_loss import make_inputs, use_vllm_correction

EOS_ID = build_tokenizer().eos_token_id
VOCAB_SIZE = len(build_tokenizer())


def train(tiny_model_dir, prompt_dataset, tmp_path, reward_funcs=count_ones_reward, callbacks=None, **config):
    trainer = GMPOTrainer(model=tiny_model_dir, reward_funcs=reward_funcs, train_dataset=prompt_dataset,
                          args=tiny_config(tmp_path, **config), callbacks=callbacks)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, before


def step_logs(trainer):
    return [log for log in trainer.state.log_history if "loss" in log]


def assert_finite_run(trainer):
    steps = step_logs(trainer)
    assert steps and all(math.isfinite(log["loss"]) for log in steps), [log["loss"] for log in steps]
    for name, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), f"NaN/inf in {name}"


def weights_changed(trainer, before):
    return any(not torch.equal(before[name], p.detach()) for name, p in trainer.model.named_parameters())


# ---- rewards ----

def reward_none_for_even_rows(completions, **kwargs):
    return [None if i % 2 == 0 else float(c.count("1")) for i, c in enumerate(completions)]


def reward_nan_for_every_fourth_row(completions, **kwargs):
    return [math.nan if i % 4 == 0 else float(i % 3) for i in range(len(completions))]


def test_rewards_with_none_and_nan(tiny_model_dir, prompt_dataset, tmp_path):
    # Rows 0, 4, ... get None from one function and NaN from the other: unscorable, advantage forced to 0 by TRL.
    trainer, before = train(tiny_model_dir, prompt_dataset, tmp_path, max_steps=2,
                            reward_funcs=[reward_none_for_even_rows, reward_nan_for_every_fourth_row])
    assert_finite_run(trainer)
    assert weights_changed(trainer, before), "the scorable rows did not train"
    assert all(math.isfinite(log["reward"]) for log in step_logs(trainer) if "reward" in log)


def exploding_reward(completions, **kwargs):
    raise ValueError("grader crashed")


def test_raising_reward_function_is_named(tiny_model_dir, prompt_dataset, tmp_path):
    with pytest.raises(Exception, match="exploding_reward") as excinfo:
        train(tiny_model_dir, prompt_dataset, tmp_path, reward_funcs=[count_ones_reward, exploding_reward],
              max_steps=1)
    error = excinfo.value
    assert "grader crashed" in str(error) or isinstance(error.__cause__, ValueError), "the original error was lost"


# ---- empty, truncated and zero-advantage completions ----

def reward_by_position(completions, **kwargs):
    """0, 1, 0, 1, ... : spread inside every group even when all completions are identical."""
    return [float(i % 2) for i in range(len(completions))]


def test_completions_that_are_only_eos(tiny_model_dir, prompt_dataset, tmp_path):
    suppress_all_but_eos = [i for i in range(VOCAB_SIZE) if i != EOS_ID]
    trainer, before = train(tiny_model_dir, prompt_dataset, tmp_path, reward_funcs=reward_by_position, max_steps=2,
                            generation_kwargs={"suppress_tokens": suppress_all_but_eos})
    assert all(log["completions/mean_length"] == 1.0 for log in step_logs(trainer) if "num_tokens" in log)
    assert_finite_run(trainer)
    assert weights_changed(trainer, before), "the EOS token's log-prob carries the gradient and should train"


def test_micro_batch_without_valid_tokens(trainer):
    inputs = make_inputs(trainer.model)
    inputs["completion_mask"].zero_()  # every row empty (e.g. all masked as truncated)
    inputs["advantages"] = torch.tensor([1.0, 0.5, 0.7, -0.2], dtype=torch.float64)  # a sum != 0 (a -A_i leak shows)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    assert loss.item() == 0.0, "rows without valid tokens must add exactly 0"
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_all_completions_truncated_and_masked(tiny_model_dir, prompt_dataset, tmp_path):
    # EOS suppressed, so no completion terminates within max_completion_length and every row is masked out.
    trainer, before = train(tiny_model_dir, prompt_dataset, tmp_path, max_steps=2, max_completion_length=2,
                            mask_truncated_completions=True, generation_kwargs={"suppress_tokens": [EOS_ID]})
    assert all(log["completions/clipped_ratio"] == 1.0 for log in step_logs(trainer) if "num_tokens" in log)
    assert_finite_run(trainer)
    assert all(log["loss"] == 0.0 for log in step_logs(trainer))
    assert not weights_changed(trainer, before), "no valid token anywhere, yet the weights moved"
    for log in trainer.state.log_history:  # nothing to report is left out or None, never NaN (JSON loggers choke)
        assert not any(isinstance(v, float) and math.isnan(v) for v in log.values()), log


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


@pytest.mark.parametrize("skip", [True, False], ids=["skip-rows", "keep-rows"])
def test_groups_with_equal_rewards(tiny_model_dir, prompt_dataset, tmp_path, skip):
    trainer, before = train(tiny_model_dir, prompt_dataset, tmp_path, reward_funcs=constant_reward, max_steps=2,
                            skip_zero_advantage_rows=skip)
    assert_finite_run(trainer)
    # A = 0 everywhere: zero gradient, AdamW moves nothing (weight_decay is 0).
    assert not weights_changed(trainer, before), "zero advantages moved the weights"


# ---- NaN sampler log-probs with the vLLM IS correction and the off-policy mask ----

def trl_importance_sampling_ratio(trainer, old_logps, sampling_logps, mask):
    """inputs["importance_sampling_ratio"] as TRL 1.16's GRPOTrainer._generate_and_score_completions builds it."""
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    mode = trainer.vllm_importance_sampling_mode
    ratio = (diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff).exp()
    low, high = trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max
    if mode.endswith("truncate"):
        return ratio.clamp(min=low, max=high)
    low, high = -math.inf if low is None else low, math.inf if high is None else high
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_nan_sampling_logps_with_is_correction_and_off_policy_mask(trainer, mode):
    use_vllm_correction(trainer, mode)
    trainer.off_policy_mask_threshold = 0.05
    # Old log-probs equal the current ones (the first micro-batch of a rollout): then a NaN sampler log-prob, which
    # TRL turns into "no correction" (IS ratio 1) and "no KL evidence", acts exactly as a sampler log-prob equal to it.
    inputs = make_inputs(trainer.model, spread=0.0)
    old, mask = inputs["old_per_token_logps"], inputs["completion_mask"]
    g = torch.Generator().manual_seed(1)
    filled = old + 0.3 * torch.randn(old.shape, generator=g, dtype=old.dtype)
    unscorable = torch.zeros_like(mask, dtype=torch.bool)
    unscorable[0, 1] = unscorable[1, 0] = unscorable[3, 3] = unscorable[2, 0] = True  # row 2 is empty
    filled[unscorable] = old[unscorable]
    sampling = filled.masked_fill(unscorable, math.nan)
    sampling[mask == 0] = math.nan  # vLLM pads with NaN too

    losses = []
    for sampler_logps in (sampling, filled):
        batch = dict(inputs, sampling_per_token_logps=sampler_logps,
                     importance_sampling_ratio=trl_importance_sampling_ratio(trainer, old, sampler_logps, mask))
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, batch)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None)
        losses.append(loss.detach())
    assert_close(losses[0], losses[1], rtol=1.3e-6, atol=1e-5)  # float32 log-probs from TRL's LM head
    logged = trainer._metrics["train"]
    for name in ("gmpo/log_ratio_max", "gmpo/log_ratio_min", "gmpo/seq_weight_mean", "policy_loss"):
        assert logged[name] and all(math.isfinite(v) for v in logged[name]), (name, logged[name])


# ---- extreme log-ratios and bf16 ----

EPS = 0.4


def extreme_batch():
    """Rows: A>0 at +50, A>0 at -50, A<0 at +50, A<0 at -50, and a mixed row of each sign; float32, 6 tokens."""
    pattern = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    mixed = torch.tensor([50.0, -50.0, 50.0, 50.0, -50.0, 0.1])
    log_ratio = torch.stack([50 * pattern, -50 * pattern, 50 * pattern, -50 * pattern, mixed, mixed])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -2.0])
    return log_ratio.requires_grad_(), torch.ones_like(log_ratio), advantages


@pytest.mark.parametrize("delta", [None, 2.0], ids=["no-delta", "delta"])
def test_extreme_log_ratios(delta):
    log_ratio, mask, advantages = extreme_batch()
    out = gmpo_objective(log_ratio, mask, advantages, EPS, EPS, delta=delta)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(log_ratio.grad).all()
    w = out.seq_weight.detach()
    assert torch.isfinite(w).all() and (w > 0).all()
    positive, negative = advantages > 0, advantages < 0
    assert (w[positive] <= math.exp(EPS) * (1 + 1e-6)).all(), "A > 0: w must stay below exp(epsilon_high)"
    if delta is not None:
        assert (w[negative] <= delta * (1 + 1e-6)).all(), "A < 0 with delta: w must stay below delta"
    else:  # A < 0, no delta: w = exp(mean_t max(r_t, -eps)), up to exp(50) ~ 5e21, finite in float32
        expected = log_ratio.detach().double().clamp(min=-EPS).mean(-1).exp()
        # log w is a float32 mean of values up to 50 (float32 spacing 3.8e-6 at 50, 1.5e-5 at the row sum 149):
        # w carries that absolute error in log space, a relative error of a few 1e-6.
        assert_close(w[negative].double(), expected[negative], rtol=1e-5, atol=0)
        assert w[2] == pytest.approx(math.exp(50), rel=1e-5)


def test_bf16_autocast_objective():
    g = torch.Generator().manual_seed(0)
    log_ratio = 2 * torch.rand(8, 16, generator=g) - 1  # |r| < 1, beyond the clip bounds +-0.2 on both sides
    mask = (torch.arange(16) < torch.randint(0, 17, (8, 1), generator=g)).float()
    advantages = torch.randn(8, generator=g)
    reference = gmpo_objective(log_ratio, mask, advantages, 0.2, 0.2)

    low_precision = log_ratio.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gmpo_objective(low_precision, mask, advantages, 0.2, 0.2)
    out.loss.backward()
    assert out.loss.dtype == torch.float32, "the objective must compute in float32 under autocast"
    assert torch.isfinite(out.loss) and torch.isfinite(low_precision.grad.float()).all()
    # The only error is bf16's rounding of the inputs: |r| < 1 is stored within 2**-9, the clip and the mean are
    # 1-Lipschitz, so each log w_i moves by at most 2**-9 and w_i by a factor of at most exp(2**-9) - 1 < 1.96e-3.
    bound = math.exp(2**-9) - 1
    assert_close(out.seq_weight, reference.seq_weight, rtol=bound, atol=0)
    loss_bound = bound * (advantages.abs() * reference.seq_weight).mean().item()
    assert_close(out.loss, reference.loss, rtol=0, atol=loss_bound)


# ---- guard rails: a non-finite gradient is skipped or stops the run ----

NAN_AT_STEP = 3  # optimizer steps counted from 1, as the logs and the guard's messages count them


class WeightsPerStep(TrainerCallback):
    """Whether each optimizer step changed the weights."""

    def __init__(self):
        self.changed, self._before = {}, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._before = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.changed[state.global_step] = any(not torch.equal(a, p) for a, p in zip(self._before, model.parameters()))


def trainer_with_nan_loss_at(tiny_model_dir, prompt_dataset, tmp_path, step, policy, callbacks=None, **config):
    trainer = GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                          args=tiny_config(tmp_path, max_steps=4, nonfinite_grad_policy=policy, **config),
                          callbacks=callbacks)
    compute_loss = trainer._compute_loss

    def poisoned(model, inputs):  # NaN loss, hence NaN gradients, on one optimizer step
        loss = compute_loss(model, inputs)
        return loss * math.nan if trainer.state.global_step + 1 == step else loss

    trainer._compute_loss = poisoned
    return trainer


# The guard reads the norm computed for gradient clipping; without clipping it computes the norm itself.
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipping-norm", "own-norm"])
def test_nonfinite_gradient_skips_the_step(tiny_model_dir, prompt_dataset, tmp_path, caplog, max_grad_norm):
    recorder = WeightsPerStep()
    trainer = trainer_with_nan_loss_at(tiny_model_dir, prompt_dataset, tmp_path, NAN_AT_STEP, "skip", [recorder],
                                       max_grad_norm=max_grad_norm)
    with caplog.at_level(logging.WARNING, logger="gmpo"):
        trainer.train()
    assert_finite_run(trainer)
    assert recorder.changed == {1: True, 2: True, 3: False, 4: True}, "the NaN step moved the weights (or others not)"
    skipped = {log["step"]: log.get("nonfinite_steps_skipped") for log in step_logs(trainer)}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1}, "nonfinite_steps_skipped counts the skipped steps so far"
    # The optimizer's moments are untouched too: AdamW counted 3 updates for 4 steps.
    assert {state["step"].item() for state in trainer.optimizer.state.values()} == {3.0}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"step {NAN_AT_STEP}" in message for message in warnings), warnings


def test_nonfinite_gradient_stops_the_run(tiny_model_dir, prompt_dataset, tmp_path):
    trainer = trainer_with_nan_loss_at(tiny_model_dir, prompt_dataset, tmp_path, NAN_AT_STEP, "stop")
    with pytest.raises(RuntimeError, match=rf"step {NAN_AT_STEP}\b"):
        trainer.train()
    assert trainer.state.global_step == NAN_AT_STEP - 1
    for name, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), f"NaN/inf reached {name} before the stop"
