"""The paper recipe's combination on CPU: DeepSpeed ZeRO-3 and vLLM colocate, 2 processes, one vLLM engine each.

Launched as a user launches it: `accelerate launch --config_file tests/configs/zero3-cpu.yaml` (ZeRO-3 with every
parameter partitioned, gloo), `use_cpu=False, ddp_backend="gloo"`. Checked: the parameters are partitioned; every
rank's engine follows the weights ZeRO-3 gathers for the sync; a job SIGKILLed inside a rollout resumes and ends
bit for bit equal to the uninterrupted one (each rank's CPU generator, vLLM's noise source, is in rng_state_R.pth).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import BF16_LOGP_TOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests_vllm", "scripts", "resume_run.py")
# Rollouts at global steps 0, 2, 4; checkpoint-3 is inside the second; lr 3e-3 moves the weights well past bf16's
# rounding in 5 steps.
# Every start syncs once more after training and compares each engine with the gathered weights ("sync_check").
CONFIG = {"max_steps": 5, "save_steps": 3, "use_cpu": False, "ddp_backend": "gloo", "sync_check": True}

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero3_launch(output_dir, config, kill=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "tests/configs/zero3-cpu.yaml",
           "--main_process_port", str(free_port()), SCRIPT, str(output_dir), json.dumps(config),
           *[str(x) for x in kill]]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


def step_logs(output_dir) -> dict:
    logs = json.loads((output_dir / "report.json").read_text())["log_history"]
    return {log["step"]: {k: v for k, v in log.items() if k != "step_time"} for log in logs if "loss" in log}


@pytest.mark.slow  # 3 launches of 2 processes, each with a vLLM engine: ~2 min each on 2 busy cores
def test_zero3_with_vllm_colocate_trains_syncs_and_resumes_exactly(tmp_path):
    import deepspeed  # noqa: F401  (needs the deepspeed extra: pip install -e '.[deepspeed]'; a missing one fails here)

    reference = tmp_path / "uninterrupted"
    result = zero3_launch(reference, CONFIG)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        check = json.loads((reference / f"sync_check.rank{rank}.json").read_text())
        assert check["num_processes"] == 2 and check["distributed_type"] == "DistributedType.DEEPSPEED"
        assert check["partitioned"], "ZeRO-3 did not partition the parameters"
        assert check["trained_vs_shipped"] > 10 * BF16_LOGP_TOL, "training did not move the policy measurably"
        assert check["engine_vs_trained"] < BF16_LOGP_TOL, f"rank {rank}'s vLLM engine does not follow the sync"
    rollouts = [log for log in step_logs(reference).values() if "reward" in log]
    assert len(rollouts) == 3
    for log in rollouts:
        assert 0.8 < log["sampling/importance_sampling_ratio/mean"] < 1.25, log
        assert math.isfinite(log["sampling/sampling_logp_difference/mean"])

    killed = tmp_path / "killed"
    result = zero3_launch(killed, CONFIG, ("loss", 3))  # in step 4: checkpoint-3 is the newest complete one
    assert result.returncode != 0 and not (killed / "report.json").exists(), "the kill did not stop the job"
    result = zero3_launch(killed, CONFIG)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((killed / "report.json").read_text())["trained_steps"] == [4, 5]
    for rank in range(2):  # rollout 4 is generated after the restart, by new engines
        name = f"rollouts/step4.rank{rank}.json"
        assert json.loads((killed / name).read_text()) == json.loads((reference / name).read_text()), name
    weights, reference_weights = (load_file(d / "final" / "model.safetensors") for d in (killed, reference))
    for name, expected in reference_weights.items():
        assert torch.equal(weights[name], expected), f"{name} differs from the uninterrupted run"
    assert step_logs(killed) == step_logs(reference)
