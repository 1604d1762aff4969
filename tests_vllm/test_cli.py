"""`gmpo train --use_vllm true`: a colocate run writes what a run without vLLM writes; the vLLM settings that cannot
run on this machine end in one line and exit status 2, before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--max_steps", "4", "--train_size", "256", "--eval_size", "32", "--accuracy_steps", "0",
         "--per_device_train_batch_size", "64", "--steps_per_generation", "2"]


def gmpo_train(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gmpo", "train", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def written(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def test_colocate_run_writes_what_a_run_without_vllm_writes(tmp_path):
    runs = {}
    for name, flags in (("hf", []), ("vllm", ["--use_vllm", "true", "--vllm_mode", "colocate",
                                             "--vllm_max_model_length", "64"])):
        out = tmp_path / name
        result = gmpo_train("--output_dir", str(out), *SMALL, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = out
    assert written(runs["vllm"]) == written(runs["hf"])
    summary = json.loads((runs["vllm"] / "run_complete.json").read_text())
    assert summary["global_step"] == 4 and 0 <= summary["accuracy_after"] <= 1
    history = json.loads((runs["vllm"] / "trainer_state.json").read_text())["log_history"]
    checks = [log["sampling/weights_logp_difference"] for log in history if "sampling/weights_logp_difference" in log]
    assert len(checks) == 2 and max(checks) < 0.1, checks  # one check per rollout, synced


@pytest.mark.parametrize("flags, line", [
    pytest.param(["--vllm_mode", "server"], "vllm_mode='server' needs a CUDA device", id="server",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="TRL's path with CUDA")),
    (["--vllm_enable_sleep_mode", "true"], "vllm_enable_sleep_mode=True: vLLM has no sleep mode on this platform"),
])
def test_settings_that_cannot_run_here_end_in_one_line(tmp_path, flags, line):
    out = tmp_path / "run"
    result = gmpo_train("--output_dir", str(out), *SMALL, "--use_vllm", "true", *flags, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gmpo train: error: ") and line in last, last
    assert "Traceback" not in result.stderr and not out.exists()


def test_a_dry_run_resolves_the_paper_recipe_here(tmp_path):
    # The recipe sets vllm_enable_sleep_mode (a GPU machine's): a dry run prints it instead of refusing it.
    result = gmpo_train("--config", str(REPO / "recipes" / "gmpo-qwen2.5-math-7b-math-lvl3to5.yaml"), "--output_dir",
                        str(tmp_path / "run"), "--dry-run", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vllm_enable_sleep_mode: true" in result.stdout


# `gmpo train` whose trainer keeps TRL's object but a sync that does nothing: vLLM keeps the initial weights.
STALE_RUN = """
import sys
import gmpo.trl.trainer
from gmpo.cli import main

def sync_that_does_nothing(generation):
    generation.sync_weights = lambda: None

gmpo.trl.trainer.use_reload_sync_where_needed = sync_that_does_nothing
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_stale_sampler_ends_gmpo_train_with_exit_status_3(tmp_path):
    out = tmp_path / "run"
    args = ["--output_dir", str(out), *SMALL, "--learning_rate", "3e-3", "--use_vllm", "true",
            "--vllm_max_model_length", "64"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", STALE_RUN, *args], capture_output=True, text=True, env=env,
                            timeout=600, cwd=REPO)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 3, result.stderr[-3000:]
    assert last.startswith("gmpo train: error: vLLM does not sample from the trainer's weights at step 2"), last
    assert "stale_sampler_threshold=0.1" in last and not out.exists()  # nothing saved: the directory is removed
