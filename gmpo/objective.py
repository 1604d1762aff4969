"""The GMPO objective (Zhao et al., arXiv 2507.20673, Eq. 4) and its power-mean family, as pure functions of tensors.

Notation:
    B: rows (completions) in the micro-batch;  T: completion length (padded);  S_i: row i's valid tokens, |o_i| = |S_i|
    r_it = log pi_theta(o_it) - log pi_old(o_it)          log space
    c_it = min(r_it, eps_high) if A_i > 0 else max(r_it, -eps_low)
           (the one-sided PPO clip of the ratio to (exp(-eps_low), exp(eps_high)), written in log space)
    w_i  = exp( (1/|o_i|) sum_t c_it )                     p = 0: geometric mean of the clipped token ratios (GMPO)
    w_i  = ( (1/|o_i|) sum_t exp(c_it)^p )^(1/p)           p != 0: power mean (p = 1 GRPO's arithmetic mean,
                                                           p = -1 the authors' harmonic mean, `hmpo`)
    loss = -(1/B) sum_i  v_i * A_i * w_i                   v_i: optional per-row weight (IS correction, masks)

Clip levels: "token" clips each r_it (the paper's method); "sequence" clips the mean (1/|o_i|) sum_t r_it (GSPO's
length-normalised sequence ratio, TRL's importance_sampling_level="sequence"); "sequence_product" clips the sum
sum_t r_it = log pi_theta(o_i)/pi_old(o_i) and then divides by |o_i| (the paper's Table 4 sequence-level clip, the
authors' `gmpo_seqclip`). Nothing here imports TRL; the trainer gathers the inputs and logs the statistics.
"""

import math
from typing import NamedTuple

import torch

CLIP_LEVELS = ("token", "sequence", "sequence_product")


class GMPOStats(NamedTuple):
    """Detached local statistics of one call; counts are sums so that they reduce across processes by addition.

    "Clip units" are tokens for the token-level clip and rows for both sequence-level clips (the unit's log-ratio is
    r_it, the row's mean log-ratio, or the row's summed log-ratio).
    """

    log_ratio_max: torch.Tensor  # max r_it over valid tokens; -inf when there is none
    log_ratio_min: torch.Tensor  # min r_it over valid tokens; +inf when there is none
    low_clipped: torch.Tensor  # clip units with A < 0 and unit log-ratio < -eps_low
    high_clipped: torch.Tensor  # clip units with A > 0 and unit log-ratio > eps_high
    clip_units: torch.Tensor  # clip units that were checked
    seq_weight_sum: torch.Tensor  # sum of w_i over rows with at least one valid token
    seq_weight_max: torch.Tensor  # -inf when no row has a valid token
    seq_weight_min: torch.Tensor  # +inf when no row has a valid token
    num_rows: torch.Tensor  # rows with at least one valid token
    log_ratio_sum: torch.Tensor  # sum of r_it over valid tokens
    num_tokens: torch.Tensor  # valid tokens (the sum of |o_i|)


class GMPOOutput(NamedTuple):
    loss: torch.Tensor  # scalar, -(1/N) sum_i v_i A_i w_i
    per_row_loss: torch.Tensor  # (B,), -v_i A_i w_i; exactly 0 for a row without valid tokens
    seq_weight: torch.Tensor  # (B,), w_i (carries gradient); 1 for a row without valid tokens
    stats: GMPOStats


