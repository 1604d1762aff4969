"""GMPOTrainer._compute_loss on hand-built batches, each GRPO option against a float64 reference from the spec."""

import functools
import logging
import math

import pytest
import torch
from torch.testing import assert_close
from trl import GRPOConfig, GRPOTrainer

from gmpo import GMPOTrainer

from .conftest import count_ones_reward, tiny_config
from .reference import reference_loss

ADVANTAGES = [1.0, -0.5, 0.7, -1.2]
LENGTHS = [5, 3, 0, 4]  # row 2 has no valid token
# TRL's fused LM head returns float32 log-probs even from a float64 model: compare at float32's default tolerances.
assert_close = functools.partial(assert_close, rtol=1.3e-6, atol=1e-5)


def reference_logps_and_entropy(model, inputs):
    """log pi(o_t | ...) and token entropy straight from the logits, in float64."""
    prompt_len = inputs["prompt_ids"].size(1)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double()
    logp = logits[:, prompt_len - 1:-1].log_softmax(-1)
    token_logp = logp.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


def make_inputs(model, seed=0, spread=0.5, lengths=LENGTHS):
    """A hand-built micro-batch on the model's device; old log-probs = current (float64) + N(0, spread^2) noise."""
    g = torch.Generator().manual_seed(seed)
    rows, prompt_len, length = len(lengths), 3, max(lengths)
    vocab = model.config.vocab_size
    inputs = {
        "prompt_ids": torch.randint(4, vocab, (rows, prompt_len), generator=g),
        "prompt_mask": torch.ones(rows, prompt_len, dtype=torch.long),
        "completion_ids": torch.randint(4, vocab, (rows, length), generator=g),
        "completion_mask": (torch.arange(length) < torch.tensor(lengths)[:, None]).long(),
        "advantages": torch.tensor(ADVANTAGES, dtype=torch.float64),
    }
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    logps, _ = reference_logps_and_entropy(model, inputs)
    noise = spread * torch.randn(logps.shape, generator=g, dtype=torch.float64)
    inputs["old_per_token_logps"] = logps + noise.to(logps.device)
    return inputs


def expected_policy_loss(model, inputs, mask=None, **kwargs):
    logps, _ = reference_logps_and_entropy(model, inputs)
    mask = inputs["completion_mask"].double() if mask is None else mask
    return reference_loss(logps - inputs["old_per_token_logps"], mask, inputs["advantages"], 0.4, 0.4, **kwargs)


def test_plain_loss_matches_reference(trainer):
    inputs = make_inputs(trainer.model)
    assert_close(trainer._compute_loss(trainer.model, inputs), expected_policy_loss(trainer.model, inputs))


def test_loss_is_divided_for_gradient_accumulation(trainer):
    inputs = make_inputs(trainer.model)
    trainer.current_gradient_accumulation_steps = 4
    assert_close(trainer._compute_loss(trainer.model, inputs), expected_policy_loss(trainer.model, inputs) / 4)


def test_eval_mode_does_not_divide(trainer):
    inputs = make_inputs(trainer.model)
    trainer.current_gradient_accumulation_steps = 4
    trainer.model.eval()
    assert_close(trainer._compute_loss(trainer.model, inputs), expected_policy_loss(trainer.model, inputs))


def test_tool_mask_removes_tokens_from_the_geometric_mean(trainer):
    inputs = make_inputs(trainer.model)
    inputs["tool_mask"] = torch.ones_like(inputs["completion_mask"])
    inputs["tool_mask"][0, 1:3] = 0
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).double()
    assert_close(trainer._compute_loss(trainer.model, inputs), expected_policy_loss(trainer.model, inputs, mask))


def test_top_entropy_mask(trainer):
    trainer.top_entropy_quantile = 0.5
    inputs = make_inputs(trainer.model)
    _, entropy = reference_logps_and_entropy(trainer.model, inputs)
    valid = inputs["completion_mask"].bool()
    threshold = torch.quantile(entropy[valid], 0.5)
    mask = (valid & (entropy >= threshold)).double()
    assert_close(trainer._compute_loss(trainer.model, inputs), expected_policy_loss(trainer.model, inputs, mask))


