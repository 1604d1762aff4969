"""GMPO on 2 CPU processes (gloo): a full training run, and the cross-process reduction of the GMPO statistics."""

import json
import math
import os
import socket
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gmpo import GMPOTrainer, gmpo_objective
from gmpo.trl.metrics import MetricPack

from .test_training import GMPO_METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "scripts")
WORLD_SIZE = 2


def test_two_process_training_finishes_with_gmpo_metrics(tiny_model_dir, tmp_path):
    # torchrun, not `accelerate launch --cpu --num_processes 2`: accelerate 1.15 starts a single process for that (its
    # multi-CPU launcher needs mpirun). With use_cpu=True, accelerate then runs MULTI_CPU over gloo.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
           os.path.join(SCRIPTS, "ddp_train.py"), tiny_model_dir, str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]

    for report in reports:
        assert (report["num_processes"], report["distributed_type"], report["backend"]) == (
            2, "DistributedType.MULTI_CPU", "gloo"), "the run was not a 2-process gloo run"
        assert report["params_finite"], "NaN/inf in the final weights"
    assert reports[0]["params_sha256"] == reports[1]["params_sha256"], "the two replicas ended with different weights"

    steps = [log for log in reports[0]["log_history"] if "loss" in log]
    assert len(steps) == 3
    for log in steps:
        assert math.isfinite(log["loss"]), log
        for name in GMPO_METRICS:
            assert name in log and math.isfinite(log[name]), f"{name} missing or not finite in {log}"
    # steps_per_generation=2 > gradient_accumulation_steps=1: the second step of a rollout is off-policy.
    assert any(log["gmpo/log_ratio_max"] > 0 for log in steps), "every ratio stayed 1: the run never went off-policy"


# ---- the reduction of the statistics: 2 ranks with different batches vs. one process with the concatenated batch ----

OBJECTIVE_KWARGS = {
    "token": dict(eps_low=0.2, eps_high=0.3),
    "token-delta": dict(eps_low=0.2, eps_high=0.3, delta=1.2),
    "sequence": dict(eps_low=0.1, eps_high=0.1, clip_level="sequence"),
    "rank1-empty": dict(eps_low=0.2, eps_high=0.3),
}
SHAPES = {0: (3, 5), 1: (5, 8)}  # (rows, completion length) differ between the ranks
# The same float32 statistics summed in another order (per rank, then across ranks; or padded to another width): a
# mean of <= 8 row weights, each exp of a mean of <= 8 log-ratios of size <= ~8, differs by at most about
# (8 + 8 * 8) unit roundoffs (2**-24) relative, 4.3e-6; the tolerance leaves a factor ~2 over that bound.
FLOAT32_STATS_REL = 1e-5


def rank_batch(case: str, rank: int):
    """Rank `rank`'s micro-batch: log-ratios of spread 1 + rank (so the extremes come from different ranks), random
    lengths including empty rows, advantages of both signs and zero."""
    g = torch.Generator().manual_seed(100 * rank + len(case))
    rows, length = SHAPES[rank]
    log_ratio = (1.0 + rank) * torch.randn(rows, length, generator=g)
    lengths = torch.randint(0, length + 1, (rows,), generator=g)
    lengths[0] = length  # at least one full row
    if case == "rank1-empty" and rank == 1:
        lengths.zero_()  # a rank whose rows are all empty must not disturb the global statistics
    mask = (torch.arange(length) < lengths[:, None]).float()
    log_ratio[mask == 0] = float("nan")  # padding may hold anything: it must be ignored
    advantages = torch.randn(rows, generator=g)
    advantages[-1] = 0.0
    return log_ratio, mask, advantages


def logged_metrics(stats, gather) -> dict[str, float]:
    """The values GMPOTrainer._log_step_metrics records for `stats`, with `gather` in place of accelerator.gather."""
    fake_trainer = SimpleNamespace(
        accelerator=SimpleNamespace(gather=gather, device=torch.device("cpu")),
        _metrics={"train": defaultdict(list)},
        _entropy_bonus_enabled=False,
    )
    GMPOTrainer._log_step_metrics(fake_trainer, stats, MetricPack(), "train")
    return {name: values[0] for name, values in fake_trainer._metrics["train"].items()}


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool; the tensors are tiny anyway
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for case, kwargs in OBJECTIVE_KWARGS.items():
            out = gmpo_objective(*rank_batch(case, rank), **kwargs)
            results[case] = {"global": logged_metrics(out.stats, all_gather_cat),
                             "local": logged_metrics(out.stats, lambda t: t)}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def concatenated_batch(case: str):
    """Both ranks' rows in one batch, padded to the longer completion length with masked-out entries."""
    length = max(t for _, t in SHAPES.values())
    parts = [rank_batch(case, rank) for rank in range(WORLD_SIZE)]
    pad = [torch.nn.functional.pad(x, (0, length - x.size(1))) for x in (p[0] for p in parts)]
    masks = [torch.nn.functional.pad(p[1], (0, length - p[1].size(1))) for p in parts]
    return torch.cat(pad), torch.cat(masks), torch.cat([p[2] for p in parts])


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    # Forked, not spawned: a spawned child re-imports torch, TRL and this module before it can start (~20 s on 2 cores);
    # a forked one starts at once. Each is still its own process with its own gloo rank.
    mp.start_processes(_rank_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True,
                       start_method="fork")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", list(OBJECTIVE_KWARGS))
def test_two_ranks_reduce_to_the_concatenated_batch(rank_results, case):
    log_ratio, mask, advantages = concatenated_batch(case)
    out = gmpo_objective(log_ratio, mask, advantages, **OBJECTIVE_KWARGS[case])
    single = logged_metrics(out.stats, lambda t: t)
    assert set(single) == {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                           "gmpo/seq_weight_mean", "gmpo/log_ratio_max", "gmpo/log_ratio_min",
                           "gmpo/seq_weight_max", "gmpo/seq_weight_min"}
    for rank, result in enumerate(rank_results):
        assert result[case]["global"] == pytest.approx(single, rel=FLOAT32_STATS_REL, abs=1e-7), f"rank {rank}"

    if case == "rank1-empty":  # rank 1 has nothing to report (its extremes are +-inf); rank 0's numbers are global
        assert all(math.isnan(v) for v in rank_results[1][case]["local"].values())
    else:  # the reduction is not trivially local: a rank's own statistics differ from the global ones
        assert rank_results[0][case]["local"] != single
    # And the single-process numbers are what their definitions say, straight from the concatenated tensors.
    valid = mask > 0
    assert single["gmpo/log_ratio_max"] == pytest.approx(log_ratio[valid].max().item())
    assert single["gmpo/log_ratio_min"] == pytest.approx(log_ratio[valid].min().item())
    rows = valid.any(-1)
    assert single["gmpo/seq_weight_mean"] == pytest.approx(out.seq_weight[rows].mean().item(), rel=FLOAT32_STATS_REL)
    if OBJECTIVE_KWARGS[case].get("clip_level") != "sequence":
        eps_low, eps_high = OBJECTIVE_KWARGS[case]["eps_low"], OBJECTIVE_KWARGS[case]["eps_high"]
        adv = advantages[:, None].expand_as(log_ratio)
        low = (valid & (adv < 0) & (log_ratio < -eps_low)).sum() / valid.sum()
        high = (valid & (adv > 0) & (log_ratio > eps_high)).sum() / valid.sum()
        assert single["clip_ratio/low_mean"] == pytest.approx(low.item())
        assert single["clip_ratio/high_mean"] == pytest.approx(high.item())
        assert low > 0 and high > 0, "the case does not exercise both clip sides"
