"""Independent float64 references written from the paper's formulas, shared by the tests."""

import math

import torch


def reference_loss(log_ratio, mask, advantages, eps_low, eps_high, delta=None, clip_level="token", normalize=True,
                   row_weight=None):
    """-(1/B) sum_i v_i sgn(A_i) (prod_t |min(rho_it A_i, clip(rho_it, e^-el, e^eh) A_i)|)^(1/|o_i|), row by row.

    Products are taken of ratios in float64 (ratio space, not log space); `delta` caps each clipped ratio.
    """
    lo, hi = math.exp(-eps_low), math.exp(eps_high)
    terms = []
    for i in range(log_ratio.size(0)):
        a = advantages[i].double()
        tokens = [t for t in range(log_ratio.size(1)) if mask[i, t] > 0]
        if not tokens or a == 0:
            terms.append(torch.zeros((), dtype=torch.float64))
            continue
        rho = torch.stack([log_ratio[i, t].double().exp() for t in tokens])
        if clip_level == "sequence":
            rho = torch.prod(rho) ** (1.0 / len(tokens) if normalize else 1.0)
            rho = rho.reshape(1)
        clipped = torch.minimum(rho * a, rho.clamp(lo, hi) * a).abs()
        if delta is not None:
            clipped = torch.minimum(clipped, delta * a.abs())
        if normalize or clip_level == "sequence":
            exponent = 1.0 / clipped.numel()
            term = torch.prod(clipped) ** exponent * torch.sign(a)
        else:  # Table 4's ablation drops the exponent: A_i times the plain product of the clipped ratios
            term = a * torch.prod(clipped / a.abs())
        if row_weight is not None:
            term = term * row_weight[i].double()
        terms.append(term)
    return -torch.stack(terms).mean()
