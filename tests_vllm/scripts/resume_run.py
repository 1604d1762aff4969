"""Checkpointed GMPO training that generates with vLLM (colocate, CPU), killed with SIGKILL and restarted by a test.

Usage (PYTHONPATH = repository root):
    python resume_run.py OUTPUT_DIR CONFIG_JSON [KIND STEP]
    accelerate launch --config_file tests/configs/zero3-cpu.yaml resume_run.py ...   (one vLLM engine per process)

Every start calls `train(resume_from_checkpoint=True)` on the shipped addition policy. With KIND STEP the process
sends itself SIGKILL during optimizer step STEP + 1 (KIND "generate": after vLLM generated a new rollout, while it is
scored; "loss": in a loss computation). Each rollout's completion token ids go to OUTPUT_DIR/rollouts/stepN.rankR.json as
soon as they are generated (N: the global step that generated them, R the process; a later start overwrites). A finished start
writes OUTPUT_DIR/final/model.safetensors and OUTPUT_DIR/report.json (log history, the steps this start ran).
CONFIG_JSON holds GMPOConfig overrides of `tests_vllm.conftest.vllm_config`, and "sync_check": true to sync once
more after training and write OUTPUT_DIR/sync_check.rankR.json (`sync_check`).
"""

import json
import os
import signal
import sys

import torch
from transformers import TrainerCallback

from gmpo import GMPOTrainer
from gmpo.tasks import exact_match_reward, make_dataset
from tests_vllm.conftest import POLICY, vllm_config

torch.set_num_threads(1)  # before vLLM binds its threads: both starts then compute with the same thread count


class KilledTrainer(GMPOTrainer):
    """GMPOTrainer that dies at `kill = (kind, step)` and records the completions of each rollout it generates."""

    kill = None

    def _die_if(self, kind: str) -> None:
        if self.kill == (kind, self.state.global_step):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        folder = os.path.join(self.args.output_dir, "rollouts")
        os.makedirs(folder, exist_ok=True)
        name = f"step{self.state.global_step}.rank{self.accelerator.process_index}.json"
        with open(os.path.join(folder, name), "w") as f:
            json.dump([list(ids) for ids in completion_ids_list], f)
        self._die_if("generate")
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _compute_loss(self, model, inputs):
        self._die_if("loss")
        return super()._compute_loss(model, inputs)


class RecordSteps(TrainerCallback):
    """The optimizer steps this start ran."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def sync_check(trainer, shipped) -> dict:
    """After a final sync: mean |log p| difference of this process's engine to the trainer's model (float64), and of
    the model to `shipped` (the engine's log-probs before training); whether ZeRO-3 partitions the parameters here."""
    from tests_vllm.conftest import engine_logps, model_logps, sequences

    trainer.vllm_generation.sync_weights()  # every process: ZeRO-3 gathers each parameter collectively
    partitioned = any(p.numel() == 0 for p in trainer.model.parameters())
    with trainer.vllm_generation._dist.gather_params(list(trainer.model.parameters())):  # TRL's ZeRO-3 gather
        trained = model_logps(trainer.model, sequences(trainer))
    engine = engine_logps(trainer, sequences(trainer))
    return {"engine_vs_trained": (engine - trained).abs().mean().item(),
            "trained_vs_shipped": (trained - shipped).abs().mean().item(), "partitioned": partitioned,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "num_processes": trainer.accelerator.num_processes}


def main(output_dir: str, overrides: dict, kill) -> None:
    check = overrides.pop("sync_check", False)
    args = vllm_config(output_dir, save_strategy="steps", **overrides)
    trainer = KilledTrainer(model=POLICY, reward_funcs=exact_match_reward, args=args,
                            train_dataset=make_dataset("addition", 512, 0, "train"))
    trainer.kill = kill
    if check:
        from tests_vllm.conftest import engine_logps, sequences

        shipped = engine_logps(trainer, sequences(trainer))  # vLLM loaded the shipped checkpoint from disk
    recorder = RecordSteps()
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=True)
    trainer.save_model(os.path.join(output_dir, "final"))
    report = {"log_history": trainer.state.log_history, "trained_steps": recorder.steps}
    if check:
        result = sync_check(trainer, shipped)
        with open(os.path.join(output_dir, f"sync_check.rank{trainer.accelerator.process_index}.json"), "w") as f:
            json.dump(result, f)
    if trainer.accelerator.is_main_process:
        with open(os.path.join(output_dir, "report.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    kill_spec = sys.argv[3:5]
    main(sys.argv[1], json.loads(sys.argv[2]), (kill_spec[0], int(kill_spec[1])) if kill_spec else None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # vLLM's engine threads can hang the interpreter's shutdown after everything is saved
