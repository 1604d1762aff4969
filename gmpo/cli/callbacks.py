"""Trainer callbacks of `gmpo train`: a compact progress bar and the built-in task's held-out greedy accuracy."""

from transformers import ProgressCallback, TrainerCallback

from gmpo.tasks import greedy_accuracy


class CompactProgress(ProgressCallback):
    """The Trainer's tqdm bar with reward, clip fraction and log-ratio range as its postfix, instead of printing one
    dict per logged step (every metric is in trainer_state.json and the plots)."""

    def __init__(self):
        super().__init__()
        self.postfix: dict[str, str] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The reward is logged on the step that generates a rollout, the clip statistics on every step.
        logs = logs or {}
        if "reward" in logs:
            self.postfix["reward"] = f"{logs['reward']:.3f}"
        if "clip_ratio/region_mean" in logs:
            self.postfix["clipped"] = f"{logs['clip_ratio/region_mean']:.3f}"
        if "gmpo/log_ratio_min" in logs and "gmpo/log_ratio_max" in logs:
            self.postfix["log_ratio"] = f"[{logs['gmpo/log_ratio_min']:.2f}, {logs['gmpo/log_ratio_max']:.2f}]"
        if self.training_bar is not None and self.postfix:
            self.training_bar.set_postfix(self.postfix, refresh=False)


class HeldOutAccuracy(TrainerCallback):
    """Greedy exact-match accuracy on a held-out split: before training, every `every` optimizer steps (0: never),
    and after training. Each measurement is a ``{"step", "greedy_accuracy"}`` row of the log history, so
    trainer_state.json and every checkpoint keep it; `history` holds the (step, accuracy) pairs. A resumed run takes
    its accuracy before training from the step-0 row of the checkpoint's log history instead of measuring again."""

    def __init__(self, tokenizer, dataset, every: int):
        self.tokenizer, self.dataset, self.every = tokenizer, dataset, every
        self.history: list[tuple[int, float]] = []

    def _measure(self, state, model) -> float:
        accuracy = greedy_accuracy(model, self.tokenizer, self.dataset)
        self.history.append((state.global_step, accuracy))
        state.log_history.append({"step": state.global_step, "greedy_accuracy": accuracy})
        return accuracy

    def restore(self, state) -> bool:
        """Take the measurements the log history already holds (a resumed run); True when it held the step-0 one."""
        self.history = [(row["step"], row["greedy_accuracy"]) for row in state.log_history if "greedy_accuracy" in row]
        return bool(self.history) and self.history[0][0] == 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        note = ""
        if state.global_step > 0 and self.restore(state):
            note = f", measured at step 0; resuming at step {state.global_step}"
        else:
            self._measure(state, model)
        if state.is_world_process_zero:
            print(f"held-out greedy accuracy before training: {100 * self.history[0][1]:.1f}% "
                  f"({len(self.dataset)} prompts{note})")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self._measure(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._measure(state, model)

    def before_and_after(self, state, model) -> tuple[float, float]:
        """Accuracy before training and at `state.global_step`, measuring the latter if no callback did."""
        if not self.history:
            self.restore(state)
        if not self.history or self.history[-1][0] != state.global_step:
            self._measure(state, model)
        return self.history[0][1], self.history[-1][1]
