"""GMPO's options in verl's config, and their validation.

The variants live in `actor_rollout_ref.actor.policy_loss`, which verl builds with Hydra's `instantiate` from its
`_target_`: verl's own `PolicyLossConfig` takes no extra keys, so the launch selects this subclass and adds the keys:

    actor_rollout_ref.actor.policy_loss.loss_mode=gmpo
    actor_rollout_ref.actor.policy_loss._target_=gmpo.verl.GMPOPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.clip_level=sequence_product
    +actor_rollout_ref.actor.policy_loss.length_normalization=false
    +actor_rollout_ref.actor.policy_loss.mean_power=-1.0

verl's driver builds the actor config in `verl.utils.config.validate_config` before any worker starts, so a bad
variant fails there (`GMPOPolicyLossConfig.__post_init__`). The clip bounds, `clip_ratio_c` and `loss_agg_mode` are
keys of the actor config, which offers no hook: the loss checks them at every call, in the worker.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

from verl.workers.config import PolicyLossConfig

from gmpo.objective import CLIP_LEVELS

_PREFIX = "actor_rollout_ref.actor"


class GMPOOptions(NamedTuple):
    eps_low: float  # log space: the ratio is kept above exp(-eps_low)
    eps_high: float  # log space: the ratio is kept below exp(eps_high)
    delta: float | None  # ratio space, > 1: every clipped log-ratio is capped at log(delta); None disables it
    clip_level: str
    length_normalization: bool
    mean_power: float


@dataclass
class GMPOPolicyLossConfig(PolicyLossConfig):
    """verl's `policy_loss` config plus GMPO's variants (validated on construction).

    Parameters:
        clip_level: where the one-sided log-space clip acts: "token" (the paper's method, Eq. 4), "sequence" (the
            row's mean log-ratio, GSPO-style) or "sequence_product" (the row's summed log-ratio, then 1/|o_i|; the
            paper's Table 4 sequence-level clip).
        length_normalization: keep the 1/|o_i| exponent of the geometric mean; False is the paper's ablation
            (w_i = product of the clipped ratios).
        mean_power: p of the power mean of the clipped token ratios; 0 is GMPO's geometric mean, 1 the arithmetic
            mean, -1 the harmonic mean. p != 0 needs clip_level="token" and length_normalization=True.
    """

    clip_level: str = "token"
    length_normalization: bool = True
    mean_power: float = 0.0

    def __post_init__(self):
        check_variant(self.clip_level, self.length_normalization, self.mean_power)
        defaults = (self.clip_level, self.length_normalization, self.mean_power) == ("token", True, 0.0)
        if self.loss_mode != "gmpo" and not defaults:
            raise ValueError(
                f"{_PREFIX}.policy_loss.clip_level / length_normalization / mean_power are GMPO's options and apply "
                f"only with {_PREFIX}.policy_loss.loss_mode=gmpo, got loss_mode={self.loss_mode!r}."
            )


def check_variant(clip_level, length_normalization, mean_power) -> None:
    """ValueError naming the verl key when the variant is not one GMPO defines."""
    key = f"{_PREFIX}.policy_loss"
    if clip_level not in CLIP_LEVELS:
        raise ValueError(f"{key}.clip_level must be one of {list(CLIP_LEVELS)}, got {clip_level!r}.")
    if not isinstance(length_normalization, bool):
        raise ValueError(f"{key}.length_normalization must be true or false, got {length_normalization!r}.")
    if isinstance(mean_power, bool) or not isinstance(mean_power, int | float) or not math.isfinite(mean_power):
        raise ValueError(
            f"{key}.mean_power is the exponent p of the power mean of the clipped token ratios and must be a finite "
            f"number (0 = geometric mean, 1 = arithmetic, -1 = harmonic), got {mean_power!r}."
        )
    if mean_power != 0 and (clip_level != "token" or not length_normalization):
        raise ValueError(
            f"{key}.mean_power={mean_power!r} needs clip_level='token' and length_normalization=true, got "
            f"clip_level={clip_level!r}, length_normalization={length_normalization!r}: the power mean is over a "
            "row's clipped token ratios, with its 1/|o_i|."
        )


def gmpo_options(config) -> GMPOOptions:
    """GMPO's arguments from verl's actor config (an `ActorConfig` or a DictConfig of the same keys), validated.

    clip_ratio_low / clip_ratio_high (each falling back to clip_ratio, as verl's losses do) are GMPO's log-space
    bounds; clip_ratio_c is the dual-clip cap delta. A plain `PolicyLossConfig` gives the default variant.
    """
    clip_ratio = config.get("clip_ratio", None)
    bounds = []
    for name in ("clip_ratio_low", "clip_ratio_high"):
        value = config.get(name, None)
        value = clip_ratio if value is None else value
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value < 0:
            raise ValueError(
                f"{_PREFIX}.{name} (or clip_ratio) is a GMPO clip bound in log space and must be a number >= 0 (inf "
                f"disables that side), got {value!r}. The paper uses 0.4: ratios in (exp(-0.4), exp(0.4))."
            )
        bounds.append(float(value))
    delta = config.get("clip_ratio_c", None)
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, int | float) or not delta > 1):
        raise ValueError(
            f"{_PREFIX}.clip_ratio_c is GMPO's dual-clip cap on the clipped ratio (ratio space) and must be > 1, or "
            f"null to disable it, got {delta!r}. verl's default is 3."
        )
    policy_loss = config.get("policy_loss", None) or {}
    clip_level = policy_loss.get("clip_level", "token")
    length_normalization = policy_loss.get("length_normalization", True)
    mean_power = policy_loss.get("mean_power", 0.0)
    check_variant(clip_level, length_normalization, mean_power)
    return GMPOOptions(
        eps_low=bounds[0],
        eps_high=bounds[1],
        delta=None if delta is None else float(delta),
        clip_level=clip_level,
        length_normalization=length_normalization,
        mean_power=float(mean_power),
    )
