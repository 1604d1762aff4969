"""Guard rails around the optimizer step and the reward functions."""

import functools
import inspect
import logging

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

NONFINITE_GRAD_POLICIES = ("skip", "stop")


class NonFiniteGradientGuard(TrainerCallback):
    """Checks the gradients before every optimizer step; a NaN or inf anywhere never reaches the weights.

    policy "skip": every parameter's grad is set to None, so the optimizer leaves the weights (and its moments)
    untouched for that step; `skipped` counts such steps. policy "stop": RuntimeError.
    The check reads the global gradient norm (the one computed for clipping, else a reduced local norm), so every
    rank takes the same decision, sharded gradients included.
    Gradients held inside a DeepSpeed engine are not visible here; DeepSpeed applies its own overflow check.
    """

    def __init__(self, policy: str, accelerator):
        self.policy = policy
        self.accelerator = accelerator
        self.skipped = 0
        self.grad_norm = None  # set by the trainer when it has just computed the global norm for clipping

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        # Any NaN or inf makes the total norm non-finite. The clipping norm is already global; a local one is not.
        norm, self.grad_norm = self.grad_norm, None
        if norm is None:
            norm = torch.nn.utils.get_total_norm(grads)
            if self.accelerator.num_processes > 1:
                norm = self.accelerator.reduce(norm.reshape(1), reduction="sum")
        if bool(torch.isfinite(torch.as_tensor(norm)).all()):
            return
        step = state.global_step + 1
        if self.policy == "stop":
            raise RuntimeError(
                f"Non-finite gradient at optimizer step {step}: stopping (nonfinite_grad_policy='stop'). "
                "Set nonfinite_grad_policy='skip' to skip such steps instead."
            )
        for p in model.parameters():
            p.grad = None
        self.skipped += 1
        logger.warning(f"Non-finite gradient at optimizer step {step}: step skipped, weights unchanged "
                       f"(nonfinite_grad_policy='skip'; {self.skipped} skipped so far).")


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names it."""


def name_reward_errors(func, name: str):
    """`func` with any exception re-raised as RewardFunctionError naming the reward function."""

    def reraise(error):
        raise RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {error}") from error

    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_wrapper(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            except Exception as error:
                reraise(error)

        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as error:
            reraise(error)

    return wrapper