def sign_aware_clip(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """PPO's one-sided clip in log space: min(r, eps_high) where A > 0, else max(r, -eps_low).

    `advantages` broadcasts against `log_ratio`. A clipped entry carries no gradient.
    """
    return torch.where(advantages > 0, log_ratio.clamp(max=eps_high), log_ratio.clamp(min=-eps_low))


def masked_geometric_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp( sum_t m_t log x_t / sum_t m_t ) per row, for positive `values` (B, T); 1 for a row with no valid entry."""
    valid = mask > 0
    log_values = torch.where(valid, values, 1.0).log()
    return torch.exp(log_values.sum(-1) / valid.sum(-1).clamp(min=1))


def log_power_mean(log_x: torch.Tensor, valid: torch.Tensor, power: float) -> torch.Tensor:
    """log of ((1/n_i) sum_{t in valid_i} x_it^p)^(1/p) per row, from log x (B, T); p = 0 the geometric mean.

    Log space throughout, centred on m_i = mean_t log x_it: log M_p = m_i + log(mean_t exp(p (log x_it - m_i))) / p,
    the last term by log1p(mean(expm1(.))) when every |p (log x_it - m_i)| <= 1 (accurate for small |p|) and by
    logsumexp otherwise (no overflow for any row length or |p|). log x_it = -inf (x_it = 0) is allowed for p > 0
    (the token adds 0 to the sum). A row with no valid entry gives 0; a row whose entries are all -inf gives -inf.
    """
    count = valid.sum(-1)
    n = count.clamp(min=1).to(log_x.dtype)
    if power == 0:
        return torch.where(valid, log_x, 0.0).sum(-1) / n
    finite = valid & (log_x > -math.inf)
    center = torch.where(finite, log_x, 0.0).sum(-1, keepdim=True) / finite.sum(-1, keepdim=True).clamp(min=1)
    d = torch.where(valid, power * (log_x - center), -math.inf)
    alive = (d > -math.inf).any(-1, keepdim=True)
    near = torch.where(valid, d.abs(), 0.0).amax(-1) <= 1.0
    small = torch.log1p(torch.where(valid, torch.expm1(d.clamp(-1.0, 1.0)), 0.0).sum(-1) / n) / power
    large = (torch.logsumexp(torch.where(alive, d, 0.0), dim=-1) - n.log()) / power  # no all -inf softmax
    log_mean = center.squeeze(-1) + torch.where(near, small, large)
    return torch.where(count == 0, 0.0, torch.where(alive.squeeze(-1), log_mean, -math.inf))


def row_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) advantages from (B,) or (B, T); a (B, T) tensor must be constant over each row's valid tokens."""
    if advantages.dim() == 1:
        return advantages
    if advantages.dim() != 2:
        raise ValueError(f"advantages must have shape (B,) or (B, T), got {tuple(advantages.shape)}")
    if advantages.size(1) == 1:
        return advantages[:, 0]
    valid = _valid(mask)
    highest = torch.where(valid, advantages, -math.inf).amax(-1)  # -inf for a row without a valid token
    if bool((valid & (advantages != highest.unsqueeze(-1))).any()):
        raise ValueError(
            "GMPO weights a whole row by one advantage A_i, but the (B, T) advantages vary along a row's valid "
            "tokens. Provide one advantage per completion (shape (B,), or (B, T) constant along each row)."
        )
    return torch.where(highest == -math.inf, 0.0, highest)


def gmpo_objective(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    *,
    delta: float | None = None,
    clip_level: str = "token",
    length_normalization: bool = True,
    mean_power: float = 0.0,
    token_weight: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    num_rows: int | None = None,
) -> GMPOOutput:
    """GMPO loss and statistics for one micro-batch.

    Args:
        log_ratio: (B, T) r_it = log pi_theta - log pi_old. Entries outside `mask` are ignored (may be NaN).
        mask: (B, T) 1 for tokens that enter the mean (completion, tool and entropy masks), else 0.
            |o_i| = sum_t mask_it.
        advantages: (B,) A_i, one scalar per row.
        eps_low, eps_high: clip bounds in log space, >= 0 (inf disables that side); the ratio is kept in
            (exp(-eps_low), exp(eps_high)), paper default 0.4 for both.
        delta: dual clip, in ratio space (> 1): after the sign-aware clip every clipped unit's log-ratio (token, mean
            or sum) is capped at log(delta), which bounds w_i for negative advantages too. None disables it.
        clip_level: "token" (Eq. 4, the paper's method), "sequence" (clip the row's mean log-ratio
            (1/|o_i|) sum_t r_it, GSPO-style) or "sequence_product" (clip the row's sum sum_t r_it, then divide by
            |o_i|: w_i = exp(clip(sum_t r_it) / |o_i|), the paper's Table 4 sequence-level clip).
        length_normalization: False drops the 1/|o_i| exponent (Table 4 ablation: w_i = prod_t of the clipped
            ratios; it can overflow on long rows, which is what the ablation shows). Needs mean_power == 0.
        mean_power: p of the power mean over the clipped token ratios; 0 is the geometric mean. p != 0 needs the
            token clip level and length normalisation.
        token_weight: (B, T) detached per-token factors >= 0 (vLLM token IS weights), multiplied into each token's
            clipped ratio inside the mean: w_i = M_p(exp(c_it) * u_it). A factor 0 stays in the mean as a 0 when
            p > 0 (it counts in |o_i|); when p <= 0, and for the sequence levels, that token leaves S_i instead.
        row_weight: (B,) detached multiplier v_i of row i's term (sequence IS correction, off-policy mask).
        num_rows: N, the number of rows the loss is averaged over; defaults to B. Larger than B when rows that
            cannot contribute (A_i = 0) were left out of the batch.

    Returns:
        GMPOOutput with `loss` = -(1/N) sum_i v_i A_i w_i, a plain mean over the rows; rows without valid
        tokens contribute exactly 0.
    """
    if clip_level not in CLIP_LEVELS:
        raise ValueError(f"clip_level must be one of {CLIP_LEVELS}, got {clip_level!r}")
    if mean_power != 0 and (clip_level != "token" or not length_normalization):
        raise ValueError(
            f"mean_power={mean_power!r} needs clip_level='token' and length_normalization=True, got "
            f"clip_level={clip_level!r}, length_normalization={length_normalization!r}"
        )
    dtype = torch.promote_types(log_ratio.dtype, torch.float32)
    valid = _valid(mask)
    if token_weight is not None:
        token_weight = token_weight.detach().to(dtype)
        if mean_power <= 0 or clip_level != "token":
            valid = valid & (token_weight > 0)  # a zero factor would zero the whole mean: the token leaves S_i
        log_token_weight = torch.where(token_weight > 0, token_weight, 1.0).log()
        log_token_weight = torch.where(token_weight > 0, log_token_weight, -math.inf)
    log_ratio = torch.where(valid, log_ratio.to(dtype), 0.0)
    advantages = advantages.to(dtype)
    token_count = valid.sum(-1)  # (B,)
    has_tokens = token_count > 0
    length = token_count.clamp(min=1).to(dtype) if length_normalization else 1.0
    log_cap = math.log(delta) if delta is not None else math.inf

    if clip_level == "token":
        clipped = sign_aware_clip(log_ratio, advantages.unsqueeze(-1), eps_low, eps_high).clamp(max=log_cap)
        if not length_normalization:
            log_seq_weight = torch.where(valid, clipped, 0.0).sum(-1)
            if token_weight is not None:  # the IS factors keep their geometric mean
                log_seq_weight = log_seq_weight + log_power_mean(log_token_weight, valid, 0.0)
        else:
            if token_weight is not None:
                clipped = clipped + log_token_weight
            log_seq_weight = log_power_mean(clipped, valid, mean_power)
        unit_log_ratio, unit_valid, unit_adv = log_ratio, valid, advantages.unsqueeze(-1)
    else:
        summed = log_ratio.sum(-1)
        if clip_level == "sequence":  # clip the mean log-ratio: the geometric mean is kept in the clip range
            unit_log_ratio = summed / length
            log_seq_weight = sign_aware_clip(unit_log_ratio, advantages, eps_low, eps_high).clamp(max=log_cap)
        else:  # clip the log of the whole-sequence ratio, then take the 1/|o_i| power
            unit_log_ratio = summed
            log_seq_weight = sign_aware_clip(summed, advantages, eps_low, eps_high).clamp(max=log_cap) / length
        if token_weight is not None:
            log_seq_weight = log_seq_weight + log_power_mean(log_token_weight, valid, 0.0)
        unit_valid, unit_adv = has_tokens, advantages

    seq_weight = torch.exp(torch.where(has_tokens, log_seq_weight, 0.0))
    row_term = advantages * seq_weight
    if row_weight is not None:
        row_term = row_term * row_weight.to(dtype)
    per_row_loss = torch.where(has_tokens, -row_term, 0.0)
    loss = per_row_loss.sum() / max(num_rows if num_rows is not None else per_row_loss.numel(), 1)

    with torch.no_grad():
        low = unit_valid & (unit_adv < 0) & (unit_log_ratio < -eps_low)
        high = unit_valid & (unit_adv > 0) & (unit_log_ratio > eps_high)
        weights = seq_weight.detach()
        stats = GMPOStats(
            log_ratio_max=_masked_extreme(log_ratio, valid, torch.amax, -math.inf),
            log_ratio_min=_masked_extreme(log_ratio, valid, torch.amin, math.inf),
            low_clipped=low.sum().to(dtype),
            high_clipped=high.sum().to(dtype),
            clip_units=unit_valid.sum().to(dtype),
            seq_weight_sum=torch.where(has_tokens, weights, 0.0).sum(),
            seq_weight_max=_masked_extreme(weights, has_tokens, torch.amax, -math.inf),
            seq_weight_min=_masked_extreme(weights, has_tokens, torch.amin, math.inf),
            num_rows=has_tokens.sum().to(dtype),
            log_ratio_sum=log_ratio.detach().sum(),
            num_tokens=token_count.sum().to(dtype),
        )
    return GMPOOutput(loss=loss, per_row_loss=per_row_loss, seq_weight=seq_weight, stats=stats)


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """mask > 0, without a comparison when the mask is already boolean."""
    return mask if mask.dtype == torch.bool else mask > 0


def _masked_extreme(x: torch.Tensor, valid: torch.Tensor, reduce, empty: float) -> torch.Tensor:
    filled = torch.where(valid, x.detach(), empty)
    return reduce(filled) if filled.numel() else torch.tensor(empty, dtype=x.dtype, device=x.device)


def k3_kl(
    ref_logps: torch.Tensor,
    logps: torch.Tensor,
    mask: torch.Tensor,
    log_ratio: torch.Tensor | None = None,
    clip_level: str = "token",
) -> torch.Tensor:
    """(B, T) per-token k3 estimate of KL(pi_theta || pi_ref), 0 outside `mask`; bias-corrected given `log_ratio`.

    k3_it = exp(d_it) - d_it - 1, d_it = log pi_ref(o_it) - log pi_theta(o_it). The completions were sampled from
    pi_old, so with `log_ratio` (the (B, T) r_it) each k3_it is multiplied by the unclipped importance weight of the
    clip level's unit (gradient flows through it): exp(r_it) at "token"; at both sequence levels the row's geometric
    mean ratio exp(s_i), s_i = (1/|o_i|) sum_t r_it over `mask` (TRL's coef_1 at importance_sampling_level=
    "sequence"; at "sequence_product" it is exp(S_i / |o_i|), the quantity w_i is taken from, not the whole-sequence
    ratio exp(S_i), whose variance grows exponentially with |o_i|).
    """
    valid = _valid(mask)
    d = ref_logps - logps
    kl = torch.exp(d) - d - 1
    if log_ratio is not None:
        if clip_level not in CLIP_LEVELS:
            raise ValueError(f"clip_level must be one of {CLIP_LEVELS}, got {clip_level!r}")
        if clip_level == "token":
            kl = kl * torch.exp(log_ratio)
        else:
            kl = kl * torch.exp(log_power_mean(log_ratio, valid, 0.0)).unsqueeze(-1)
    return torch.where(valid, kl, 0.0)