def test_dual_clip_caps_log_ratio_at_log_delta(trainer):
    trainer.args.delta = 1.2
    inputs = make_inputs(trainer.model, spread=1.0)
    assert_close(trainer._compute_loss(trainer.model, inputs), expected_policy_loss(trainer.model, inputs, delta=1.2))


def test_sequence_level_clip_and_no_length_normalization(trainer):
    trainer.args.importance_sampling_level = "sequence"
    trainer.args.length_normalization = False
    inputs = make_inputs(trainer.model, spread=0.2)
    expected = expected_policy_loss(trainer.model, inputs, clip_level="sequence", normalize=False)
    assert_close(trainer._compute_loss(trainer.model, inputs), expected)


def use_vllm_correction(trainer, mode):
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    trainer.vllm_importance_sampling_mode = mode


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask"])
def test_token_is_correction_is_the_geometric_mean_of_token_weights(trainer, mode):
    use_vllm_correction(trainer, mode)
    inputs = make_inputs(trainer.model)
    is_ratio = torch.rand(inputs["completion_ids"].shape, dtype=torch.float64) + 0.5
    if mode == "token_mask":
        is_ratio[0, 1] = 0.0  # a token the mask mode zeroed leaves row 0's token set
        is_ratio[3, :] = 0.0  # a fully masked row contributes nothing
    inputs["importance_sampling_ratio"] = is_ratio
    mask = inputs["completion_mask"].double() * (is_ratio > 0)
    row_weight = torch.tensor([
        math.exp(sum(math.log(is_ratio[i, t]) for t in range(is_ratio.size(1)) if mask[i, t]) / max(mask[i].sum(), 1))
        for i in range(len(LENGTHS))
    ], dtype=torch.float64)
    expected = expected_policy_loss(trainer.model, inputs, mask, row_weight=row_weight)
    assert_close(trainer._compute_loss(trainer.model, inputs), expected)


@pytest.mark.parametrize("mode", ["sequence_truncate", "sequence_mask"])
def test_sequence_is_correction_weights_rows(trainer, mode):
    use_vllm_correction(trainer, mode)
    inputs = make_inputs(trainer.model)
    is_ratio = torch.tensor([[0.8], [1.3], [1.0], [0.0]], dtype=torch.float64)
    inputs["importance_sampling_ratio"] = is_ratio
    expected = expected_policy_loss(trainer.model, inputs, row_weight=is_ratio[:, 0])
    assert_close(trainer._compute_loss(trainer.model, inputs), expected)
    # The masked row 3 gets no gradient: its loss term does not depend on the parameters.
    trainer.model.zero_grad()
    inputs["advantages"] = torch.tensor([0.0, 0.0, 0.0, -1.2], dtype=torch.float64)
    trainer._compute_loss(trainer.model, inputs).backward()
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())


