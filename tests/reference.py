"""Independent float64 references written from the paper's formulas, shared by the tests."""

import math

import torch


def clipped_ratios(rho, a, lo, hi, delta=None):
    """|min(rho A, clip(rho, lo, hi) A)| / |A| (Eq. 4's clipped ratio, ratio space), capped at `delta` if given."""
    clipped = torch.minimum(rho * a, rho.clamp(lo, hi) * a).abs() / a.abs()
    return clipped if delta is None else torch.minimum(clipped, torch.full_like(clipped, delta))


def reference_loss(log_ratio, mask, advantages, eps_low, eps_high, delta=None, clip_level="token", normalize=True,
                   row_weight=None, power=0.0, token_weight=None):
    """-(1/B) sum_i v_i A_i w_i, row by row in float64 and ratio space (no log-space tricks).

    p = 0: w_i = (prod_t c_it u_it)^(1/|o_i|) (Eq. 4); p != 0: w_i = ((1/|o_i|) sum_t (c_it u_it)^p)^(1/p), with
    c_it the clipped ratio and u_it the token weight (1 when None; a token with u = 0 leaves the row when p <= 0).
    "sequence": clip the geometric mean of the ratios; "sequence_product": clip the product of the ratios, then take
    its |o_i|-th root. `delta` caps each clipped ratio (token, geometric mean or product).
    """
    lo, hi = math.exp(-eps_low), math.exp(eps_high)
    terms = []
    for i in range(log_ratio.size(0)):
        a = advantages[i].double()
        tokens = [t for t in range(log_ratio.size(1)) if mask[i, t] > 0]
        u = [1.0 if token_weight is None else float(token_weight[i, t]) for t in tokens]
        if token_weight is not None and (power <= 0 or clip_level != "token"):
            tokens, u = [t for t, x in zip(tokens, u) if x > 0], [x for x in u if x > 0]
        if not tokens or a == 0:
            terms.append(torch.zeros((), dtype=torch.float64))
            continue
        rho = torch.stack([log_ratio[i, t].double().exp() for t in tokens])
        u = torch.tensor(u, dtype=torch.float64)
        n = len(tokens)
        if clip_level == "token" and power != 0:
            w = ((clipped_ratios(rho, a, lo, hi, delta) * u) ** power).mean() ** (1.0 / power)
        elif clip_level == "token":
            product = torch.prod(clipped_ratios(rho, a, lo, hi, delta))
            w = product ** (1.0 / n if normalize else 1.0) * torch.prod(u) ** (1.0 / n)
        elif clip_level == "sequence":
            w = clipped_ratios(torch.prod(rho) ** (1.0 / n if normalize else 1.0), a, lo, hi, delta)
            w = w * torch.prod(u) ** (1.0 / n)
        else:  # "sequence_product"
            w = clipped_ratios(torch.prod(rho), a, lo, hi, delta) ** (1.0 / n if normalize else 1.0)
            w = w * torch.prod(u) ** (1.0 / n)
        term = a * w
        if row_weight is not None:
            term = term * row_weight[i].double()
        terms.append(term)
    return -torch.stack(terms).mean()
