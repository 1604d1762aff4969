"""Preemption: a run SIGKILLed at seeded random moments and restarted with resume_from_checkpoint=True each time ends
with exactly the weights and per-step logged metrics of an uninterrupted run; so does a 2-process run; restarting a
finished run changes nothing."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "chaos_run.py")
MAX_STEPS, SAVE_STEPS, STEPS_PER_GENERATION = 12, 3, 4
# Checkpoints at steps 3, 6, 9 (inside a rollout: 4 optimizer steps each) and 12; 16 prompts make an epoch 8 steps.
COMPLETE_MARKER = "gmpo_checkpoint_complete.json"  # written last: a checkpoint without it is incomplete
CONFIG = {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "steps_per_generation": STEPS_PER_GENERATION,
          "save_total_limit": 2}


def launch(model_dir, output_dir, config, kill=None, processes=1):
    """One start of the job: `python chaos_run.py ...`, or torchrun with `processes` ranks."""
    prefix = [sys.executable]
    if processes > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = prefix + [SCRIPT, model_dir, str(output_dir), json.dumps(config)] + [str(x) for x in kill or ()]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def finished(model_dir, output_dir, config, processes=1):
    result = launch(model_dir, output_dir, config, processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output_dir / "report.json").read_text())
    return load_file(output_dir / "final" / "model.safetensors"), report


def chaos_schedule(seed: int) -> list[tuple[str, int, int]]:
    """Four kills (kind, step, rank) at seeded random moments: before the first checkpoint; inside a checkpoint write
    (weights and optimizer written, trainer_state.json not); inside a rollout after a resume; after the last
    checkpoint but one, or while writing the last one (all written but the marker)."""
    rng = random.Random(seed)
    kinds = lambda step: ["loss", "generate"] if step % STEPS_PER_GENERATION == 0 else ["loss"]  # noqa: E731
    early = rng.randrange(0, SAVE_STEPS)
    save_step = rng.choice([SAVE_STEPS, 2 * SAVE_STEPS])
    middle = rng.randrange(save_step + 1, 3 * SAVE_STEPS)
    late = rng.randrange(3 * SAVE_STEPS, MAX_STEPS + 1)
    late_kind = "marker" if late == MAX_STEPS else rng.choice(kinds(late))
    return [(rng.choice(kinds(early)), early, 0), ("save", save_step, 0), (rng.choice(kinds(middle)), middle, 0),
            (late_kind, late, 0)]


def last_complete_checkpoint(kill) -> int:
    """The step of the newest checkpoint that was complete when `kill` struck."""
    kind, step, _ = kill
    return (step - 1 if kind in ("save", "marker") else step) // SAVE_STEPS * SAVE_STEPS


def assert_same_run(weights, report, ref_weights, ref_report, max_steps=MAX_STEPS):
    # Bit for bit: the resumed and the uninterrupted runs perform the same computation (same machine, one thread,
    # same shapes), so any difference means some state was lost or recomputed differently.
    assert weights.keys() == ref_weights.keys()
    for name, expected in ref_weights.items():
        assert torch.equal(weights[name], expected), f"{name} differs from the uninterrupted run"
    steps = {log["step"]: log for log in report["log_history"] if "loss" in log}
    ref_steps = {log["step"]: log for log in ref_report["log_history"] if "loss" in log}
    assert sorted(steps) == sorted(ref_steps) == list(range(1, max_steps + 1))
    for step, expected in ref_steps.items():
        got = {k: v for k, v in steps[step].items() if k != "step_time"}  # wall-clock time
        assert got == {k: v for k, v in expected.items() if k != "step_time"}, f"step {step} logged other metrics"


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    return finished(tiny_model_dir, tmp_path_factory.mktemp("uninterrupted"), CONFIG)


@pytest.fixture(scope="module")
def chaos_run(tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("chaos")
    kills = chaos_schedule(seed=4)  # seed 4: kills in both write phases (before trainer_state.json, before the marker)
    for kill in kills:
        result = launch(tiny_model_dir, output_dir, CONFIG, kill)
        assert result.returncode == -signal.SIGKILL, f"{kill} did not fire: {result.returncode}\n{result.stderr[-2000:]}"
        if kill[0] in ("save", "marker"):
            torn = output_dir / f"checkpoint-{kill[1]}"
            assert torn.is_dir() and not (torn / COMPLETE_MARKER).exists(), "the kill did not land inside the write"
    return output_dir, kills, *finished(tiny_model_dir, output_dir, CONFIG)


def test_chaos_killed_run_equals_the_uninterrupted_run(chaos_run, reference):
    output_dir, kills, weights, report = chaos_run
    assert kills[0][1] < SAVE_STEPS and kills[1][0] == "save"
    assert report["trained_steps"] == list(range(last_complete_checkpoint(kills[-1]) + 1, MAX_STEPS + 1))
    assert_same_run(weights, report, *reference)
    complete = sorted(p.name for p in output_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists())
    assert complete == ["checkpoint-12", "checkpoint-9"], "save_total_limit=2 keeps the two newest complete ones"


def test_restart_after_the_run_finished_changes_nothing(tiny_model_dir, chaos_run, reference):
    output_dir = chaos_run[0]
    marker_before = (output_dir / f"checkpoint-{MAX_STEPS}" / COMPLETE_MARKER).read_text()
    weights, report = finished(tiny_model_dir, output_dir, CONFIG)
    assert report["trained_steps"] == [], "a finished run trained again"
    assert_same_run(weights, report, *reference)
    assert (output_dir / f"checkpoint-{MAX_STEPS}" / COMPLETE_MARKER).read_text() == marker_before


def test_two_process_kill_and_resume(tiny_model_dir, tmp_path):
    config = {**CONFIG, "max_steps": 8, "steps_per_generation": 4}
    ref_weights, ref_report = finished(tiny_model_dir, tmp_path / "uninterrupted", config, processes=2)
    output_dir = tmp_path / "killed"
    killed = launch(tiny_model_dir, output_dir, config, ("loss", 5, 1), processes=2)  # rank 1, inside a rollout
    assert killed.returncode != 0 and not (output_dir / "report.json").exists(), "the kill did not stop the run"
    assert (output_dir / "checkpoint-3" / COMPLETE_MARKER).exists()
    for rank in range(2):
        assert (output_dir / "checkpoint-3" / f"gmpo_rollout_buffer.rank{rank}.safetensors").is_file()
    weights, report = finished(tiny_model_dir, output_dir, config, processes=2)
    assert report["trained_steps"] == list(range(4, 9)), "did not resume from checkpoint-3"
    assert_same_run(weights, report, ref_weights, ref_report, max_steps=8)
