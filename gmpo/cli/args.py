"""Arguments of `gmpo train`: TRL's parser over our script arguments, `GMPOConfig` and `trl.ModelConfig`.

Precedence, lowest first: TRL's defaults, the built-in task's preset (only when no `--dataset_name` is given), the
`--config` YAML file, the command-line flags.
"""

import math
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from trl import ModelConfig, ScriptArguments, TrlParser

from gmpo import GMPOConfig
from gmpo.cli.exit_status import UsageError
from gmpo.cli.flags import check_config_keys, check_no_leftovers, split_config_flag
from gmpo.cli.preflight import missing_package_at_parse
from gmpo.cli.presets import TASK_PRESETS


@dataclass
class GMPOScriptArguments(ScriptArguments):
    """
    Script arguments of `gmpo train`, on top of TRL's [`~trl.ScriptArguments`] (`dataset_name`, `dataset_config`,
    `dataset_train_split`, `dataset_test_split`, `dataset_streaming`).

    Parameters:
        task (`str`, *optional*):
            Built-in synthetic task trained when no `dataset_name` is given; defaults to 'addition'. Selects the
            task's dataset, reward, shipped policy and preset hyperparameters.
        reward_funcs (`list[str]`, *optional*):
            Reward functions: names from gmpo.cli.rewards.REWARDS (exact_match, char_accuracy, accuracy_reward, ...)
            or dotted import paths 'package.module.function'. Combine several with `reward_weights`.
        train_size (`int`, *optional*, defaults to `20000`):
            Rows of the built-in task's training set.
        eval_size (`int`, *optional*, defaults to `800`):
            Prompts of the built-in task's held-out split used for greedy accuracy.
        accuracy_steps (`int`, *optional*, defaults to `25`):
            Measure held-out greedy accuracy every this many optimizer steps (built-in task; before and after
            training always). 0 measures only before and after.
        num_threads (`int`, *optional*):
            torch.set_num_threads before training; `None` keeps torch's default.
        dry_run (`bool`, *optional*, defaults to `False`):
            Print the resolved configuration, including optimizer steps per rollout and whether the clip can act,
            and exit without loading a model or dataset.
    """

    task: str | None = field(
        default=None,
        metadata={
            "help": "Built-in synthetic task trained when no `dataset_name` is given; defaults to 'addition'. "
            "Selects the task's dataset, reward, shipped policy and preset hyperparameters."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: names from gmpo.cli.rewards.REWARDS (exact_match, char_accuracy, "
            "accuracy_reward, ...) or dotted import paths 'package.module.function'. Combine several with "
            "`reward_weights`."
        },
    )
    train_size: int = field(default=20000, metadata={"help": "Rows of the built-in task's training set."})
    eval_size: int = field(
        default=800, metadata={"help": "Prompts of the built-in task's held-out split used for greedy accuracy."}
    )
    accuracy_steps: int = field(
        default=25,
        metadata={
            "help": "Measure held-out greedy accuracy every this many optimizer steps (built-in task; before and "
            "after training always). 0 measures only before and after."
        },
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads before training; `None` keeps torch's default."}
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Print the resolved configuration, including optimizer steps per rollout and whether the clip "
            "can act, and exit without loading a model or dataset."
        },
    )

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        for name, low in (("train_size", 1), ("eval_size", 1), ("accuracy_steps", 0), ("num_threads", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value}")


class GMPOParser(TrlParser):
    """TrlParser whose argparse errors become a `UsageError` (one line, exit 2) instead of usage + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see gmpo train --help)")


def _parse(parser: GMPOParser, argv: list[str], strict: bool = True):
    """The dataclasses `parser` fills from `argv` and its `--config` file; with `strict`, any flag or config key the
    parser does not know is a UsageError naming the closest valid one."""
    import yaml

    argv, config_path = split_config_flag(argv)
    if config_path is not None and not os.path.isfile(config_path):
        raise UsageError(f"--config {config_path!r}: no such file (pass the path of a YAML recipe)")
    try:
        *groups, from_config, from_flags = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ImportError as err:  # TrainingArguments loads DeepSpeed's package while it parses
        raise UsageError(missing_package_at_parse(err)) from err
    except (ValueError, OSError, yaml.YAMLError) as err:  # a config's __post_init__, a missing or malformed YAML file
        raise UsageError(" ".join(str(err).split())) from None
    if strict:
        check_no_leftovers(from_flags, [*parser._option_string_actions, "--config"], "see gmpo train --help")
        check_config_keys(from_config, [action.dest for action in parser._actions], config_path)
    return tuple(groups)


def parse_train_args(argv: list[str]) -> tuple[GMPOScriptArguments, GMPOConfig, ModelConfig]:
    """Script, training and model arguments, with the built-in task's preset under the YAML file and the flags."""
    probe = GMPOParser([GMPOScriptArguments], add_help=False, allow_abbrev=False)
    (script_args,) = _parse(probe, argv, strict=False)
    preset = {}
    if script_args.dataset_name is None:
        task = script_args.task or "addition"
        if task not in TASK_PRESETS:
            raise UsageError(f"--task {task!r} has no built-in preset; valid tasks are {sorted(TASK_PRESETS)}")
        from gmpo.tasks import policy_path

        try:
            model = str(policy_path(task))
        except ValueError as err:  # the package was installed without its assets
            raise UsageError(str(err)) from None
        preset = {**installed_preset(task), "task": task, "model_name_or_path": model}
    elif script_args.task is not None:
        raise UsageError(
            f"--task {script_args.task!r} and --dataset_name {script_args.dataset_name!r} exclude each other: --task "
            "trains a built-in task, --dataset_name your dataset"
        )
    if script_args.dry_run and not _has_gpu():
        # TrainingArguments rejects bf16 without a GPU unless use_cpu is set; a dry run resolves a GPU recipe anyway.
        preset.setdefault("use_cpu", True)
    parser = GMPOParser([GMPOScriptArguments, GMPOConfig, ModelConfig], prog="gmpo train", allow_abbrev=False)
    parser.set_defaults_with_config(**preset)
    return _parse(parser, argv)


def installed_preset(task: str) -> dict:
    """TASK_PRESETS[task] with the checkpointing switch under the name the installed transformers gives it:
    `activation_checkpointing` in recent releases, `gradient_checkpointing` before (vLLM's pins keep transformers
    below 5.18)."""
    preset = dict(TASK_PRESETS[task])
    if "activation_checkpointing" in preset and "activation_checkpointing" not in GMPOConfig.__dataclass_fields__:
        preset["gradient_checkpointing"] = preset.pop("activation_checkpointing")
    return preset


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def rollout_summary(args: GMPOConfig) -> dict:
    """How rollouts map onto optimizer steps under TRL's semantics.

    One generation produces `generation_batch_size` completions (all processes), split into `steps_per_generation`
    micro-batches, each used `num_iterations` times; an optimizer step takes `gradient_accumulation_steps`
    micro-batches. So a rollout feeds steps_per_generation * num_iterations / gradient_accumulation_steps optimizer
    steps, and the clip acts only when an optimizer step falls between a rollout and its use.
    """
    steps = Fraction(args.steps_per_generation * args.num_iterations, args.gradient_accumulation_steps)
    return {
        "num_processes": args.world_size,
        "prompts_per_rollout": args.generation_batch_size // args.num_generations,
        "completions_per_rollout": args.generation_batch_size,
        "completions_per_optimizer_step": args.per_device_train_batch_size
        * args.world_size
        * args.gradient_accumulation_steps,
        "optimizer_steps_per_rollout": int(steps) if steps.denominator == 1 else float(steps),
        "clip_can_act": args.clip_can_act,
        "clip_ratio_range": [math.exp(-args.epsilon), math.exp(args.epsilon_high)],
    }


def describe_rollouts(args: GMPOConfig) -> str:
    """One line for the console, e.g. '256 prompts x 8 per rollout, 8 optimizer steps per rollout, clip acts'."""
    info = rollout_summary(args)
    low, high = info["clip_ratio_range"]
    clip = f"the clip can act, ratio kept in ({low:.3f}, {high:.3f})" if info["clip_can_act"] else (
        "on-policy: the clip cannot act (every ratio is 1)"
    )
    return (
        f"{info['prompts_per_rollout']} prompts x {args.num_generations} completions per rollout, "
        f"{info['optimizer_steps_per_rollout']} optimizer steps per rollout of "
        f"{info['completions_per_optimizer_step']} completions each; {clip}"
    )


def resolved_config(script_args, training_args: GMPOConfig, model_args: ModelConfig) -> dict:
    """Everything `--dry-run` prints: the three argument groups and the derived rollout quantities."""
    return {
        "script": asdict(script_args),
        "model": asdict(model_args),
        "training": training_args.to_dict(),
        "derived": rollout_summary(training_args),
    }