def test_off_policy_mask_drops_negative_rows_that_drifted(trainer):
    trainer.off_policy_mask_threshold = 0.5
    inputs = make_inputs(trainer.model, spread=0.1)
    logps, _ = reference_logps_and_entropy(trainer.model, inputs)
    inputs["sampling_per_token_logps"] = logps.clone()
    inputs["sampling_per_token_logps"][3] += 2.0  # row 3 (A < 0): mean KL 2 > 0.5, dropped
    inputs["sampling_per_token_logps"][0] += 2.0  # row 0 (A > 0): kept whatever its KL
    expected = expected_policy_loss(trainer.model, inputs, row_weight=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert_close(trainer._compute_loss(trainer.model, inputs), expected)


def reference_kl_weight(log_ratio, mask, clip_level):
    """The bias correction's importance weight, in float64 from the rule: the token ratio rho_it at "token"; at both
    sequence levels the row's geometric mean ratio (prod_t rho_it)^(1/|o_i|) over its valid tokens, on every token."""
    if clip_level == "token":
        return log_ratio.exp()
    weight = torch.ones_like(log_ratio)
    for i in range(log_ratio.size(0)):
        tokens = [t for t in range(log_ratio.size(1)) if mask[i, t] > 0]
        if tokens:
            weight[i] = torch.prod(torch.stack([log_ratio[i, t].exp() for t in tokens])) ** (1.0 / len(tokens))
    return weight


@pytest.mark.parametrize("clip_level", ["token", "sequence", "sequence_product"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_kl_penalty(trainer, bias_correction, clip_level):
    trainer.beta = 0.3
    trainer.args.use_bias_correction_kl = bias_correction
    trainer.args.importance_sampling_level = clip_level
    inputs = make_inputs(trainer.model)
    logps, _ = reference_logps_and_entropy(trainer.model, inputs)
    inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, dtype=torch.float64)
    mask = inputs["completion_mask"].double()
    d = inputs["ref_per_token_logps"] - logps
    kl = d.exp() - d - 1
    if bias_correction:
        kl = kl * reference_kl_weight(logps - inputs["old_per_token_logps"], mask, clip_level)
    row_kl = (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    expected = expected_policy_loss(trainer.model, inputs, clip_level=clip_level) + 0.3 * row_kl.mean()
    assert_close(trainer._compute_loss(trainer.model, inputs), expected)
    assert "kl" in trainer._metrics["train"]


def test_kl_bias_correction_at_the_sequence_levels_is_one_weight_per_row(trainer):
    """Both sequence levels weight every token's KL by the same row weight: the gradient of the bias-corrected KL
    term alone is the same at "sequence" and "sequence_product" and differs from the token level's."""
    trainer.beta, trainer.args.use_bias_correction_kl = 0.3, True
    inputs = make_inputs(trainer.model, spread=0.5)
    logps, _ = reference_logps_and_entropy(trainer.model, inputs)
    inputs["ref_per_token_logps"] = logps + 0.3
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])  # no policy term: only the KL has a gradient
    grads = {}
    for level in ("token", "sequence", "sequence_product"):
        trainer.args.importance_sampling_level = level
        trainer.model.zero_grad()
        trainer._compute_loss(trainer.model, dict(inputs)).backward()
        grads[level] = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    assert_close(grads["sequence"], grads["sequence_product"])
    assert not torch.allclose(grads["sequence"], grads["token"], rtol=1e-3, atol=1e-6)


def test_static_entropy_bonus(trainer):
    trainer.entropy_coef, trainer._entropy_bonus_enabled = 0.05, True
    inputs = make_inputs(trainer.model)
    _, entropy = reference_logps_and_entropy(trainer.model, inputs)
    mask = inputs["completion_mask"].double()
    expected = expected_policy_loss(trainer.model, inputs) - 0.05 * (entropy * mask).sum() / mask.sum()
    assert_close(trainer._compute_loss(trainer.model, inputs), expected)
    assert trainer._metrics["train"]["entropy_coef"] == [0.05]


def test_adaptive_entropy_controller_updates_in_train_only(trainer):
    trainer.use_adaptive_entropy, trainer._entropy_bonus_enabled = True, True
    trainer.entropy_coef, trainer.args.entropy_target, trainer.args.entropy_coef_delta = 0.01, 100.0, 0.005
    inputs = make_inputs(trainer.model)
    trainer.model.eval()
    trainer._compute_loss(trainer.model, inputs)
    assert trainer.entropy_coef == 0.01 and trainer._last_world_entropy == math.inf
    trainer.model.train()
    trainer._compute_loss(trainer.model, inputs)
    _, entropy = reference_logps_and_entropy(trainer.model, inputs)
    mask = inputs["completion_mask"].double()
    assert trainer._last_world_entropy == pytest.approx(((entropy * mask).sum() / mask.sum()).item())
    assert trainer.entropy_coef == pytest.approx(0.015)  # entropy below the target of 100: coefficient goes up


def test_constant_per_token_advantages_are_accepted(trainer):
    inputs = make_inputs(trainer.model)
    expected = trainer._compute_loss(trainer.model, inputs)
    inputs["advantages"] = inputs["advantages"][:, None].expand_as(inputs["old_per_token_logps"]).clone()
    inputs["advantages"][2] = 5.0  # row 2 has no valid token: its value is irrelevant
    assert_close(trainer._compute_loss(trainer.model, inputs), expected)
    inputs["advantages"][0, 1] = 9.0
    with pytest.raises(ValueError, match="vary along a row"):
        trainer._compute_loss(trainer.model, inputs)


def test_every_multimodal_input_is_forwarded(trainer, monkeypatch):
    for key in ["pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"]:
        assert key in trainer._model_input_keys
    seen = {}
    original = trainer._get_per_token_logps_and_entropies

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", spy)
    inputs = make_inputs(trainer.model)
    inputs["token_type_ids"] = torch.zeros_like(torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1))
    trainer._compute_loss(trainer.model, inputs)
    assert seen["token_type_ids"] is inputs["token_type_ids"]


