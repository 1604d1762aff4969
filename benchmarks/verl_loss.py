"""`loss_mode=gmpo` vs verl's own `geo_mean` on the same micro-batches, called as verl's `ppo_loss` calls them.

Run in a verl environment (verl 0.9.1 and this project installed with the `verl` extra; no GPU needed):

    python benchmarks/verl_loss.py                 # about a minute on 2 CPU cores
    python benchmarks/verl_loss.py --reps 20       # fewer timing repetitions

Every loss call gets verl's keyword contract and an actor config whose `global_batch_info` is set as verl's
`ppo_loss` sets it (dp_size, global_batch_size = the mini-batch's N rows); every micro-batch is padded to its own
longest row, as verl pads it, and its loss is back-propagated unscaled, as verl's FSDP engine does. The reference is
the whole mini-batch in float64, written here from the paper's formula (Eq. 4) with verl's dual clip:
    L = -(1/N) sum_i A_i w_i,  w_i = exp( (1/|o_i|) sum_t min(c_it, log clip_ratio_c) ),
    c_it = min(r_it, eps_high) if A_i > 0 else max(r_it, -eps_low)          (log space, eps = 0.4)
Printed, in one run:
  1. gradient error ||dL/dlog_prob - reference|| / ||reference|| for 1/2/4/8 equal micro-batches, an uneven split and
     2 simulated data-parallel ranks (each rank's micro-batch gradients summed, then averaged over ranks, as FSDP does);
  2. clip fraction (pg_clipfrac + pg_clipfrac_lower, averaged over micro-batches as verl does) vs the true fraction
     of tokens the loss clips (one-sided by the advantage's sign);
  3. the dual clip: the weight w_i of a row with A_i < 0 whose tokens all have ratio e^2;
  4. time of one micro-batch's loss forward + backward, ours / geo_mean, interleaved repetitions, median ratio.
"""

import argparse
import math
import platform
import statistics
import time

import torch
import verl  # noqa: F401  (loads the verl.plugins entry points: loss_mode=gmpo)
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import FSDPActorConfig, OptimizerConfig, PolicyLossConfig

from gmpo.verl import GMPOPolicyLossConfig

EPS, DUAL_CLIP = 0.4, 3.0
LOSSES = ("gmpo", "geo_mean")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="N, rows of the mini-batch (accuracy part)")
    parser.add_argument("--reps", type=int, default=200, help="timing repetitions per loss")
    parser.add_argument("--calls", type=int, default=5, help="loss calls per timed repetition")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other jobs)")
    parser.add_argument("--time-rows", type=int, default=12, help="rows of the timed micro-batch")
    parser.add_argument("--time-length", type=int, default=2048, help="response length of the timed micro-batch")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_config(loss_mode: str, num_rows: int, dp_size: int = 1):
    policy_loss = GMPOPolicyLossConfig(loss_mode="gmpo") if loss_mode == "gmpo" else PolicyLossConfig(loss_mode=loss_mode)
    config = FSDPActorConfig(
        strategy="fsdp2", ppo_mini_batch_size=num_rows, ppo_micro_batch_size_per_gpu=1, clip_ratio=EPS,
        clip_ratio_low=EPS, clip_ratio_high=EPS, clip_ratio_c=DUAL_CLIP, loss_agg_mode="seq-mean-token-mean",
        policy_loss=policy_loss, optim=OptimizerConfig(lr=0.0), rollout_n=1,
    )
    config.global_batch_info.update(dp_size=dp_size, global_batch_size=num_rows, batch_num_tokens=None,
                                    loss_scale_factor=None)
    return config


