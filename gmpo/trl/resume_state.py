"""What GRPOTrainer holds in memory between optimizer steps, written with each checkpoint and restored on resume.

Per rank R, in `checkpoint-N/`:

- `gmpo_rollout_buffer.rank{R}.safetensors`: the rollout buffer (`_buffered_inputs`: `steps_per_generation`
  micro-batches of generated completions, old/ref log-probs, advantages, ...) as tensors named `{i}/{key}`, unless
  the checkpoint is at a rollout boundary, and the Trainer's not-yet-logged loss sum (`trainer/tr_loss`), bit for bit;
- `gmpo_trainer_memory.rank{R}.json`: TRL's micro-step counter `_step` (which slice of the buffer comes next and
  when to generate again), the non-tensor buffer entries (None, lists), the metrics gathered since the last log,
  the step of the last log, the adaptive entropy controller and the non-finite-gradient skip counter.

Everything else a resumed run needs (weights, optimizer, scheduler, RNG states, TrainerState, data position) is the
Trainer's checkpoint; `EpochReplayRepeatSampler` makes the data order of a resumed epoch > 0 the uninterrupted one.
"""

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from trl.trainer.utils import RepeatSampler

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _paths(checkpoint_dir, rank: int) -> tuple[Path, Path]:
    checkpoint_dir = Path(checkpoint_dir)
    return (checkpoint_dir / f"gmpo_rollout_buffer.rank{rank}.safetensors",
            checkpoint_dir / f"gmpo_trainer_memory.rank{rank}.json")


