"""Time saved by `skip_zero_advantage_rows` on the built-in addition task.

Trains the shipped addition policy with the switch on and off, same seed and data, interleaved over rounds, and
reports per optimizer step:
  - loss forward + backward: the training_step time of steps that reuse a buffered generation (no sampling),
  - whole step: on_step_begin -> on_step_end, generation steps included,
  - the measured fraction of zero-variance groups and of skipped rows.
The sampling temperature sets how many groups have identical rewards; the default gives roughly half.

    python benchmarks/skip_rows.py            # ~3 min on 2 CPU cores
    python benchmarks/skip_rows.py --quick
"""

import argparse
import statistics
import tempfile
import time

import torch
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

from gmpo import GMPOConfig, GMPOTrainer
from gmpo.tasks import exact_match_reward, make_dataset, policy_path

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
parser.add_argument("--rounds", type=int, default=3, help="on/off pairs, order alternating")
parser.add_argument("--batch-size", type=int, default=256, help="rows per optimizer step")
parser.add_argument("--num-generations", type=int, default=8)
parser.add_argument("--steps-per-generation", type=int, default=4)
parser.add_argument("--temperature", type=float, default=0.2, help="lower: more groups with identical rewards")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--quick", action="store_true", help="8 steps, 1 round")
args = parser.parse_args()
if args.quick:
    args.steps, args.rounds = 8, 1

torch.set_num_threads(2)
hf_logging.set_verbosity_error()
dataset = make_dataset("addition", size=args.batch_size * args.steps, seed=args.seed)


class TimedTrainer(GMPOTrainer):
    """Records the duration of training_step, split by whether it sampled a new generation batch."""

    def training_step(self, model, inputs, num_items_in_batch):
        generates = self._step % (self.args.steps_per_generation * self.num_iterations) == 0
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        (self.generation_step_times if generates else self.loss_step_times).append(time.perf_counter() - start)
        return loss


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def run(skip: bool) -> dict:
    config = GMPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.batch_size, num_generations=args.num_generations,
        steps_per_generation=args.steps_per_generation, max_completion_length=4, temperature=args.temperature,
        learning_rate=1e-4, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=args.seed, skip_zero_advantage_rows=skip,
    )
    trainer = TimedTrainer(model=str(policy_path("addition")), reward_funcs=exact_match_reward, args=config,
                           train_dataset=dataset)
    trainer.generation_step_times, trainer.loss_step_times = [], []
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {
        "loss_fwd_bwd": statistics.median(trainer.loss_step_times[1:]),  # the first reuse step warms up
        "step": statistics.mean(timer.times[1:]),
        "zero_std": statistics.mean(log["frac_reward_zero_std"] for log in logs if "frac_reward_zero_std" in log),
        "skipped": statistics.mean(log.get("skipped_rows_frac", 0.0) for log in logs),
    }


results = {True: [], False: []}
for round_index in range(args.rounds):
    for skip in ((True, False) if round_index % 2 == 0 else (False, True)):
        results[skip].append(run(skip))
        r = results[skip][-1]
        print(f"round {round_index + 1}/{args.rounds} skip={skip!s:5}  loss fwd+bwd {r['loss_fwd_bwd'] * 1e3:7.1f} ms"
              f"  step {r['step'] * 1e3:7.1f} ms  zero-std groups {r['zero_std']:.2f}  skipped {r['skipped']:.2f}",
              flush=True)


def median(skip, key):
    return statistics.median(r[key] for r in results[skip])


print(f"\nbuilt-in addition task, batch {args.batch_size}, G={args.num_generations}, "
      f"steps_per_generation={args.steps_per_generation}, temperature {args.temperature}, {args.steps} steps x "
      f"{args.rounds} rounds, torch threads 2")
print(f"{'':28}{'skip on':>12}{'skip off':>12}{'speedup':>10}")
for key, label in [("loss_fwd_bwd", "loss fwd+bwd / step (ms)"), ("step", "whole train step (ms)")]:
    on, off = median(True, key), median(False, key)
    print(f"{label:28}{on * 1e3:12.1f}{off * 1e3:12.1f}{off / on:9.2f}x")
print(f"{'zero-variance groups':28}{median(True, 'zero_std'):12.2f}{median(False, 'zero_std'):12.2f}")
print(f"{'rows skipped':28}{median(True, 'skipped'):12.2f}{median(False, 'skipped'):12.2f}")
kept = 1 - median(True, "skipped")
target = min(1 / kept, 1.6) if kept > 0 else 1.6
speedup = median(False, "loss_fwd_bwd") / median(True, "loss_fwd_bwd")
print(f"target: loss fwd+bwd speedup >= {target:.2f}x at {1 - kept:.0%} skipped -> "
      f"{'met' if speedup >= target else 'NOT met'} ({speedup:.2f}x)")