def make_batch(rows: int, length: int, seed: int) -> dict:
    """Rows of random length in [length/8, length], advantages ~ N(0, 1), log-ratios ~ N(0, 0.3^2) cut at +-1.

    The cut keeps every ratio below the dual clip's 3 = e^1.1, so that the split table measures the aggregation
    alone (the dual clip has its own line).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 8), length + 1, (rows,), generator=g)
    mask = torch.arange(length) < lengths[:, None]  # bool, as verl's ppo_loss passes response_mask
    old_log_prob = -torch.rand(rows, length, generator=g) * 3
    log_ratio = (0.3 * torch.randn(rows, length, generator=g)).clamp(-1.0, 1.0)
    advantages = torch.randn(rows, generator=g)
    return dict(mask=mask, old=old_log_prob * mask, log_prob=(old_log_prob + log_ratio) * mask,
                advantages=advantages[:, None] * mask)


def reference(batch: dict) -> tuple[torch.Tensor, float]:
    """Float64 gradient of the whole-batch GMPO loss w.r.t. log_prob, and the true one-sided clip fraction."""
    log_prob = batch["log_prob"].double().requires_grad_()
    total, clipped, tokens = 0.0, 0, 0
    for i in range(log_prob.shape[0]):
        valid = batch["mask"][i] > 0
        r = log_prob[i][valid] - batch["old"][i][valid].double()
        adv = float(batch["advantages"][i][valid][0])
        c = r.clamp(max=EPS) if adv > 0 else r.clamp(min=-EPS)
        total = total - adv * torch.exp(c.clamp(max=math.log(DUAL_CLIP)).mean())
        clipped += int(((r > EPS) if adv > 0 else (r < -EPS)).sum())
        tokens += int(valid.sum())
    (total / log_prob.shape[0]).backward()
    return log_prob.grad, clipped / tokens


def micro_batch_grad(loss_mode: str, batch: dict, splits: list[list[list[int]]]):
    """Gradient w.r.t. log_prob of verl's accumulation: sum over a rank's micro-batches, mean over ranks.

    splits[rank] = the row indices of each of that rank's micro-batches. Returns (gradient, mean clip fraction).
    """
    rows = batch["mask"].shape[0]
    fn = get_policy_loss_fn(loss_mode)
    config = make_config(loss_mode, rows, dp_size=len(splits))
    grad = torch.zeros_like(batch["log_prob"])
    clipfracs = []
    for rank_splits in splits:
        rank_grad = torch.zeros_like(grad)
        for idx in rank_splits:
            width = int(batch["mask"][idx].sum(-1).max())  # verl pads a micro-batch to its longest row
            log_prob = batch["log_prob"][idx, :width].clone().requires_grad_()
            loss, metrics = fn(old_log_prob=batch["old"][idx, :width], log_prob=log_prob,
                               advantages=batch["advantages"][idx, :width], response_mask=batch["mask"][idx, :width],
                               loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=None)
            loss.backward()
            rank_grad[idx, :width] += log_prob.grad
            clipfracs.append(float(metrics["actor/pg_clipfrac"]) + float(metrics["actor/pg_clipfrac_lower"]))
        grad += rank_grad / len(splits)
    return grad, statistics.fmean(clipfracs)


def split_cases(rows: int) -> dict[str, list[list[list[int]]]]:
    """{name: splits[rank][micro-batch] = row indices}, contiguous chunks as verl's chunk_tensordict makes them."""

    def chunks(start: int, stop: int, count: int) -> list[list[int]]:
        size = (stop - start) // count
        return [list(range(start + j * size, start + (j + 1) * size)) for j in range(count)]

    cases = {f"{k} equal": [chunks(0, rows, k)] for k in (1, 2, 4, 8)}
    bounds = [0, 1, 4, 9, rows]  # unequal sizes, as dynamic batching makes them from rows of mixed lengths
    sizes = "/".join(str(b - a) for a, b in zip(bounds, bounds[1:]))
    cases[f"uneven {sizes}"] = [[list(range(a, b)) for a, b in zip(bounds, bounds[1:])]]
    cases["2 ranks x 4 equal"] = [chunks(0, rows // 2, 4), chunks(rows // 2, rows, 4)]
    return cases


def accuracy_table(args) -> None:
    batch = make_batch(args.rows, 64, args.seed)
    ref_grad, true_clipfrac = reference(batch)
    print(f"Mini-batch: N = {args.rows} rows of 8-64 tokens, eps = {EPS} (log space), clip_ratio_c = {DUAL_CLIP}; "
          f"true one-sided clip fraction {true_clipfrac:.4f}")
    print("| split | grad error, gmpo | grad error, geo_mean | clip-fraction error, gmpo | clip-fraction error, geo_mean |")
    print("|---|---|---|---|---|")
    for name, splits in split_cases(args.rows).items():
        cells = []
        errors = {}
        for loss_mode in LOSSES:
            grad, clipfrac = micro_batch_grad(loss_mode, batch, splits)
            cells.append(f"{((grad.double() - ref_grad).norm() / ref_grad.norm()).item():.1e}")
            errors[loss_mode] = f"{clipfrac - true_clipfrac:+.4f}"
        print(f"| {name} | {cells[0]} | {cells[1]} | {errors['gmpo']} | {errors['geo_mean']} |")


def dual_clip_row() -> None:
    """w_i = -loss / A_i for one row with A_i = -1 and every log-ratio 2 (ratio 7.39)."""
    mask = torch.ones(1, 8)
    old = torch.full((1, 8), -2.0)
    weights = {}
    for loss_mode in LOSSES:
        loss, _ = get_policy_loss_fn(loss_mode)(old_log_prob=old, log_prob=old + 2.0, advantages=-mask,
                                                response_mask=mask, loss_agg_mode="seq-mean-token-mean",
                                                config=make_config(loss_mode, 1), rollout_is_weights=None)
        weights[loss_mode] = loss.item()
    print(f"\nDual clip, one row with A = -1 and ratio e^2 = {math.exp(2):.2f} on all 8 tokens: row weight w "
          f"gmpo {weights['gmpo']:.3f}, geo_mean {weights['geo_mean']:.3f}, formula min(e^2, {DUAL_CLIP}) = "
          f"{min(math.exp(2), DUAL_CLIP):.3f}")


def timing(args) -> None:
    batch = make_batch(args.time_rows, args.time_length, args.seed + 1)
    configs = {m: make_config(m, args.time_rows) for m in LOSSES}

    def run(loss_mode: str) -> float:
        log_prob = batch["log_prob"].clone().requires_grad_()
        fn = get_policy_loss_fn(loss_mode)
        start = time.perf_counter()
        for _ in range(args.calls):
            loss, _ = fn(old_log_prob=batch["old"], log_prob=log_prob, advantages=batch["advantages"],
                         response_mask=batch["mask"], loss_agg_mode="seq-mean-token-mean", config=configs[loss_mode],
                         rollout_is_weights=None)
            loss.backward()
        return (time.perf_counter() - start) / args.calls

    for loss_mode in LOSSES:  # warm-up
        for _ in range(3):
            run(loss_mode)
    times = {m: [] for m in LOSSES}
    ratios = []
    for rep in range(args.reps):
        order = LOSSES if rep % 2 == 0 else LOSSES[::-1]
        measured = {m: run(m) for m in order}
        for m in LOSSES:
            times[m].append(measured[m])
        ratios.append(measured["gmpo"] / measured["geo_mean"])
    ratios.sort()
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"\nTime of one micro-batch's loss forward + backward ({args.time_rows} x {args.time_length} float32, "
          f"{torch.get_num_threads()} thread(s), {args.reps} interleaved reps of {args.calls} calls): gmpo median "
          f"{statistics.median(times['gmpo']) * 1e3:.2f} ms, geo_mean {statistics.median(times['geo_mean']) * 1e3:.2f}"
          f" ms; ratio gmpo/geo_mean median {statistics.median(ratios):.3f} (quartiles {quartiles[0]:.3f}-"
          f"{quartiles[2]:.3f}; target <= 1.05)")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"verl {verl.__version__}, torch {torch.__version__}, {cpu_name()}, seed {args.seed}\n")
    accuracy_table(args)
    dual_clip_row()
    timing(args)


if __name__ == "__main__":
    main()
