"""A NaN gradient on one rank under DeepSpeed, with nonfinite_grad_policy "skip" and then "stop".

Usage (PYTHONPATH = repository root):
    accelerate launch --config_file tests/configs/zero2-cpu.yaml deepspeed_nonfinite.py MODEL_DIR OUTPUT_DIR

Rank 1's loss is NaN at optimizer step NAN_AT_STEP (its gradient too; rank 0's is finite). Rank 0 writes
OUTPUT_DIR/report.json: for "skip", which steps changed the weights and the logged nonfinite_steps_skipped; for
"stop", the error and the step the run stopped at, and whether the weights stayed finite.
"""

import json
import math
import os
import sys

import torch
from datasets import Dataset

from gmpo import GMPOTrainer
from tests.conftest import count_ones_reward, tiny_config
from tests.test_reliability import NAN_AT_STEP, WeightsPerStep

torch.set_num_threads(1)


def poisoned_trainer(model_dir, output_dir, policy, callbacks=None):
    dataset = Dataset.from_dict({"prompt": [f"{10 + i}+{20 + i}=" for i in range(16)]})
    args = tiny_config(output_dir, max_steps=4, use_cpu=False, ddp_backend="gloo", optim="sgd",
                       nonfinite_grad_policy=policy)
    trainer = GMPOTrainer(model=model_dir, reward_funcs=count_ones_reward, train_dataset=dataset, args=args,
                          callbacks=callbacks)
    compute_loss = trainer._compute_loss

    def poisoned(model, inputs):
        loss = compute_loss(model, inputs)
        on_rank_1 = trainer.accelerator.process_index == 1
        return loss * math.nan if on_rank_1 and trainer.state.global_step + 1 == NAN_AT_STEP else loss

    trainer._compute_loss = poisoned
    return trainer


def main(model_dir, output_dir):
    recorder = WeightsPerStep()
    trainer = poisoned_trainer(model_dir, os.path.join(output_dir, "skip"), "skip", [recorder])
    trainer.train()
    report = {"distributed_type": str(trainer.accelerator.distributed_type),
              "changed": recorder.changed,
              "skipped": {log["step"]: log["nonfinite_steps_skipped"] for log in trainer.state.log_history
                          if "loss" in log}}
    trainer = poisoned_trainer(model_dir, os.path.join(output_dir, "stop"), "stop")
    try:
        trainer.train()
        report["stop_error"] = None
    except RuntimeError as err:
        report["stop_error"] = str(err)
    report["stop_step"] = trainer.state.global_step
    report["stop_finite"] = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    if trainer.accelerator.is_main_process:
        with open(os.path.join(output_dir, "report.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # without C++ static destructors (a gloo thread can abort the process at teardown)
