"""A plain 2-process GMPO run on the tiny model; every rank writes what the test checks.

Usage: torchrun --standalone --nproc_per_node 2 ddp_train.py MODEL_DIR OUTPUT_DIR   (PYTHONPATH = repository root)

Rank r writes OUTPUT_DIR/rank{r}.json: the distributed setup it ran under, a hash of its final parameters (DDP keeps
the replicas identical) and, on rank 0, the trainer's log history.
"""

import hashlib
import json
import os
import sys

import torch
from accelerate import PartialState
from datasets import Dataset

from gmpo import GMPOTrainer
from tests.conftest import count_ones_reward, tiny_config

model_dir, output_dir = sys.argv[1], sys.argv[2]
dataset = Dataset.from_dict({"prompt": [f"{10 + i}+{20 + i}=" for i in range(64)]})
trainer = GMPOTrainer(model=model_dir, reward_funcs=count_ones_reward, train_dataset=dataset,
                      args=tiny_config(output_dir, max_steps=3))
trainer.train()

state = PartialState()
digest = hashlib.sha256()
for _, param in sorted(trainer.model.named_parameters()):
    digest.update(param.detach().to(torch.float32).contiguous().numpy().tobytes())
report = {
    "num_processes": state.num_processes,
    "distributed_type": str(state.distributed_type),
    "backend": state.backend,
    "params_sha256": digest.hexdigest(),
    "params_finite": all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()),
    "log_history": trainer.state.log_history if state.is_main_process else None,
}
with open(f"{output_dir}/rank{state.process_index}.json", "w") as f:
    json.dump(report, f)
trainer.end()
# Leave without C++ static destructors: at interpreter teardown a torch/gloo background thread can still be joinable,
# and the process then aborts ("terminate called without an active exception") after all work is done and saved.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
