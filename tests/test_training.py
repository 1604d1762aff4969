"""End to end: GMPOTrainer.train() on the tiny model, off-policy so that the clip acts."""

import math

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from gmpo import GMPOTrainer

from .conftest import count_ones_reward, tiny_config

GMPO_METRICS = ["gmpo/log_ratio_max", "gmpo/log_ratio_min", "gmpo/seq_weight_mean", "gmpo/seq_weight_min",
                "gmpo/seq_weight_max", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "entropy", "policy_loss"]


def train(tiny_model_dir, prompt_dataset, tmp_path, peft_config=None, **config):
    trainer = GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                          args=tiny_config(tmp_path, **config), peft_config=peft_config)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, before


def changed(trainer, before):
    return {name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p.detach())}


def test_off_policy_training_clips_and_logs(tiny_model_dir, prompt_dataset, tmp_path):
    trainer, before = train(tiny_model_dir, prompt_dataset, tmp_path, max_steps=6)
    assert changed(trainer, before), "no parameter changed after training"
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 6
    for name in GMPO_METRICS:
        assert all(name in log for log in steps), f"{name} missing from the step logs"
    assert any(log["clip_ratio/region_mean"] > 0 for log in steps), "the clip never acted at lr 0.05, off-policy"
    assert any(log["gmpo/log_ratio_max"] > 0 for log in steps)
    assert all(math.isfinite(log["loss"]) for log in steps)


def test_gradient_accumulation(tiny_model_dir, prompt_dataset, tmp_path):
    trainer, before = train(tiny_model_dir, prompt_dataset, tmp_path, gradient_accumulation_steps=2,
                            steps_per_generation=4, max_steps=2)
    assert changed(trainer, before)
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 2 and all("gmpo/log_ratio_max" in log for log in steps)


def test_lora(tiny_model_dir, prompt_dataset, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, before = train(tiny_model_dir, prompt_dataset, tmp_path, max_steps=3, peft_config=lora)
    moved = changed(trainer, before)
    assert moved and all("lora_" in name for name in moved), moved


def test_evaluation_logs_eval_metrics(tiny_model_dir, prompt_dataset, tmp_path):
    trainer = GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, train_dataset=prompt_dataset,
                          eval_dataset=prompt_dataset.select(range(8)),
                          args=tiny_config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2,
                                           per_device_eval_batch_size=8))
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert evals and "eval_gmpo/log_ratio_max" in evals[0] and "eval_entropy" in evals[0]


def test_save_and_reload(tiny_model_dir, prompt_dataset, tmp_path):
    trainer, _ = train(tiny_model_dir, prompt_dataset, tmp_path, max_steps=2)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for (name, p), q in zip(trainer.model.named_parameters(), reloaded.parameters()):
        assert torch.equal(p.detach(), q.detach()), name


@pytest.mark.parametrize("num_iterations", [2])
def test_num_iterations(tiny_model_dir, prompt_dataset, tmp_path, num_iterations):
    trainer, before = train(tiny_model_dir, prompt_dataset, tmp_path, steps_per_generation=1,
                            num_iterations=num_iterations, max_steps=4)
    assert changed(trainer, before)
    assert any(log.get("gmpo/log_ratio_max", 0) > 0 for log in trainer.state.log_history)
