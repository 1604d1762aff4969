"""GMPO as verl's policy loss `loss_mode=gmpo`: verl's keyword contract in, `gmpo.gmpo_objective` inside.

Notation (one call = one micro-batch on one data-parallel rank):
    B, T: the micro-batch's rows and its padded response length (verl pads each micro-batch to its longest row)
    N: `global_batch_info["global_batch_size"]`, the rows of the whole mini-batch over all D ranks
       (ppo_mini_batch_size * rollout.n); D = `global_batch_info["dp_size"]`
    GMPO's mini-batch loss  L = -(1/N) sum_{i in mini-batch} A_i w_i        (gmpo.objective, Eq. 4 of the paper)

verl's FSDP engine back-propagates every micro-batch's loss unscaled, sums the gradients over a rank's micro-batches
and averages them over the D ranks. This loss therefore returns its micro-batch's share D * (-(1/N) sum_{i in B} A_i
w_i): summed over micro-batches and averaged over ranks it is L, for any split (equal, uneven, dynamic batching) and
any D, and rows verl adds as padding (no valid token) contribute exactly 0.
"""

import logging
import math

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from gmpo.objective import GMPOStats, gmpo_objective, row_advantages
from gmpo.verl.config import gmpo_options

logger = logging.getLogger(__name__)

# The verl aggregation whose name describes GMPO's: a mean over rows of a per-row (geometric) mean over tokens.
GMPO_LOSS_AGG_MODE = "seq-mean-token-mean"
_warned_agg_modes: set[str] = set()


