"""The study's variants and settings, and one training run: (task, variant, seed) -> a JSON file.

Every run starts from the task's shipped policy (`gmpo.tasks.policy_path`), trains off-policy
(steps_per_generation 4 > gradient_accumulation_steps 1, so each rollout serves 4 optimizer steps and the ratios
move away from 1), beta 0, temperature 1, constant learning rate (as the paper), and ends with a held-out greedy
evaluation.
"""

import math
import os
import time
import warnings
from pathlib import Path

from benchmarks.files import write_json_atomic

E04 = math.exp(0.4)

# name -> (trainer, config overrides). GRPO's epsilon is ratio space: (1 - epsilon, 1 + epsilon_high).
# GMPO's is log space: (exp(-epsilon), exp(epsilon_high)).
VARIANTS = {
    "grpo-0.2": ("grpo", {"epsilon": 0.2}),
    "grpo-e0.4": ("grpo", {"epsilon": 1 - 1 / E04, "epsilon_high": E04 - 1}),
    "gmpo-e0.4": ("gmpo", {"epsilon": 0.4}),
    "gmpo-e0.2": ("gmpo", {"epsilon": 0.2}),
    "gmpo-seqclip": ("gmpo", {"epsilon": 0.4, "importance_sampling_level": "sequence_product"}),
    "gmpo-seqmean": ("gmpo", {"epsilon": 0.4, "importance_sampling_level": "sequence"}),
    "gmpo-noclip": ("gmpo", {"epsilon": float("inf")}),
    "gmpo-nonorm": ("gmpo", {"epsilon": 0.4, "length_normalization": False}),
    "pmpo-p1": ("gmpo", {"epsilon": 0.4, "mean_power": 1.0}),
    "pmpo-p-1": ("gmpo", {"epsilon": 0.4, "mean_power": -1.0}),
}
VARIANT_LABELS = {
    "grpo-0.2": "GRPO, ratio clip 1±0.2",
    "grpo-e0.4": "GRPO, ratio clip (e^-0.4, e^0.4)",
    "gmpo-e0.4": "GMPO, clip e^±0.4 (paper)",
    "gmpo-e0.2": "GMPO, clip e^±0.2",
    "gmpo-seqclip": "GMPO, sequence clip of the sum e^±0.4 (paper)",
    "gmpo-seqmean": "GMPO, sequence clip of the mean e^±0.4",
    "gmpo-noclip": "GMPO, no clip",
    "gmpo-nonorm": "GMPO, no 1/|o| exponent",
    "pmpo-p1": "mean_power=1 (arithmetic), clip e^±0.4",
    "pmpo-p-1": "mean_power=-1 (harmonic), clip e^±0.4",
}

# Per task: reward, completion budget, optimizer steps and rows per step (full study and --quick), eval set size.
# Learning rate and completion lengths follow the shipped policies' model cards (gmpo/assets/*/README.md).
TASKS = {
    "addition": {"reward": "exact_match", "max_completion_length": 4, "steps": 120, "batch": 128,
                 "quick_steps": 8, "eval_size": 512},
    "reverse": {"reward": "char_accuracy", "max_completion_length": 48, "steps": 96, "batch": 64,
                "quick_steps": 8, "eval_size": 128},
}
COMMON = {"learning_rate": 1e-4, "num_generations": 8, "steps_per_generation": 4, "gradient_accumulation_steps": 1,
          "beta": 0.0, "temperature": 1.0, "lr_scheduler_type": "constant", "train_data_seed": 1, "eval_data_seed": 0}


def run_name(task: str, variant: str, seed: int) -> str:
    return f"{task}__{variant}__seed{seed}"


def run_one(task: str, variant: str, seed: int, steps: int, out_path: Path, threads: int) -> dict:
    """Train one variant and write its JSON to `out_path` (written last, so a file on disk is a finished run)."""
    torch_threads(threads)
    import torch  # noqa: F401  (after the thread setting)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from benchmarks.stability.instrument import ProbedGMPOTrainer, ProbedGRPOTrainer, StepLog
    from gmpo import GMPOConfig
    from gmpo.tasks import char_accuracy_reward, exact_match_reward, greedy_scores, make_dataset, policy_path

    spec = TASKS[task]
    trainer_kind, overrides = VARIANTS[variant]
    settings = dict(
        output_dir=str(out_path.parent / "tmp" / out_path.stem), use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=seed, max_steps=steps,
        per_device_train_batch_size=spec["batch"], max_completion_length=spec["max_completion_length"],
        learning_rate=COMMON["learning_rate"], num_generations=COMMON["num_generations"],
        steps_per_generation=COMMON["steps_per_generation"],
        gradient_accumulation_steps=COMMON["gradient_accumulation_steps"], beta=COMMON["beta"],
        temperature=COMMON["temperature"], lr_scheduler_type=COMMON["lr_scheduler_type"], **overrides,
    )
    if trainer_kind == "grpo":
        config, trainer_cls = GRPOConfig(loss_type="grpo", **settings), ProbedGRPOTrainer
    else:
        # Forward every row, as GRPO does, so the probe sees the same tokens; the gradient is the same either way.
        config, trainer_cls = GMPOConfig(skip_zero_advantage_rows=False, **settings), ProbedGMPOTrainer
    path = policy_path(task)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    reward = {"exact_match": exact_match_reward, "char_accuracy": char_accuracy_reward}[spec["reward"]]
    train = make_dataset(task, steps * spec["batch"] // COMMON["num_generations"] + 64, COMMON["train_data_seed"])
    trainer = trainer_cls(model=model, reward_funcs=reward, args=config, train_dataset=train,
                          processing_class=tokenizer)
    trainer.setup_probe()
    trainer.add_callback(StepLog(trainer.probe_records))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    train_s = time.perf_counter() - start
    test = make_dataset(task, spec["eval_size"], COMMON["eval_data_seed"], split="test")
    scores = greedy_scores(trainer.model, tokenizer, test)
    result = {
        "task": task, "variant": variant, "seed": seed, "steps": steps, "trainer": trainer_kind,
        "config": {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in overrides.items()},
        "batch": spec["batch"], "max_completion_length": spec["max_completion_length"], **COMMON,
        "eval_size": spec["eval_size"], "scores": scores, "train_s": round(train_s, 1),
        "total_s": round(time.perf_counter() - start, 1), "threads": threads,
        "records": [dict(step=step, **row) for step, row in sorted(trainer.probe_records.items())],
    }
    write_json_atomic(out_path, result)
    return result


def initial_scores(task: str, threads: int) -> dict:
    """Held-out greedy scores of the shipped policy (step 0), on the same test set as the runs."""
    torch_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gmpo.tasks import greedy_scores, make_dataset, policy_path

    path = policy_path(task)
    test = make_dataset(task, TASKS[task]["eval_size"], COMMON["eval_data_seed"], split="test")
    return greedy_scores(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), test)


def torch_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
