"""Reward functions by name (`--reward_funcs`): the built-in tasks' rewards, `trl.rewards`, or a dotted import path.

Only the functions a run names are imported. TRL calls each as ``f(prompts=, completions=, completion_ids=,
**dataset_columns)``, so a reward's required keyword arguments must be columns of the training dataset.
"""

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable

from gmpo.cli.exit_status import UsageError

# name -> (module, attribute, factory arguments from the config or None for a plain function, required package).
# The three TRL factories are sized from max_completion_length; soft_overlong_punishment uses DAPO's ratio
# (a 4096-token soft zone before the 20480-token limit, i.e. the last 20%).
REWARDS = {
    "exact_match": ("gmpo.tasks", "exact_match_reward", None, None),
    "char_accuracy": ("gmpo.tasks", "char_accuracy_reward", None, None),
    "accuracy_reward": ("trl.rewards", "accuracy_reward", None, "math_verify"),
    "reasoning_accuracy_reward": ("trl.rewards", "reasoning_accuracy_reward", None, "math_verify"),
    "think_format_reward": ("trl.rewards", "think_format_reward", None, None),
    "cosine_scaled_reward": (
        "trl.rewards", "get_cosine_scaled_reward", lambda args: {"max_len": args.max_completion_length}, "math_verify"
    ),
    "soft_overlong_punishment": (
        "trl.rewards",
        "get_soft_overlong_punishment",
        lambda args: {
            "max_completion_len": args.max_completion_length,
            "soft_punish_cache": args.max_completion_length // 5,
        },
        None,
    ),
    "repetition_penalty_reward": ("trl.rewards", "get_repetition_penalty_reward", lambda args: {}, None),
}
# Keyword arguments TRL supplies itself; every other required parameter must be a dataset column.
TRAINER_KWARGS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


def resolve_reward(name: str, training_args, require_packages: bool = True) -> Callable:
    """The reward function `name` names: a key of `REWARDS` or a dotted path ``package.module.function``.

    A registry reward whose package is missing is an error, or only a note on stderr without `require_packages`.
    """
    if name in REWARDS:
        module_name, attr, factory_kwargs, package = REWARDS[name]
        if package is not None and importlib.util.find_spec(package) is None:
            message = f"reward {name!r} needs the {package!r} package: pip install {package.replace('_', '-')}"
            if require_packages:
                raise UsageError(message)
            print(f"note: {message}", file=sys.stderr)
        func = getattr(importlib.import_module(module_name), attr)
        return func if factory_kwargs is None else func(**factory_kwargs(training_args))
    if "." not in name:
        raise UsageError(
            f"unknown reward function {name!r}; valid names are {sorted(REWARDS)}, or a dotted import path such as "
            "'my_package.rewards.my_reward'"
        )
    module_name, attr = name.rsplit(".", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `trl grpo` does: a module in the working directory is importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"cannot import module {module_name!r} for reward {name!r}: {err}") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise UsageError(f"module {module_name!r} has no function {attr!r} (from --reward_funcs {name!r})")
    return func


def resolve_rewards(names: list[str], training_args, require_packages: bool = True) -> list[Callable]:
    """All of `names`, checked against `training_args.reward_weights` (one weight per function, or none)."""
    funcs = [resolve_reward(name, training_args, require_packages) for name in names]
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(funcs):
        raise UsageError(
            f"--reward_weights has {len(weights)} values {weights} but --reward_funcs names {len(funcs)} functions "
            f"{names}; give one weight per reward function, or none for equal weights"
        )
    return funcs


def check_reward_columns(names: list[str], funcs: list[Callable], columns: list[str] | None, dataset: str) -> None:
    """Each reward's required keyword arguments must be dataset columns (TRL passes the columns by name)."""
    if columns is None:  # a streamed dataset does not know its columns in advance
        return
    for name, func in zip(names, funcs):
        params = inspect.signature(func).parameters.values()
        needed = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [n for n in needed if n not in TRAINER_KWARGS and n not in columns]
        if missing:
            raise UsageError(
                f"reward {name!r} needs the column(s) {missing}, which dataset {dataset!r} lacks; its columns are "
                f"{columns}"
            )
