"""The built-in tasks' presets of `gmpo train`: the settings a run without `--dataset_name` starts from."""

# The built-in default run: the shipped 0.4M-parameter policy on 2-digit addition, off-policy (8 optimizer steps per
# rollout, as in the paper) on CPU. Measured in docs/cli.md: about +20 points of held-out accuracy in ~2 minutes.
TASK_PRESETS = {
    "addition": {
        "output_dir": "runs/gmpo-addition",
        "reward_funcs": ["exact_match"],
        "use_cpu": True,
        "bf16": False,
        "activation_checkpointing": False,  # a 2-layer model: recomputation only costs time
        "report_to": "none",
        "per_device_train_batch_size": 256,  # 32 prompts x 8 completions per optimizer step
        "num_generations": 8,
        "steps_per_generation": 8,  # rollouts of 256 prompts, 8 optimizer steps each: the clip can act
        "max_completion_length": 4,  # the answer (at most 3 digits) and EOS
        "temperature": 0.7,  # at 1.0 the sampled reward starts far below greedy accuracy and learning is slower
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "max_steps": 200,
        "logging_steps": 1,  # one log row per step: the per-step log-ratio extremes are what the plots show
        "save_strategy": "steps",  # checkpoints to resume from: measured at under 1% of the run time, docs/cli.md
        "save_steps": 20,  # not a multiple of the 8 steps per rollout: checkpoints inside a rollout resume exactly too
        "save_total_limit": 2,
        "num_threads": 1,  # tiny matrices: one thread is faster than two, and much faster on a busy machine
    },
}
