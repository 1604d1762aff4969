"""Two-process GMPO run in which rank 1 only ever sees zero-advantage rows (its groups have constant rewards).

Usage: torchrun --nproc_per_node 2 ddp_skip_rows.py MODEL_DIR OUTPUT_DIR SKIP(1|0)
"""

import os
import sys

from accelerate import PartialState
from datasets import Dataset

from gmpo import GMPOConfig, GMPOTrainer


def rank_dependent_reward(completions, **kwargs):
    if PartialState().process_index == 1:
        return [1.0] * len(completions)
    return [float(c.count("1")) for c in completions]


model_dir, output_dir, skip = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
args = GMPOConfig(
    output_dir=output_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, per_device_train_batch_size=8,
    num_generations=4, max_completion_length=6, steps_per_generation=2, max_steps=3, learning_rate=0.05,
    optim="sgd",  # final weights are compared: under SGD (unlike AdamW) gradient rounding stays rounding in the weights
    logging_steps=1, save_strategy="no", report_to="none", seed=0, skip_zero_advantage_rows=skip,
)
dataset = Dataset.from_dict({"prompt": [f"{10 + i}+{20 + i}=" for i in range(64)]})
trainer = GMPOTrainer(model=model_dir, reward_funcs=rank_dependent_reward, args=args, train_dataset=dataset)
trainer.train()
logs = [log for log in trainer.state.log_history if "skipped_rows_frac" in log]
if skip and PartialState().is_main_process:
    assert logs and all(log["skipped_rows_frac"] >= 0.5 for log in logs), logs
trainer.save_model(f"{output_dir}/final")
trainer.end()
# Leave without C++ static destructors: at interpreter teardown a torch/gloo background thread can still be joinable,
# and the process then aborts ("terminate called without an active exception") after all work is done and saved.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