@register_policy_loss("gmpo")
def compute_policy_loss_gmpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = GMPO_LOSS_AGG_MODE,
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of GMPO's mini-batch loss, and its metrics.

    Args:
        old_log_prob, log_prob: (B, T) log pi_old and log pi_theta of the response tokens; r_it = log_prob -
            old_log_prob (log space).
        advantages: (B, T) A_i broadcast over the row; must be constant over the row's valid tokens (ValueError
            otherwise: GMPO weights a whole row by one advantage).
        response_mask: (B, T) 1 (True) for the tokens in the mean, |o_i| = sum_t mask_it.
        loss_agg_mode: not an option of GMPO, whose aggregation is always the row mean above. Any value verl accepts
            is allowed (verl still applies it to its entropy and KL terms); a value other than
            "seq-mean-token-mean" logs a warning once per process and changes nothing here.
        config: verl's actor config. clip_ratio_low / clip_ratio_high: the log-space bounds eps_low / eps_high
            (ratio kept in (exp(-eps_low), exp(eps_high)); paper 0.4); clip_ratio_c: the dual clip delta (ratio
            space, caps every clipped log-ratio at log(delta), so w_i <= delta for A_i < 0 too); policy_loss.
            clip_level / length_normalization / mean_power: the variant (`gmpo.verl.GMPOPolicyLossConfig`);
            global_batch_info: N and D, set by verl's `ppo_loss` (without them N = B and D = 1; D > 1 without N is
            an error).
        rollout_is_weights: (B, T) detached rollout-correction weights u_it, or None; they enter w_i as token
            factors, w_i = M_p(exp(c_it) u_it), i.e. for p = 0 times the geometric mean of the row's u_it.

    Returns:
        (loss, metrics): loss = D * (-(1/N) sum_{i in B} A_i w_i), a scalar carrying gradient; metrics: detached
        0-d tensors (see `gmpo_metrics`; verl's `Metric` reads them to the host). The only host sync here is the
        check that the advantages are constant along each row.
    """
    if config is None:
        raise ValueError("loss_mode=gmpo needs verl's actor config (config=...): it holds the clip bounds.")
    options = gmpo_options(config)
    _warn_loss_agg_mode(loss_agg_mode)
    num_rows, dp_size = _global_batch(config.get("global_batch_info", None) or {}, log_prob.size(0))
    mask = response_mask.to(log_prob.dtype)
    log_ratio = log_prob - old_log_prob
    out = gmpo_objective(
        log_ratio,
        mask,
        row_advantages(advantages, mask),
        options.eps_low,
        options.eps_high,
        delta=options.delta,
        clip_level=options.clip_level,
        length_normalization=options.length_normalization,
        mean_power=options.mean_power,
        token_weight=rollout_is_weights,
        num_rows=num_rows,
    )
    return out.loss * dp_size, gmpo_metrics(out.stats, log_ratio, mask)


def _global_batch(info: dict, local_rows: int) -> tuple[int, int]:
    """(N, D) from verl's global_batch_info; N = the micro-batch's rows and D = 1 when verl did not set them."""
    dp_size = info.get("dp_size") or 1
    num_rows = info.get("global_batch_size")
    if num_rows is None:
        if dp_size > 1:
            raise ValueError(
                f"loss_mode=gmpo with dp_size={dp_size} needs config.global_batch_info['global_batch_size'] (the "
                "mini-batch's rows over all ranks), as verl's ppo_loss sets it; without it the ranks' shares of the "
                "loss are unknown."
            )
        num_rows = local_rows
    return int(num_rows), int(dp_size)


def _warn_loss_agg_mode(loss_agg_mode: str) -> None:
    if loss_agg_mode == GMPO_LOSS_AGG_MODE or loss_agg_mode in _warned_agg_modes:
        return
    _warned_agg_modes.add(loss_agg_mode)
    logger.warning(
        "loss_mode=gmpo ignores actor_rollout_ref.actor.loss_agg_mode=%r for the policy loss: GMPO's loss is always "
        "-(1/N) sum_i A_i w_i over the mini-batch's N rows. verl still applies the mode to its entropy and KL terms. "
        "Set actor_rollout_ref.actor.loss_agg_mode=%s to silence this warning.",
        loss_agg_mode,
        GMPO_LOSS_AGG_MODE,
    )


def gmpo_metrics(stats: GMPOStats, log_ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """This micro-batch's metrics in verl's names, as detached 0-d tensors (no host sync here).

    "Clip units" are tokens for clip_level="token" and rows for the sequence levels; the clip is one-sided by the
    advantage's sign, as the loss applies it:
        actor/pg_clipfrac         units with A_i > 0 and log-ratio > eps_high (held at the upper bound) / units
        actor/pg_clipfrac_lower   units with A_i < 0 and log-ratio < -eps_low (held at the lower bound) / units
        actor/ppo_kl              mean over valid tokens of -r_it (verl's own estimate)
        actor/gmpo/log_ratio_max, _min                         extremes of r_it over valid tokens
        actor/gmpo/seq_weight_mean, _max, _min                 of w_i over rows with a valid token
    The two clip fractions keep the meanings of verl's `geo_mean` (upper / lower bound), not vanilla PPO's (where
    pg_clipfrac_lower counts the dual clip), but count only the side the loss clips.
    A micro-batch without a valid token reports fractions 0, log-ratios 0 and weights 1 (the on-policy values), so
    it cannot turn verl's mean into inf or NaN.

    verl averages these unweighted over a rank's micro-batches, then over ranks (then mean, or max / min for names
    containing "max" / "min", over mini-batches). Exact for the mini-batch: every metric when each rank runs one
    micro-batch and D = 1; the fractions, ppo_kl and seq_weight_mean whenever every micro-batch has the same number
    of units (tokens / rows with a valid token), e.g. a sequence clip level with a fixed micro-batch size and no
    dynamic batching and no empty rows. Otherwise they are unweighted means of per-micro-batch values (approximate),
    and the max / min metrics are means of per-micro-batch extremes: between the smallest and largest micro-batch
    extreme, a lower bound for the true max and an upper bound for the true min.
    """
    units = stats.clip_units.clamp(min=1)
    rows = stats.num_rows
    valid = mask > 0
    tokens = valid.sum()
    neg_log_ratio = torch.where(valid, -log_ratio.detach(), 0.0).sum() / tokens.clamp(min=1)
    return {
        "actor/pg_clipfrac": stats.high_clipped / units,
        "actor/pg_clipfrac_lower": stats.low_clipped / units,
        "actor/ppo_kl": neg_log_ratio,
        "actor/gmpo/log_ratio_max": torch.where(stats.log_ratio_max == -math.inf, 0.0, stats.log_ratio_max),
        "actor/gmpo/log_ratio_min": torch.where(stats.log_ratio_min == math.inf, 0.0, stats.log_ratio_min),
        "actor/gmpo/seq_weight_mean": torch.where(rows > 0, stats.seq_weight_sum / rows.clamp(min=1), 1.0),
        "actor/gmpo/seq_weight_max": torch.where(rows > 0, stats.seq_weight_max, 1.0),
        "actor/gmpo/seq_weight_min": torch.where(rows > 0, stats.seq_weight_min, 1.0),
    }
