"""The TRL internals GMPOTrainer overrides or calls: a TRL upgrade that changes them fails here first."""

import inspect

import trl
from trl import GRPOTrainer

from gmpo import GMPOTrainer
from gmpo.trl.trainer import _NON_INPUT_LOGPS_ARGS

from .conftest import count_ones_reward, tiny_config


def params(fn):
    return list(inspect.signature(fn).parameters)


def test_trl_version_is_the_tested_series():
    assert trl.__version__.startswith("1.16."), f"gmpo is tested against TRL 1.16.x, found {trl.__version__}"


def test_overridden_and_called_methods_keep_their_signatures():
    assert params(GRPOTrainer._compute_loss) == ["self", "model", "inputs"]
    assert params(GRPOTrainer.compute_loss)[:3] == ["self", "model", "inputs"]
    assert params(GRPOTrainer.log) == ["self", "logs", "start_time"]
    assert params(GRPOTrainer._clip_grad_norm) == ["self", "model"]  # transformers.Trainer: the guard reads its norm
    assert params(GRPOTrainer.get_off_policy_mask) == [
        "advantages", "per_token_logps", "sampling_per_token_logps", "mask", "off_policy_threshold"]
    assert params(GRPOTrainer.get_high_entropy_mask) == ["self", "entropies", "mask", "threshold"]
    logps_params = params(GRPOTrainer._get_per_token_logps_and_entropies)
    assert _NON_INPUT_LOGPS_ARGS <= set(logps_params)
    assert logps_params[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"]


def test_constructor_matches_grpo_trainer():
    ours, theirs = inspect.signature(GMPOTrainer.__init__), inspect.signature(GRPOTrainer.__init__)
    assert list(ours.parameters) == list(theirs.parameters)
    for name, p in theirs.parameters.items():
        assert ours.parameters[name].default == p.default, name


def test_trainer_state_the_loss_reads(tiny_model_dir, prompt_dataset, tmp_path):
    trainer = GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                          args=tiny_config(tmp_path))
    for name in ["epsilon_low", "epsilon_high", "beta", "top_entropy_quantile", "off_policy_mask_threshold",
                 "use_vllm", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                 "aux_loss_enabled", "router_aux_loss_coef", "entropy_coef", "use_adaptive_entropy",
                 "_entropy_bonus_enabled", "_last_world_entropy", "_entropy_window_stats", "_metrics", "accelerator"]:
        assert hasattr(trainer, name), f"GRPOTrainer no longer sets `{name}`"
    assert trainer.epsilon_low == 0.4 and trainer.epsilon_high == 0.4


def test_reward_funcs_is_optional():
    assert inspect.signature(GMPOTrainer.__init__).parameters["reward_funcs"].default is None


def test_trl_decides_sync_or_async_with_is_async_callable():
    # gmpo.trl.guards wraps each reward function so that this same predicate sees the wrapper as it sees the function.
    from trl.trainer.utils import is_async_callable

    source = inspect.getsource(GRPOTrainer._calculate_rewards)
    assert "is_async_callable(reward_func)" in source
    assert "is_async_callable(func)" in inspect.getsource(GRPOTrainer.__init__)
    assert params(is_async_callable) == ["func"]
