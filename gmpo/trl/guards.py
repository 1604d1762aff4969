"""Guard rails around the optimizer step and the reward functions."""

import functools
import logging
import math

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback
from trl.trainer.utils import is_async_callable

logger = logging.getLogger(__name__)

NONFINITE_GRAD_POLICIES = ("skip", "stop")


class NonFiniteGradientError(RuntimeError):
    """A gradient held NaN or inf with nonfinite_grad_policy="stop"; the message names the optimizer step."""


class NonFiniteGradientGuard(TrainerCallback):
    """Checks the gradients before every optimizer step; a NaN or inf anywhere never reaches the weights.

    policy "skip": every parameter's grad is set to None, so the optimizer leaves the weights (and its moments)
    untouched for that step; `skipped` counts such steps. policy "stop": `NonFiniteGradientError` (a RuntimeError).
    The check reads the global gradient norm (the one computed for clipping, else a reduced local norm), so every
    rank takes the same decision, sharded gradients included.

    Under DeepSpeed the engine holds the gradients and steps inside `backward`, before this hook runs; it skips a step
    whose global gradient norm is NaN/inf itself (DeepSpeed 0.19: always, unless a bf16 run of ZeRO-0/1/2 sets
    `"bf16": {"check_grad_overflow": false}`). The guard then reads the engine's global norm and whether it skipped:
    "skip" counts and warns, "stop" raises; a non-finite step the engine applied raises whatever the policy.
    """

    def __init__(self, policy: str, accelerator):
        self.policy = policy
        self.accelerator = accelerator
        self.skipped = 0
        self.grad_norm = None  # set by the trainer when it has just computed the global norm for clipping

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            return self._after_deepspeed_step(state)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        # Any NaN or inf makes the total norm non-finite. The clipping norm is already global; a local one is not.
        norm, self.grad_norm = self.grad_norm, None
        if norm is None:
            norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(norm, "full_tensor"):  # FSDP2's DTensor shards: the norm of the whole gradient, already global
                norm = norm.full_tensor()
            elif self.accelerator.num_processes > 1:
                norm = self.accelerator.reduce(norm.reshape(1), reduction="sum")
        if bool(torch.isfinite(torch.as_tensor(norm)).all()):
            return
        self._skip_or_stop(state.global_step + 1)
        for p in model.parameters():
            p.grad = None

    def _skip_or_stop(self, step: int) -> None:
        if self.policy == "stop":
            raise NonFiniteGradientError(
                f"Non-finite gradient at optimizer step {step}: stopping (nonfinite_grad_policy='stop'). "
                "Set nonfinite_grad_policy='skip' to skip such steps instead."
            )
        self.skipped += 1
        logger.warning(f"Non-finite gradient at optimizer step {step}: step skipped, weights unchanged "
                       f"(nonfinite_grad_policy='skip'; {self.skipped} skipped so far).")

    def _after_deepspeed_step(self, state) -> None:
        norm = self.accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        if norm is None or math.isfinite(float(norm)):
            return
        step = state.global_step + 1
        if not self.accelerator.optimizer_step_was_skipped:
            raise NonFiniteGradientError(
                f"Non-finite gradient at optimizer step {step} (global norm {norm}), and DeepSpeed applied the step: "
                "the weights may hold NaN/inf. DeepSpeed skips such steps unless its overflow check is off (ZeRO "
                'stages 0-2 in bf16 with "bf16": {"check_grad_overflow": false}); set "check_grad_overflow": true in '
                f"the DeepSpeed config so that nonfinite_grad_policy={self.policy!r} can act."
            )
        self._skip_or_stop(step)


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something that is not one reward per completion; the message names it."""


def reward_output_problem(output, num_completions: int | None) -> str | None:
    """What is wrong with a reward function's return value, or None when TRL can use it.

    Valid: a sized, non-string sequence (list, tuple, 1-D array or tensor) with one entry per completion, each entry
    None (no reward) or a finite number (anything with __float__ but str/bytes: int, float, bool, NumPy scalar, 0-d
    tensor). NaN is accepted: TRL reads it as None.
    """
    if isinstance(output, str | bytes | dict) or not hasattr(output, "__len__") or not hasattr(output, "__iter__"):
        return f"returned {_describe(output)}; it must return a list with one reward (a float, or None) per completion"
    if num_completions is not None and len(output) != num_completions:
        return (f"returned {len(output)} rewards for {num_completions} completions; it must return exactly one reward "
                "(a float, or None) per completion")
    for index, value in enumerate(output):
        if value is None:
            continue
        if isinstance(value, str | bytes) or not hasattr(value, "__float__"):
            return f"returned a non-numeric reward at index {index}: {_describe(value)}; rewards are floats, or None"
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"returned a reward that is not one number at index {index}: {_describe(value)}"
        if math.isinf(number):
            return (f"returned {number} at index {index}; rewards must be finite (None or NaN marks a completion "
                    "without a reward)")
    return None


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def name_reward_errors(func, name: str):
    """`func` wrapped so that an exception it raises, or an output `reward_output_problem` rejects, becomes a
    RewardFunctionError naming it. Synchronous or asynchronous exactly as TRL's `is_async_callable` sees `func`
    (functions, partials, objects with a sync or async __call__), so TRL calls the wrapper as it would call `func`."""

    def checked(output, kwargs):
        completions = kwargs.get("completions")
        problem = reward_output_problem(output, None if completions is None else len(completions))
        if problem is not None:
            raise RewardFunctionError(f"reward function {name!r} {problem}")
        return output

    def reraise(error):
        raise RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {error}") from error

    if is_async_callable(func):

        @functools.wraps(func)
        async def async_wrapper(*args, **kwargs):
            try:
                output = await func(*args, **kwargs)
            except Exception as error:
                reraise(error)
            return checked(output, kwargs)

        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            output = func(*args, **kwargs)
        except Exception as error:
            reraise(error)
        return checked(output, kwargs)

    return wrapper
