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
    The flag is reduced across processes, so every rank takes the same decision (sharded gradients included).
    Gradients held inside a DeepSpeed engine are not visible here; DeepSpeed applies its own overflow check.
    """

    def __init__(self, policy: str, accelerator):
        self.policy = policy
        self.accelerator = accelerator
        self.skipped = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        bad = torch.stack([~torch.isfinite(g).all() for g in grads]).any().float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bad.item():
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
