"""Checkpointed GMPO training on the tiny model: killed right after a checkpoint, or resumed from one.

Usage (PYTHONPATH = repository root):
    python resume_run.py MODEL_DIR OUTPUT_DIR kill     train with checkpoints; SIGKILL right after checkpoint-{KILL_AT}
    python resume_run.py MODEL_DIR OUTPUT_DIR resume   a new trainer resumes from checkpoint-{KILL_AT} and finishes

`resume` writes OUTPUT_DIR/final/model.safetensors and OUTPUT_DIR/resumed.json (log history, steps it ran). The test imports `make_trainer`
for its uninterrupted run, so both runs are configured by the same code.
"""

import json
import os
import signal
import sys

from datasets import Dataset
from transformers import TrainerCallback

from gmpo import GMPOTrainer
from tests.conftest import count_ones_reward, tiny_config

MAX_STEPS = 6
STEPS_PER_GENERATION = 2
# Checkpoints at generation boundaries, every `steps_per_generation` optimizer steps (one micro-batch each); resuming
# from checkpoints inside a rollout is tested in tests/test_exact_resume.py and tests/test_chaos.py.
SAVE_STEPS = STEPS_PER_GENERATION
KILL_AT = 4


class KillAfterCheckpoint(TrainerCallback):
    """Dies like an OOM-killed or preempted job: SIGKILL, no cleanup, once checkpoint-{step} is fully written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordSteps(TrainerCallback):
    """The optimizer steps this process actually ran."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def make_trainer(model_dir: str, output_dir: str, callbacks=None) -> GMPOTrainer:
    args = tiny_config(output_dir, max_steps=MAX_STEPS, steps_per_generation=STEPS_PER_GENERATION,
                       save_strategy="steps", save_steps=SAVE_STEPS)
    dataset = Dataset.from_dict({"prompt": [f"{10 + i}+{20 + i}=" for i in range(64)]})
    return GMPOTrainer(model=model_dir, reward_funcs=count_ones_reward, args=args, train_dataset=dataset,
                       callbacks=callbacks)


if __name__ == "__main__":
    model_dir, output_dir, mode = sys.argv[1:4]
    if mode == "kill":
        make_trainer(model_dir, output_dir, callbacks=[KillAfterCheckpoint(KILL_AT)]).train()
        sys.exit("still alive after the checkpoint: the kill callback never fired")
    recorder = RecordSteps()
    trainer = make_trainer(model_dir, output_dir, callbacks=[recorder])
    trainer.train(resume_from_checkpoint=os.path.join(output_dir, f"checkpoint-{KILL_AT}"))
    trainer.save_model(os.path.join(output_dir, "final"))
    with open(os.path.join(output_dir, "resumed.json"), "w") as f:
        json.dump({"log_history": trainer.state.log_history, "trained_steps": recorder.steps}, f)
