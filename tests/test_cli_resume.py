"""`gmpo train` under a job script: stopped by SIGINT, then SIGTERM, restarted with `--resume_from_checkpoint true`
until it finishes, then restarted once more."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "gmpo_checkpoint_complete.json"
# A small rollout (64 completions x 4 micro-batches) so that each start takes seconds; checkpoints every 3 steps fall
# inside rollouts; no accuracy measurement between the first and the last.
ARGS = ["--max_steps", "12", "--save_steps", "3", "--per_device_train_batch_size", "64", "--steps_per_generation", "4",
        "--train_size", "512", "--eval_size", "64", "--accuracy_steps", "0"]


def start(output_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "gmpo", "train", "--output_dir", str(output_dir), *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def complete_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if (p / MARKER).is_file())


def stop_after_checkpoint(proc: subprocess.Popen, output_dir: Path, after: int, signum: int) -> str:
    """Send `signum` once a checkpoint newer than step `after` is complete; the run's stderr."""
    deadline = time.monotonic() + 240
    while not [s for s in complete_steps(output_dir) if s > after]:
        assert proc.poll() is None, f"the run ended before a checkpoint past step {after}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    proc.send_signal(signum)
    return proc.communicate(timeout=120)[1]


def assert_clean_stop(proc, err: str, name: str, code: int, output_dir: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code, f"exit status {proc.returncode}, expected {code}: {err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith(f"gmpo train: stopped by {name}") and "--resume_from_checkpoint true" in lines[-1]
    assert not (output_dir / "run_complete.json").exists(), "a stopped run passed for a finished one"


def test_stopped_runs_resume_to_the_end_and_a_finished_run_stays_as_it_is(tmp_path):
    out = tmp_path / "run"
    first = start(out)
    assert_clean_stop(first, stop_after_checkpoint(first, out, 0, signal.SIGINT), "SIGINT", 130, out)
    resumed_at = complete_steps(out)[-1]

    second = start(out, "--resume_from_checkpoint", "true")
    err = stop_after_checkpoint(second, out, resumed_at, signal.SIGTERM)
    assert_clean_stop(second, err, "SIGTERM", 143, out)

    last = subprocess.run(second.args, capture_output=True, text=True, env=None, cwd=REPO, timeout=300)
    assert last.returncode == 0, last.stderr[-3000:]
    summary = json.loads((out / "run_complete.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    accuracy_rows = [(row["step"], row["greedy_accuracy"]) for row in history if "greedy_accuracy" in row]
    assert [step for step, _ in accuracy_rows] == [0, 12], "a resume measured the accuracy again"
    assert summary["accuracy_before"] == accuracy_rows[0][1], "the summary's 'before' is not the run's step 0"
    assert summary["global_step"] == 12 and Path(summary["resumed_from"]).name.startswith("checkpoint-")
    assert sorted(row["step"] for row in history if "loss" in row) == list(range(1, 13))

    finished = {name: (out / name).read_bytes() for name in ("run_complete.json", "model.safetensors")}
    again = subprocess.run(second.args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and "nothing to resume" in again.stdout, again.stderr[-3000:]
    assert {name: (out / name).read_bytes() for name in finished} == finished, "restarting a finished run changed it"
