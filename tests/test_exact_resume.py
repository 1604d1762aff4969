"""Resuming from a checkpoint inside a rollout equals the uninterrupted run; incomplete checkpoints are never loaded."""

import json
import logging
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from gmpo import GMPOTrainer

from .conftest import count_ones_reward, tiny_config

MARKER = "gmpo_checkpoint_complete.json"

# Each case checkpoints inside a rollout (save_steps not a multiple of the optimizer steps per rollout).
CASES = {
    # 4 micro-batches per rollout, one per optimizer step; logs every 2 steps, so checkpoint-3 holds a loss not yet
    # logged.
    "steps_per_generation>grad_accum": dict(steps_per_generation=4, gradient_accumulation_steps=1, max_steps=6,
                                            save_steps=3, logging_steps=2),
    # 4 micro-batches per rollout, 2 per optimizer step: checkpoint-1 and -3 fall between the two halves.
    "grad_accum=2": dict(steps_per_generation=4, gradient_accumulation_steps=2, max_steps=4, save_steps=1),
    # each rollout of 2 micro-batches is used twice: checkpoint-3 is inside its second pass.
    "num_iterations=2": dict(steps_per_generation=2, num_iterations=2, max_steps=6, save_steps=3),
}
RESUME_AT = {"steps_per_generation>grad_accum": 3, "grad_accum=2": 1, "num_iterations=2": 3}


class RecordSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def make_trainer(model_dir, output_dir, **overrides):
    dataset = Dataset.from_dict({"prompt": [f"{10 + i}+{20 + i}=" for i in range(32)]})
    recorder = RecordSteps()
    trainer = GMPOTrainer(model=model_dir, reward_funcs=count_ones_reward, train_dataset=dataset,
                          args=tiny_config(output_dir, save_strategy="steps", **overrides), callbacks=[recorder])
    return trainer, recorder


def step_logs(trainer) -> dict[int, dict]:
    """Per-step log rows without the wall-clock step time."""
    return {log["step"]: {k: v for k, v in log.items() if k != "step_time"}
            for log in trainer.state.log_history if "loss" in log}


@pytest.fixture(scope="module", params=list(CASES))
def uninterrupted(request, tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    trainer, _ = make_trainer(tiny_model_dir, output_dir, **CASES[request.param])
    trainer.train()
    return request.param, output_dir, trainer


def test_resume_inside_a_rollout_equals_the_uninterrupted_run(tiny_model_dir, tmp_path, uninterrupted):
    case, output_dir, reference = uninterrupted
    resume_at = RESUME_AT[case]
    checkpoint = output_dir / f"checkpoint-{resume_at}"
    assert checkpoint.is_dir()
    trainer, recorder = make_trainer(tiny_model_dir, tmp_path, **CASES[case])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert recorder.steps == list(range(resume_at + 1, CASES[case]["max_steps"] + 1)), "did not resume"
    # Bit for bit: both runs are the same computation in this process (same thread count and shapes), so any
    # difference means the resumed run lost some state, e.g. regenerated the rest of the rollout.
    for name, param in reference.model.named_parameters():
        assert torch.equal(trainer.model.get_parameter(name), param), f"{name} differs after resuming ({case})"
    expected, got = step_logs(reference), step_logs(trainer)
    assert sorted(got) == sorted(expected) and expected
    for step in expected:
        assert got[step] == expected[step], f"step {step} logged different metrics after resuming ({case})"


def test_rollout_state_is_safetensors_and_json(uninterrupted):
    checkpoint = uninterrupted[1] / f"checkpoint-{RESUME_AT[uninterrupted[0]]}"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"gmpo_rollout_buffer.rank0.safetensors", "gmpo_trainer_memory.rank0.json", MARKER} <= names
    memory = json.loads((checkpoint / "gmpo_trainer_memory.rank0.json").read_text())
    assert memory["buffer"] is not None and memory["step"] > 0, "a mid-rollout checkpoint must hold the rollout"


def test_incomplete_checkpoints_are_never_loaded(tiny_model_dir, tmp_path, uninterrupted, caplog):
    case, output_dir, _ = uninterrupted
    if case != "num_iterations=2":
        pytest.skip("one case is enough")
    run_dir = tmp_path / "run"
    shutil.copytree(output_dir / "checkpoint-3", run_dir / "checkpoint-3")
    shutil.copytree(output_dir / "checkpoint-6", run_dir / "checkpoint-6")
    (run_dir / "checkpoint-6" / "trainer_state.json").unlink()  # killed while writing checkpoint-6
    (run_dir / "checkpoint-6" / MARKER).unlink(missing_ok=True)

    trainer, recorder = make_trainer(tiny_model_dir, run_dir, **CASES[case])
    with pytest.raises(ValueError, match="checkpoint-6.*not a complete checkpoint"):
        trainer.train(resume_from_checkpoint=str(run_dir / "checkpoint-6"))
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert recorder.steps == [4, 5, 6], "resume=True did not take the newest complete checkpoint"
    assert "skipped incomplete checkpoint(s): checkpoint-6" in caplog.text


def test_resume_true_without_a_complete_checkpoint_starts_at_step_0(tiny_model_dir, tmp_path, caplog):
    (tmp_path / "checkpoint-2").mkdir()  # a write killed before anything landed
    trainer, recorder = make_trainer(tiny_model_dir, tmp_path, max_steps=2, save_steps=2)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert recorder.steps == [1, 2]
    assert "no complete checkpoint" in caplog.text and "starts from step 0" in caplog.text
    assert (tmp_path / "checkpoint-2" / MARKER).is_file(), "the rewritten checkpoint was not marked complete"
