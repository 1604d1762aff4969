"""GMPO's mini-batch loss in float64, one row and one token at a time, written from the paper's formula (Eq. 4).

    r_it = log pi_theta - log pi_old;  c = min(r, eps_high) if A_i > 0 else max(r, -eps_low), then min(c, log delta)
    token level:     w_i = ( (1/|o_i|) sum_t (exp(c_it) u_it)^p )^(1/p), p = 0: exp( (1/|o_i|) sum_t log(exp(c_it) u_it) )
    no length norm:  w_i = exp( sum_t c_it ) * geometric mean of u_it
    sequence:        w_i = exp( clip( (1/|o_i|) sum_t r_it ) ) * geometric mean of u_it
    sequence_product w_i = exp( clip( sum_t r_it ) / |o_i| ) * geometric mean of u_it
    L = -(1/N) sum_i A_i w_i   over the N rows of the whole mini-batch; a row without tokens adds 0.
Independent of gmpo.objective by construction: plain Python loops over scalar tensors.
"""

import math

import torch


def _clip(x, adv, eps_low, eps_high, delta):
    x = torch.clamp(x, max=eps_high) if adv > 0 else torch.clamp(x, min=-eps_low)
    return torch.clamp(x, max=math.log(delta)) if delta is not None else x


def reference_loss(rows, eps_low, eps_high, delta=None, clip_level="token", length_normalization=True, p=0.0):
    """rows: list of (log_prob (n,), old_log_prob (n,), advantage float, is_weight (n,) or None); n may be 0."""
    total = torch.zeros((), dtype=torch.float64)
    for log_prob, old, adv, u in rows:
        n = log_prob.numel()
        if n == 0:
            continue
        u = torch.ones(n, dtype=torch.float64) if u is None else u
        r = [log_prob[t] - old[t] for t in range(n)]
        log_u_mean = sum(torch.log(u[t]) for t in range(n)) / n
        if clip_level == "token":
            c = [_clip(r[t], adv, eps_low, eps_high, delta) for t in range(n)]
            if not length_normalization:
                w = torch.exp(sum(c)) * torch.exp(log_u_mean)
            elif p == 0:
                w = torch.exp(sum(c[t] + torch.log(u[t]) for t in range(n)) / n)
            else:
                w = (sum((torch.exp(c[t]) * u[t]) ** p for t in range(n)) / n) ** (1.0 / p)
        elif clip_level == "sequence":
            w = torch.exp(_clip(sum(r) / n, adv, eps_low, eps_high, delta)) * torch.exp(log_u_mean)
        else:
            w = torch.exp(_clip(sum(r), adv, eps_low, eps_high, delta) / n) * torch.exp(log_u_mean)
        total = total - adv * w
    return total / len(rows)