def _encode_buffer(buffer, tensors: dict) -> list | None:
    """JSON layout of the rollout buffer; its tensors go into `tensors` (copied: safetensors refuses shared memory)."""
    if buffer is None:
        return None
    layout = []
    for i, batch in enumerate(buffer):
        entry = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                tensors[f"{i}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
                entry[key] = {"tensor": f"{i}/{key}"}
            else:
                json.dumps(value)  # TypeError for a value JSON cannot hold; the caller then drops the buffer
                entry[key] = {"value": value}
        layout.append(entry)
    return layout


def _decode_buffer(layout, tensors: dict, device) -> list | None:
    if layout is None:
        return None
    return [
        {key: tensors[item["tensor"]].to(device) if "tensor" in item else item["value"] for key, item in entry.items()}
        for entry in layout
    ]


def save_trainer_memory(trainer, checkpoint_dir) -> None:
    """Write this rank's part of the in-memory state to `checkpoint_dir` (the safetensors file before the JSON)."""
    rank = trainer.accelerator.process_index
    tensors_path, json_path = _paths(checkpoint_dir, rank)
    tr_loss = getattr(trainer, "_tr_loss", None)  # set by the training loop; absent outside it
    tr_loss = torch.zeros(1) if tr_loss is None else tr_loss.detach().to("cpu", copy=True).reshape(1)
    tensors = {"trainer/tr_loss": tr_loss}
    generate_every = trainer.args.steps_per_generation * trainer.num_iterations
    # At a rollout boundary the next step generates a new rollout: the old one is not needed.
    buffered = None if trainer._step % generate_every == 0 else trainer._buffered_inputs
    try:
        buffer = _encode_buffer(buffered, tensors)
    except TypeError as err:
        logger.warning(f"The rollout buffer holds a value JSON cannot store ({err}); this checkpoint is saved without "
                       "it, and a run resumed from it regenerates the rest of the rollout.")
        buffer = None
        tensors = {"trainer/tr_loss": tensors["trainer/tr_loss"]}
    save_file(tensors, str(tensors_path))
    memory = {
        "format": FORMAT_VERSION,
        "global_step": trainer.state.global_step,
        "world_size": trainer.accelerator.num_processes,
        "step": trainer._step,
        "buffer": buffer,
        "metrics": {mode: dict(values) for mode, values in trainer._metrics.items()},
        "globalstep_last_logged": getattr(trainer, "_globalstep_last_logged", trainer.state.global_step),
        "entropy_coef": trainer.entropy_coef,
        "last_world_entropy": trainer._last_world_entropy,
        "nonfinite_steps_skipped": getattr(trainer, "_nonfinite_guard", None) and trainer._nonfinite_guard.skipped,
    }
    with open(json_path, "w") as f:
        json.dump(memory, f)


def load_trainer_memory(trainer, checkpoint_dir) -> dict | None:
    """Restore this rank's in-memory state from `checkpoint_dir`; returns the logging accumulators to restore once
    the training loop has reset them (`RestoreLoggingState`), or None when the checkpoint has no such state."""
    rank = trainer.accelerator.process_index
    tensors_path, json_path = _paths(checkpoint_dir, rank)
    if not json_path.is_file():
        logger.warning(f"{checkpoint_dir} has no {json_path.name}: the rollout buffer and step counters are not "
                       "restored; a resume inside a rollout regenerates it (not the uninterrupted trajectory).")
        return None
    memory = json.loads(json_path.read_text())
    tensors = load_file(str(tensors_path))
    buffer = _decode_buffer(memory["buffer"], tensors, trainer.accelerator.device)
    if buffer is not None and memory["world_size"] != trainer.accelerator.num_processes:
        logger.warning(f"{checkpoint_dir} was written by {memory['world_size']} processes, this run has "
                       f"{trainer.accelerator.num_processes}: each process held its own part of the rollout, so the rest "
                       "of it is regenerated (not the uninterrupted trajectory).")
        buffer = None
    if buffer is not None and len(buffer) != trainer.args.steps_per_generation:
        logger.warning(f"{checkpoint_dir} holds a rollout of {len(buffer)} micro-batches but steps_per_generation is "
                       f"{trainer.args.steps_per_generation}: the rollout is regenerated.")
        buffer = None
    trainer._buffered_inputs = buffer
    trainer._step = memory["step"]
    for mode, values in memory["metrics"].items():
        trainer._metrics[mode] = defaultdict(list, values)
    trainer.entropy_coef = memory["entropy_coef"]
    trainer._last_world_entropy = memory["last_world_entropy"]
    if getattr(trainer, "_nonfinite_guard", None) is not None:
        trainer._nonfinite_guard.skipped = memory["nonfinite_steps_skipped"]
    return {"tr_loss": tensors["trainer/tr_loss"], "globalstep_last_logged": memory["globalstep_last_logged"]}


class RestoreLoggingState(TrainerCallback):
    """Puts back the Trainer's not-yet-logged loss sum and last-log step, which its training loop resets to zero
    after loading a checkpoint: the first log after a resume then averages over the same steps as without one."""

    def __init__(self, trainer, pending: dict | None):
        self.trainer, self.pending = trainer, pending

    def on_train_begin(self, args, state, control, **kwargs):
        if self.pending is not None:
            trainer, pending = self.trainer, self.pending
            trainer._tr_loss = pending["tr_loss"].to(trainer._tr_loss.device).reshape(trainer._tr_loss.shape)
            trainer._globalstep_last_logged = pending["globalstep_last_logged"]
            self.pending = None


class EpochReplayRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler whose permutation for epoch e does not depend on how many epochs this process ran.

    RepeatSampler draws each epoch's permutation from one generator seeded once, so a run resumed in epoch e > 0
    would get epoch 0's order. `set_epoch(e)` (called by the Trainer before every epoch) reseeds the generator and
    replays e draws: the uninterrupted order, resumed or not.
    """

    def set_epoch(self, epoch: int) -> None:
        if not self.shuffle or self.seed is None:
            return
        self.generator.manual_seed(self.seed)
        for _ in range(epoch):
            torch.randperm(self.num_samples, generator=self.generator)


def rank_files(checkpoint_dir, world_size: int) -> list[str]:
    """Names of the per-rank state files a complete checkpoint of `world_size` processes holds."""
    return [path.name for rank in range(world_size) for path in _paths(checkpoint_dir, rank)]

