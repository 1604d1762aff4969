"""CPU time of one loss step (forward, loss, backward, clipping, pre-optimizer callbacks) of the three trainers,
interleaved in one process on the same model and the same micro-batch.

Whole training runs (step_time.py) carry run-to-run noise of several percent, more than the gap between the
trainers; here the three see identical work, alternate every repetition, and are timed in process CPU seconds.

    python benchmarks/loss_step.py                 # ~2 min on 2 CPU cores
    python benchmarks/loss_step.py --repeats 10    # quicker
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import TRAINERS, build_tiny_checkpoint, make_trainer  # noqa: E402
from step_time import parse_args as step_time_args  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--repeats", type=int, default=30, help="timed repetitions of each trainer")
parser.add_argument("--rows", type=int, default=32, help="rows in the micro-batch")
parser.add_argument("--prompt-length", type=int, default=6)
parser.add_argument("--completion-length", type=int, default=32)
parser.add_argument("--spread", type=float, default=0.3, help="std of the noise between old and current log-probs")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

torch.set_num_threads(args.threads)
model_args = step_time_args([])  # the same tiny model and trainer settings as step_time.py
model_args.model_dir = tempfile.mkdtemp()
build_tiny_checkpoint(model_args.model_dir, model_args.hidden_size, model_args.num_layers, args.seed)
trainers = {name: make_trainer(name, model_args, tempfile.mkdtemp(), TrainerCallback()) for name in TRAINERS}
for trainer in trainers.values():
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.create_optimizer_and_scheduler(num_training_steps=1)

g = torch.Generator().manual_seed(args.seed)
vocab = trainers["gmpo"].model.config.vocab_size
rows, prompt_length, length = args.rows, args.prompt_length, args.completion_length
batch = {
    "prompt_ids": torch.randint(4, vocab, (rows, prompt_length), generator=g),
    "prompt_mask": torch.ones(rows, prompt_length, dtype=torch.long),
    "completion_ids": torch.randint(4, vocab, (rows, length), generator=g),
    "completion_mask": torch.ones(rows, length, dtype=torch.long),
    "advantages": torch.randn(rows, generator=g),  # no exact zero: every trainer forwards every row
}
with torch.no_grad():
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    logits = trainers["gmpo"].model(input_ids=ids).logits[:, prompt_length - 1:-1]
    logps = logits.log_softmax(-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
batch["old_per_token_logps"] = logps + args.spread * torch.randn(logps.shape, generator=g)
batch["num_items_in_batch"] = torch.tensor(float(rows * length))


def loss_step(trainer) -> float:
    """CPU seconds of what a non-generation optimizer step does before optimizer.step()."""
    trainer.model.zero_grad()
    start = time.process_time()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    trainer.accelerator.backward(loss)
    trainer._clip_grad_norm(trainer.model)
    trainer.callback_handler.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)
    return time.process_time() - start


times = {name: [] for name in TRAINERS}
for repeat in range(args.repeats + 3):
    order = TRAINERS[repeat % 3:] + TRAINERS[:repeat % 3]
    for name in order:
        elapsed = loss_step(trainers[name])
        if repeat >= 3:  # the first three rounds warm up the allocator and kernels
            times[name].append(elapsed)

median = {name: statistics.median(values) for name, values in times.items()}
print(f"loss step (forward + loss + backward + clip + pre-optimizer callbacks), {rows} rows x {length} tokens, "
      f"hidden {model_args.hidden_size}, {model_args.num_layers} layers, {args.threads} thread(s), "
      f"median CPU ms of {args.repeats} interleaved repetitions")
for name in TRAINERS:
    print(f"  {name:9}{median[name] * 1e3:9.2f} ms")
print(f"ours / GRPO     {median['gmpo'] / median['grpo']:.4f}   (target <= 1.02)")
print(f"ours / TRL-GMPO {median['gmpo'] / median['trl-gmpo']:.4f}   (target <= 1.00)")
