"""verl's real micro-batching: the gradient of one mini-batch through verl's FSDP2 engine on 2 CPU processes.

`engine_worker.py` (run here with torch.distributed.run, gloo) sends a 16-row mini-batch through verl's own
`forward_backward_batch` -> `prepare_micro_batches` -> `ppo_loss` -> the registered policy loss, for 1, 2, 4 and 8
equal micro-batches per rank and for dynamic batching (`use_dynamic_bsz`, uneven row counts), and compares the
summed, rank-averaged gradient with a float64 whole-batch reference written from the formula (see its docstring).

Tolerance: both sides use the same weights; the engine runs in float32 (unit roundoff u = 2^-24 = 6e-8) and adds
the per-micro-batch and per-rank gradients in its own order. Each gradient entry is a sum of at most
n = 16 rows x 14 tokens x 64 (vocabulary or hidden width) ~ 1.4e4 rounded products; rounding errors of random sign
grow like sqrt(n) u ~ 7e-6, so 1e-5 relative error in the gradient's norm bounds float32 rounding (measured: 2e-7 to
3e-7) while a loss that mis-weights even one row of the 16 is off by far more (verl's `geo_mean`: 0.17 to 13).
"""

import json
import os
import subprocess
import sys

import pytest

TOL = 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = ("1", "2", "4", "8", "dynamic")  # micro-batches per rank; "dynamic": verl's token-budget split
ROWS_PER_RANK = 8


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """The worker's results for every case, from one 2-process run on a tiny random Qwen2 it builds (no download)."""
    model_dir = tmp_path_factory.mktemp("tiny-qwen2")
    out = model_dir / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "engine_worker.py"), str(model_dir), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"engine worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    results = json.loads(out.read_text())
    assert results["world_size"] == 2
    return results["cases"]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", ["main/gmpo", "dual_is/gmpo", "main/gmpo@token-mean"])
def test_gmpo_gradient_through_verls_micro_batching_is_the_whole_batch_gradient(engine_run, case, split):
    """"dual_is" adds rollout IS weights and rows with A < 0 whose ratios pass verl's dual clip (3); "@token-mean" is
    verl's default loss_agg_mode (GMPO's loss ignores it)."""
    error = engine_run[f"{case}/{split}"]["relative_error"]
    assert error <= TOL, f"{case}, {split} micro-batches per rank: relative gradient error {error:.2e}"


@pytest.mark.parametrize("split", SPLITS)
def test_harness_passes_verls_own_split_invariant_loss(engine_run, split):
    """verl's vanilla PPO loss with seq-mean-token-mean normalises by the global batch: the harness must accept it."""
    error = engine_run[f"main/vanilla/{split}"]["relative_error"]
    assert error <= TOL, f"loss_mode=vanilla, {split} micro-batches: relative gradient error {error:.2e}"


def test_verls_geo_mean_is_right_unsplit_and_wrong_once_split(engine_run):
    """geo_mean takes a plain mean per micro-batch: right with one micro-batch per rank, wrong for any split."""
    assert engine_run["main/geo_mean/1"]["relative_error"] <= TOL
    for split in SPLITS[1:]:
        error = engine_run[f"main/geo_mean/{split}"]["relative_error"]
        assert error > 0.1, f"geo_mean with {split} micro-batches unexpectedly matches (error {error:.2e})"


def test_verls_geo_mean_ignores_the_dual_clip_even_unsplit(engine_run):
    error = engine_run["dual_is/geo_mean/1"]["relative_error"]
    assert error > 0.1, f"geo_mean unexpectedly bounds A<0 rows by clip_ratio_c (error {error:.2e})"


def test_verl_made_the_micro_batches_each_case_claims(engine_run):
    for split in SPLITS[:-1]:
        for rows in engine_run[f"main/gmpo/{split}"]["micro_batch_rows"]:
            assert rows == [ROWS_PER_RANK // int(split)] * int(split), f"split {split}: verl made {rows}"
    dynamic = engine_run["main/gmpo/dynamic"]["micro_batch_rows"]
    assert all(sum(rows) == ROWS_PER_RANK for rows in dynamic), dynamic
    assert len({len(rows) for rows in dynamic}) == 1, f"ranks ran different micro-batch counts: {dynamic}"
    assert any(len(set(rows)) > 1 for rows in dynamic), f"dynamic batching made equal micro-batches: {dynamic}"
