"""Smoke test of `benchmarks/verl_loss.py` (a few seconds): it runs, and its table says what the math predicts."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_benchmark_prints_its_table():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "verl_loss.py"), "--reps", "2", "--calls", "1",
         "--time-rows", "2", "--time-length", "64"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = dict(re.findall(r"^\| (\d equal|uneven [\d/]+|2 ranks x 4 equal) \| (.*) \|$", proc.stdout, re.M))
    assert len(rows) == 6, proc.stdout
    for split, cells in rows.items():
        gmpo_error, geo_mean_error = (float(c) for c in cells.split(" | ")[:2])
        assert gmpo_error <= 1e-5, f"{split}: {cells}"
        if split.endswith(" equal") and not split.startswith("2 ranks"):
            # k equal micro-batches, each a plain mean: geo_mean's gradient is k times the true one, error k - 1
            k = int(split.split()[0])
            assert abs(geo_mean_error - (k - 1)) <= 1e-3 * k, f"{split}: {cells}"
    assert re.search(r"row weight w gmpo 3\.000, geo_mean 7\.389", proc.stdout), proc.stdout
    assert "ratio gmpo/geo_mean median" in proc.stdout
