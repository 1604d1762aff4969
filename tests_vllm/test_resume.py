"""Exact resume with vLLM generating (colocate, CPU).

vLLM's CPU sampler draws the noise of every request without its own seed (TRL passes none) from torch's global CPU
generator, in the training process; the Trainer saves that generator's state with every checkpoint (rng_state.pth)
and restores it on resume. So a resumed run samples the rollouts of the uninterrupted one: same completions, same
weights, same logged metrics, bit for bit, on the same machine.

Rollouts are generated at global steps 0, 2, 4, 6 (steps_per_generation 2); checkpoint-3 lies inside the second
rollout (its rest is in the checkpoint's rollout buffer), checkpoint-6 at a rollout boundary.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import vllm_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests_vllm", "scripts", "resume_run.py")
# lr 5e-4: the reward stays off 0 (at the suite's 3e-3 it collapses, every advantage is 0 and the weights stop).
CONFIG = dict(max_steps=7, save_steps=3, learning_rate=5e-4)


def recording_rollouts(trainer) -> dict:
    """The completion token ids of each rollout `trainer` generates, by the global step that generated it."""
    rollouts = {}
    score = trainer._calculate_rewards

    def record(inputs, prompts, completions, completion_ids_list):
        rollouts[trainer.state.global_step] = [list(ids) for ids in completion_ids_list]
        return score(inputs, prompts, completions, completion_ids_list)

    trainer._calculate_rewards = record
    return rollouts


def step_logs(log_history) -> dict:
    return {log["step"]: {k: v for k, v in log.items() if k != "step_time"} for log in log_history if "loss" in log}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    trainer = vllm_trainer(output_dir, save_strategy="steps", **CONFIG)
    rollouts = recording_rollouts(trainer)
    trainer.train()
    return output_dir, trainer, rollouts


def sample(trainer, seed: int) -> list[list[int]]:
    """Completions of 32 addition prompts by `trainer`'s vLLM engine at temperature 1, after torch.manual_seed(seed)."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": trainer.processing_class(f"{10 + i}+{20 + i}=")["input_ids"]} for i in range(32)]
    torch.manual_seed(seed)
    outputs = trainer.vllm_generation.llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=4),
                                                   use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def test_vllm_sampler_noise_comes_from_torchs_global_generator(uninterrupted):
    trainer = uninterrupted[1]
    assert sample(trainer, 0) == sample(trainer, 0), "vLLM's samples do not follow torch's global CPU generator"
    assert sample(trainer, 0) != sample(trainer, 1)


def test_resume_inside_a_rollout_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    output_dir, reference, reference_rollouts = uninterrupted
    trainer = vllm_trainer(tmp_path, save_strategy="steps", **CONFIG)
    rollouts = recording_rollouts(trainer)
    trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-3"))
    assert sorted(rollouts) == [4, 6], "the rest of rollout 2 comes from the checkpoint, 4 and 6 from vLLM"
    for step in rollouts:
        assert rollouts[step] == reference_rollouts[step], f"vLLM sampled rollout {step} differently after the resume"
    for name, param in reference.model.named_parameters():
        assert torch.equal(trainer.model.get_parameter(name), param), f"{name} differs after resuming"
    assert step_logs(trainer.state.log_history) == step_logs(reference.state.log_history)


def launch(output_dir, kill=()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, SCRIPT, str(output_dir), json.dumps(CONFIG), *[str(x) for x in kill]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow  # 4 processes, each starting a vLLM engine: 1-1.5 min each on 2 busy cores
def test_killed_inside_and_between_rollouts_equals_the_uninterrupted_run(tmp_path):
    reference = tmp_path / "uninterrupted"
    assert launch(reference).returncode == 0
    killed = tmp_path / "killed"
    # Killed at step 5 (checkpoint-3: inside a rollout), then at step 7 once vLLM generated rollout 6 (checkpoint-6:
    # the rollout boundary, so the resumed start generates rollout 6 again, in a new process and a new engine).
    for kill in (("loss", 4), ("generate", 6)):
        result = launch(killed, kill)
        assert result.returncode == -signal.SIGKILL, f"{kill} did not fire: {result.returncode}\n{result.stderr[-2000:]}"
    result = launch(killed)
    assert result.returncode == 0, result.stderr[-3000:]
    report, reference_report = (json.loads((d / "report.json").read_text()) for d in (killed, reference))
    assert report["trained_steps"] == [7], "the last start did not resume from checkpoint-6"
    for step in (0, 2, 4, 6):
        name = f"rollouts/step{step}.rank0.json"
        assert json.loads((killed / name).read_text()) == json.loads((reference / name).read_text()), name
    weights, reference_weights = (load_file(d / "final" / "model.safetensors") for d in (killed, reference))
    assert weights.keys() == reference_weights.keys()
    for name, expected in reference_weights.items():
        assert torch.equal(weights[name], expected), f"{name} differs from the uninterrupted run"
    assert step_logs(report["log_history"]) == step_logs(reference_report["log_history"])