def test_metrics_are_logged(trainer):
    inputs = make_inputs(trainer.model, spread=1.0)
    trainer._compute_loss(trainer.model, inputs)
    logged = trainer._metrics["train"]
    logps, _ = reference_logps_and_entropy(trainer.model, inputs)
    log_ratio = (logps - inputs["old_per_token_logps"])[inputs["completion_mask"].bool()]
    assert logged["gmpo/log_ratio_max"] == [pytest.approx(log_ratio.max().item())]
    assert logged["gmpo/log_ratio_min"] == [pytest.approx(log_ratio.min().item())]
    for name in ["entropy", "policy_loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                 "gmpo/seq_weight_mean", "gmpo/seq_weight_min", "gmpo/seq_weight_max"]:
        assert len(logged[name]) == 1 and math.isfinite(logged[name][0]), name


def test_gradient_equals_grpo_when_ratios_are_one(tiny_model_dir, prompt_dataset, tmp_path, trainer):
    grpo = GRPOTrainer(
        model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
        args=GRPOConfig(output_dir=str(tmp_path / "grpo"), loss_type="grpo", use_cpu=True, bf16=False,
                        per_device_train_batch_size=8, num_generations=4, report_to="none"),
    )
    grpo.model.double()
    grpo.current_gradient_accumulation_steps = 1
    inputs = make_inputs(trainer.model)
    del inputs["old_per_token_logps"]  # on-policy: every ratio is exactly 1
    grads = []
    for t in (trainer, grpo):
        t.model.zero_grad()
        t._compute_loss(t.model, dict(inputs)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in t.model.parameters()]))
    assert grads[0].abs().sum() > 0
    assert_close(grads[0], grads[1])


def test_on_policy_run_warns_that_the_clip_cannot_act(tiny_model_dir, prompt_dataset, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gmpo"):
        GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                    args=tiny_config(tmp_path, steps_per_generation=1))
    assert "clip cannot act" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gmpo"):
        GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                    args=tiny_config(tmp_path, steps_per_generation=1, num_iterations=2))
    assert "clip cannot act" not in caplog.text


def test_grpo_config_is_rejected(tiny_model_dir, prompt_dataset, tmp_path):
    with pytest.raises(TypeError, match="GMPOConfig"):
        GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                    args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False))


def test_model_card_names_gmpo(trainer):
    trainer.create_model_card(model_name="tiny-gmpo")
    card = (trainer.args.output_dir + "/README.md")
    text = open(card).read()
    assert "GMPO" in text and "2507.20673" in text and "Geometric-Mean Policy Optimization" in text
    assert "DeepSeekMath" not in text


def test_moe_router_aux_loss_is_added(tiny_moe_dir, prompt_dataset, tmp_path):
    trainer = GMPOTrainer(model=tiny_moe_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                          args=tiny_config(tmp_path / "out"))
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.02
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    inputs = make_inputs(trainer.model)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        aux = trainer.model(input_ids=ids, attention_mask=attention, output_router_logits=True).aux_loss
    expected = (expected_policy_loss(trainer.model, inputs) + 0.02 * aux) / 2
    assert_close(trainer._compute_loss(trainer.model, inputs), expected.double())
    assert trainer._metrics["train"]["aux_loss"] == [pytest.approx(aux.item())]
