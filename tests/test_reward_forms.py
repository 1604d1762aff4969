"""Reward functions in every form TRL's GRPOTrainer accepts give GMPOTrainer the same rewards; errors and malformed
outputs stop with a message naming the function."""

import asyncio
import functools
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForSequenceClassification
from trl import GRPOConfig, GRPOTrainer

from gmpo import GMPOTrainer
from gmpo.trl.guards import RewardFunctionError

from .conftest import build_tokenizer, save_model_dir, tiny_config

PROMPTS = ["12+34=", "12+34=", "50+50=", "50+50="]
COMPLETIONS = ["46", "4", "100", "1x"]


def length_reward(completions, scale=1.0, **kwargs):
    return [scale * len(c) for c in completions]


async def async_length_reward(completions, scale=1.0, **kwargs):
    await asyncio.sleep(0)
    return [scale * len(c) for c in completions]


class LengthReward:
    def __call__(self, completions, **kwargs):
        return [float(len(c)) for c in completions]


class AsyncLengthReward:
    async def __call__(self, completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]


FORMS = {
    "function": lambda: length_reward,
    "async-function": lambda: async_length_reward,
    "callable-object": LengthReward,
    "async-callable-object": AsyncLengthReward,
    "partial": lambda: functools.partial(length_reward, scale=2.0),
    "async-partial": lambda: functools.partial(async_length_reward, scale=2.0),
}


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    return save_model_dir(tmp_path_factory, "tiny-reward-model", LlamaForSequenceClassification, config, seed=1)


def rewards_of(trainer):
    inputs = [{"prompt": p} for p in PROMPTS]
    completion_ids = [[0] * len(c) for c in COMPLETIONS]
    return trainer._calculate_rewards(inputs, PROMPTS, COMPLETIONS, completion_ids)


def both_trainers(tiny_model_dir, prompt_dataset, tmp_path, reward_funcs):
    """GMPOTrainer and trl.GRPOTrainer built the same way around the same reward functions."""
    ours = GMPOTrainer(model=tiny_model_dir, reward_funcs=reward_funcs, train_dataset=prompt_dataset,
                       args=tiny_config(tmp_path / "gmpo"))
    grpo_args = GRPOConfig(output_dir=str(tmp_path / "grpo"), use_cpu=True, bf16=False, report_to="none",
                           per_device_train_batch_size=8, num_generations=4, max_completion_length=6)
    theirs = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_funcs, train_dataset=prompt_dataset, args=grpo_args)
    return ours, theirs


@pytest.mark.parametrize("form", list(FORMS))
def test_callable_forms_give_grpo_trainers_rewards(tiny_model_dir, prompt_dataset, tmp_path, form):
    ours, theirs = both_trainers(tiny_model_dir, prompt_dataset, tmp_path, [FORMS[form]()])
    assert ours.reward_func_names == theirs.reward_func_names
    expected = rewards_of(theirs)
    assert expected.abs().sum() > 0, "GRPOTrainer computed no reward: the comparison would prove nothing"
    assert_close(rewards_of(ours), expected, rtol=0, atol=0)


@pytest.mark.parametrize("as_path", [True, False], ids=["model-path", "model-object"])
def test_reward_models_give_grpo_trainers_rewards(tiny_model_dir, prompt_dataset, tmp_path, reward_model_dir,
                                                  as_path):
    model = reward_model_dir if as_path else LlamaForSequenceClassification.from_pretrained(reward_model_dir)
    ours, theirs = both_trainers(tiny_model_dir, prompt_dataset, tmp_path, [model, length_reward])
    assert ours.reward_func_names == theirs.reward_func_names
    expected = rewards_of(theirs)
    assert expected[:, 0].std() > 0, "the reward model's scores do not vary: the comparison would prove nothing"
    # The same model on the same texts in one process: the same float32 operations, bit for bit.
    assert_close(rewards_of(ours), expected, rtol=0, atol=0)


def raising(completions, **kwargs):
    raise KeyError("answer")


async def async_raising(completions, **kwargs):
    raise KeyError("answer")


class RaisingObject:
    async def __call__(self, completions, **kwargs):
        raise KeyError("answer")


@pytest.mark.parametrize("func, name", [
    (raising, "raising"),
    (async_raising, "async_raising"),
    (RaisingObject(), "RaisingObject"),
    (functools.partial(raising), "raising"),
], ids=["function", "async-function", "async-object", "partial"])
def test_a_raising_reward_is_named_in_every_form(tiny_model_dir, prompt_dataset, tmp_path, func, name):
    trainer = GMPOTrainer(model=tiny_model_dir, reward_funcs=[func], train_dataset=prompt_dataset,
                          args=tiny_config(tmp_path))
    with pytest.raises(RewardFunctionError, match=rf"reward function '{name}' raised KeyError: 'answer'"):
        rewards_of(trainer)


def returning(value):
    def short_reward(completions, **kwargs):
        return value(completions) if callable(value) else value

    return short_reward


BAD_OUTPUTS = {
    "one-too-few": (lambda c: [1.0] * (len(c) - 1), "returned 3 rewards for 4 completions"),
    "one-value-broadcast": (lambda c: [1.0], "returned 1 rewards for 4 completions"),
    "scalar": (1.0, "returned float 1.0; it must return a list"),
    "string": ("1,0,1,0", "returned str '1,0,1,0'; it must return a list"),
    "dict": ({"reward": [1.0] * 4}, "returned dict"),
    "generator": (lambda c: (1.0 for _ in c), "returned generator"),
    "None": (None, "returned NoneType None"),
    "strings": (lambda c: ["1"] * len(c), "non-numeric reward at index 0: str '1'"),
    "nested": (lambda c: [[1.0]] * len(c), "non-numeric reward at index 0: list [1.0]"),
    "inf": (lambda c: [1.0, math.inf, 0.0, 0.0], "returned inf at index 1; rewards must be finite"),
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_malformed_reward_outputs_are_named(tiny_model_dir, prompt_dataset, tmp_path, case):
    value, message = BAD_OUTPUTS[case]
    trainer = GMPOTrainer(model=tiny_model_dir, reward_funcs=[returning(value)], train_dataset=prompt_dataset,
                          args=tiny_config(tmp_path))
    with pytest.raises(RewardFunctionError, match=r"reward function 'short_reward' ") as excinfo:
        rewards_of(trainer)
    assert message in str(excinfo.value)


@pytest.mark.parametrize("output", [
    [1, 0.5, None, math.nan],  # ints, floats, None and NaN (no reward)
    (True, False, 1.0, 0.0),  # a tuple of bools
    np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32),
    torch.tensor([0.1, 0.2, 0.3, 0.4]),
    [np.float64(0.5), torch.tensor(1.0), 2, None],
], ids=["mixed", "bools", "numpy", "tensor", "scalars"])
def test_valid_outputs_pass_through_as_grpo_reads_them(tiny_model_dir, prompt_dataset, tmp_path, output):
    ours, theirs = both_trainers(tiny_model_dir, prompt_dataset, tmp_path, [returning(lambda c: output)])
    assert_close(rewards_of(ours), rewards_of(theirs), rtol=0, atol=0, equal_nan=True)
