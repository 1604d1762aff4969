"""The checkpoint and resume hooks of GMPOTrainer: exact resume from every checkpoint, all-or-nothing checkpoints."""

import logging
import math
import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from gmpo.trl.checkpoint import finished_state, mark_complete, resolve_resume_checkpoint, rotate_checkpoints, unmark
from gmpo.trl.resume_state import (
    EpochReplayRepeatSampler,
    RestoreLoggingState,
    load_trainer_memory,
    rank_files,
    save_trainer_memory,
)

logger = logging.getLogger(__name__)


class ExactResumeMixin:
    """For a GRPOTrainer subclass: each checkpoint also holds every rank's rollout buffer and counters and ends with a
    completion marker; `train(resume_from_checkpoint=...)` loads only complete checkpoints and restores all of it."""

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """Trainer.train, resuming only from complete checkpoints (`True`: the newest complete one, if any)."""
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        state = resume_from_checkpoint and finished_state(resume_from_checkpoint, self.args.max_steps)
        if state:  # the Trainer would run one more optimizer step past max_steps
            logger.warning(f"{resume_from_checkpoint} is the end of training (step {state.global_step}): its weights "
                           "and state are loaded, nothing is trained.")
            self._load_finished_checkpoint(resume_from_checkpoint, state)
            self.state = state
            return TrainOutput(state.global_step, math.nan, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _load_finished_checkpoint(self, checkpoint: str, state) -> None:
        """Load an end-of-training checkpoint without training. Under DeepSpeed and FSDP the weights are loaded into
        the prepared (sharded) model, as Trainer.train loads them: the unwrapped model's parameters may be partitions
        (ZeRO-3: shape [0]) that a full state dict cannot be copied into."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            self._prepare_for_training(state.max_steps, self.get_train_dataloader(), checkpoint)
        else:
            self._load_from_checkpoint(checkpoint)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint plus each rank's in-memory state, then the completion marker, then rotation."""
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            unmark(folder)  # a rewrite of an existing folder is incomplete until its new marker is written
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotated below, after the marker
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        save_trainer_memory(self, folder)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            num_processes = self.accelerator.num_processes
            mark_complete(folder, self.state.global_step, num_processes, rank_files(folder, num_processes))
            rotate_checkpoints(run_dir, limit, folder, self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            # The training loop resets its logging accumulators after this call: they are put back at on_train_begin.
            self.add_callback(RestoreLoggingState(self, load_trainer_memory(self, checkpoint)))

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        return EpochReplayRepeatSampler(sampler.data_source, sampler.mini_repeat_count, sampler.batch_size,
                                        sampler.repeat_count, sampler.shuffle, sampler.seed)
