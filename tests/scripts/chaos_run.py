"""Checkpointed GMPO training on the tiny model that a test kills with SIGKILL and restarts, as a job script would.

Usage (PYTHONPATH = repository root; also under `torchrun --nproc_per_node 2` or `accelerate launch`):
    python chaos_run.py MODEL_DIR OUTPUT_DIR CONFIG_JSON [KIND STEP RANK]

Every start calls `train(resume_from_checkpoint=True)`. With KIND STEP RANK, process RANK sends itself SIGKILL at one
moment of optimizer step STEP + 1 (KIND "generate": while scoring a new rollout; "loss": in a loss computation) or
while writing checkpoint-STEP (KIND "save": weights and optimizer written, trainer_state.json not yet; "marker":
every file written but the completion marker). A run that finishes writes OUTPUT_DIR/final/model.safetensors and,
on rank 0, OUTPUT_DIR/report.json: the log history, the optimizer steps this start ran and the distributed setup.
CONFIG_JSON holds GMPOConfig fields, plus "num_prompts" and "restart" (true: once finished, start the job again in
the same process, writing OUTPUT_DIR/final-restart/ and the restart's steps and log history to the report).
"""

import json
import os
import signal
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback

from gmpo import GMPOTrainer
from tests.conftest import count_ones_reward, tiny_config

try:
    import gmpo.trl.resumable as resume_hooks
except ImportError:  # a gmpo without completion markers: the "marker" kill cannot fire
    resume_hooks = None

# One thread in every run: a resumed run then performs exactly the computation of the uninterrupted one, so their
# results can be compared bit for bit.
torch.set_num_threads(1)


class ChaosTrainer(GMPOTrainer):
    """GMPOTrainer that dies at `kill = (kind, step, rank)`."""

    kill = None

    def _die_if(self, kind: str) -> None:
        if self.kill == (kind, self.state.global_step, self.accelerator.process_index):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _calculate_rewards(self, *args, **kwargs):
        self._die_if("generate")
        return super()._calculate_rewards(*args, **kwargs)

    def _compute_loss(self, model, inputs):
        self._die_if("loss")
        return super()._compute_loss(model, inputs)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        self._die_if("save")


class RecordSteps(TrainerCallback):
    """The optimizer steps this process ran."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def start(model_dir: str, output_dir: str, config: dict, kill, final: str = "final") -> tuple[ChaosTrainer, list[int]]:
    """One start of the job: a new trainer resumes from the newest complete checkpoint and saves its model to
    OUTPUT_DIR/{final}; returns the trainer and the steps it ran."""
    num_prompts = config.get("num_prompts", 16)  # 16 prompts: an epoch is a few optimizer steps, so runs cross one
    dataset = Dataset.from_dict({"prompt": [f"{10 + i}+{20 + i}=" for i in range(num_prompts)]})
    settings = {k: v for k, v in config.items() if k not in ("num_prompts", "restart")}
    recorder = RecordSteps()
    trainer = ChaosTrainer(model=model_dir, reward_funcs=count_ones_reward, train_dataset=dataset,
                           args=tiny_config(output_dir, save_strategy="steps", **settings), callbacks=[recorder])
    trainer.kill = kill
    if resume_hooks is not None and kill is not None:
        mark_complete = resume_hooks.mark_complete

        def die_before_marker(*args, **kwargs):
            trainer._die_if("marker")
            mark_complete(*args, **kwargs)

        resume_hooks.mark_complete = die_before_marker
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model(os.path.join(output_dir, final))
    return trainer, recorder.steps


def main(model_dir: str, output_dir: str, config: dict, kill) -> None:
    """Start the job; with config["restart"], start it once more in this process after it finished (final-restart/)."""
    trainer, steps = start(model_dir, output_dir, config, kill)
    report = {"log_history": trainer.state.log_history, "trained_steps": steps,
              "num_processes": trainer.accelerator.num_processes,
              "distributed_type": str(trainer.accelerator.distributed_type)}
    if config.get("restart"):
        trainer, steps = start(model_dir, output_dir, config, None, final="final-restart")
        report.update(restart_trained_steps=steps, restart_log_history=trainer.state.log_history)
    if trainer.accelerator.is_main_process:
        with open(os.path.join(output_dir, "report.json"), "w") as f:
            json.dump(report, f)
    if trainer.accelerator.num_processes > 1:
        trainer.end()


if __name__ == "__main__":
    kill_spec = sys.argv[4:7]
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]),
         (kill_spec[0], int(kill_spec[1]), int(kill_spec[2])) if kill_spec else None)
    # Leave without C++ static destructors (a gloo thread can abort the process at teardown after all is saved).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
