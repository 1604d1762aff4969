"""GMPOConfig defaults, validation and documentation."""

import dataclasses
import math
import re

import pytest

from gmpo import GMPOConfig

from .conftest import tiny_config

GMPO_FIELDS = ["epsilon", "epsilon_high", "delta", "loss_type", "importance_sampling_level", "length_normalization",
               "mean_power", "skip_zero_advantage_rows", "nonfinite_grad_policy", "stale_sampler_policy",
               "stale_sampler_threshold"]


def test_defaults_follow_the_paper(tmp_path):
    config = tiny_config(tmp_path)
    assert config.epsilon == 0.4 and config.epsilon_high == 0.4  # log space: ratios in (e^-0.4, e^0.4)
    assert config.loss_type == "gmpo" and config.importance_sampling_level == "token"
    assert config.length_normalization is True and config.delta is None
    assert config.mean_power == 0.0  # the geometric mean


def test_epsilon_high_can_differ_and_infinity_disables_the_clip(tmp_path):
    assert tiny_config(tmp_path, epsilon=0.2, epsilon_high=0.3).epsilon_high == 0.3
    assert tiny_config(tmp_path, epsilon=math.inf).epsilon_high == math.inf


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epsilon", -0.1, "`epsilon`.*>= 0"),
        ("epsilon", math.nan, "`epsilon`.*>= 0"),
        ("epsilon_high", -1.0, "`epsilon_high`.*>= 0"),
        ("delta", 0.9, "`delta`.*> 1"),
        ("delta", math.nan, "`delta`.*> 1"),
        ("loss_type", "dapo", "`loss_type` must be 'gmpo'.*got 'dapo'"),
        ("importance_sampling_level", "row", r"`importance_sampling_level`.*\['token', 'sequence', 'sequence_product'\].*got 'row'"),
        ("length_normalization", "yes", "`length_normalization` must be True or False"),
        ("mean_power", math.nan, "`mean_power`.*finite number.*got nan"),
        ("mean_power", math.inf, "`mean_power`.*finite number.*got inf"),
        ("mean_power", "1", "`mean_power`.*finite number.*got '1'"),
        ("skip_zero_advantage_rows", 1, "`skip_zero_advantage_rows` must be True or False"),
        ("nonfinite_grad_policy", "ignore", r"`nonfinite_grad_policy`.*\['skip', 'stop'\].*got 'ignore'"),
        ("stale_sampler_policy", "raise", r"`stale_sampler_policy`.*\['stop', 'warn', 'off'\].*got 'raise'"),
        ("stale_sampler_threshold", 0.0, "`stale_sampler_threshold`.*> 0, got 0.0"),
        ("stale_sampler_threshold", math.inf, "`stale_sampler_threshold`.*finite number > 0, got inf"),
        ("stale_sampler_threshold", "0.1", "`stale_sampler_threshold`.*got '0.1'"),
    ],
)
def test_invalid_values_name_the_field_and_the_valid_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **{field: value})


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(importance_sampling_level="sequence"), "`mean_power`=1.0 needs `importance_sampling_level`='token'"),
        (dict(importance_sampling_level="sequence_product"), "`mean_power`=1.0 needs `importance_sampling_level`"),
        (dict(length_normalization=False), "`mean_power`=1.0 needs `length_normalization`=True"),
    ],
)
def test_mean_power_without_a_token_mean_is_rejected(tmp_path, other, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, mean_power=1.0, **other)
    tiny_config(tmp_path, mean_power=0.0, **other)  # the geometric mean combines with both


def test_sequence_levels_and_powers_are_accepted(tmp_path):
    assert tiny_config(tmp_path, importance_sampling_level="sequence_product").importance_sampling_level == (
        "sequence_product")
    assert tiny_config(tmp_path, mean_power=-1).mean_power == -1.0


def test_clip_can_act(tmp_path):
    assert tiny_config(tmp_path, steps_per_generation=2).clip_can_act
    assert tiny_config(tmp_path, steps_per_generation=1, num_iterations=2).clip_can_act
    assert not tiny_config(tmp_path, steps_per_generation=1).clip_can_act
    assert not tiny_config(tmp_path, steps_per_generation=2, gradient_accumulation_steps=4).clip_can_act


def normalise(text):
    return re.sub(r"\s+", " ", text.replace("`", "")).strip()


@pytest.mark.parametrize("name", GMPO_FIELDS)
def test_help_and_docstring_agree(name):
    field = {f.name: f for f in dataclasses.fields(GMPOConfig)}[name]
    docstring = normalise(GMPOConfig.__doc__)
    assert normalise(field.metadata["help"]) in docstring, f"{name}: help text and class docstring disagree"
    default = repr(field.default) if not isinstance(field.default, str) else f'"{field.default}"'
    if field.default is not None:
        assert f"{name} (" in docstring and f"defaults to {default}".replace('"', "") in docstring.replace('"', "")
