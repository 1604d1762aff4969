"""One run of the study: (objective, updates per rollout, learning rate, seed) -> a JSON file.

Every run starts from the shipped `reverse` policy, samples the same budget of N * R completions (protocol.py),
splits each rollout into U optimizer updates (`protocol.schedule`), and evaluates held-out greedy accuracy after
fixed rollouts. The per-step probe (token log-ratio max/min, lag, entropy, KL to the initial policy) and the
Trainer's clip fractions and gradient norm come from `benchmarks.stability.instrument`, unchanged.
"""

import math
import os
import resource
import time
import warnings
from pathlib import Path

from benchmarks.files import write_json_atomic
from benchmarks.reuse import protocol
from benchmarks.stability.runs import VARIANT_LABELS, VARIANTS, torch_threads

TASK = "reverse"
MAX_COMPLETION_LENGTH = 48
NUM_GENERATIONS = 8
TRAIN_DATA_SEED, EVAL_DATA_SEED = 1, 0
EVAL_SIZE = 512

# The four objectives (names and configs from the stability study), plus the sampler mismatch: completions
# sampled by a copy of the policy whose weights are rounded to bf16 (as an inference engine holds them), with the
# trained fp32 policy computing the loss. Uncorrected: TRL 1.16 applies its importance-sampling correction only
# with use_vllm=True (see docs/results.md).
OBJECTIVES = {name: VARIANTS[name] for name in ("grpo-0.2", "grpo-e0.4", "gmpo-e0.4", "gmpo-e0.2")}
OBJECTIVES["gmpo-e0.4-bf16"] = VARIANTS["gmpo-e0.4"]
OBJECTIVES["grpo-0.2-bf16"] = VARIANTS["grpo-0.2"]
LABELS = {**{k: VARIANT_LABELS[k] for k in VARIANTS if k in OBJECTIVES},
          "gmpo-e0.4-bf16": "GMPO e^±0.4, bf16 sampler", "grpo-0.2-bf16": "GRPO 1±0.2, bf16 sampler"}


def run_name(objective: str, updates: int, lr: float, seed: int) -> str:
    return f"{objective}__u{updates}__lr{lr:g}__seed{seed}"


def run_one(objective: str, updates: int, lr: float, seed: int, out_path: Path, threads: int,
            rollouts: int = protocol.ROLLOUTS, eval_at: tuple[int, ...] = protocol.EVAL_ROLLOUTS,
            eval_size: int = EVAL_SIZE) -> dict:
    """Train one condition and write its JSON to `out_path` (written last: a file on disk is a finished run)."""
    torch_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from benchmarks.reuse.hooks import Bf16Sampler, EvalPoints
    from benchmarks.stability.instrument import ProbedGMPOTrainer, ProbedGRPOTrainer, StepLog
    from gmpo import GMPOConfig
    from gmpo.tasks import char_accuracy_reward, make_dataset, policy_path

    load_start = os.getloadavg()
    trainer_kind, overrides = OBJECTIVES[objective]
    sched = protocol.schedule(updates, rollouts=rollouts)
    settings = dict(
        output_dir=str(out_path.parent / "tmp" / out_path.stem), use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=seed, max_steps=sched.max_steps,
        per_device_train_batch_size=sched.per_device_train_batch_size,
        steps_per_generation=sched.steps_per_generation, num_iterations=sched.num_iterations,
        gradient_accumulation_steps=sched.gradient_accumulation_steps, learning_rate=lr,
        max_completion_length=MAX_COMPLETION_LENGTH, num_generations=NUM_GENERATIONS, beta=0.0, temperature=1.0,
        lr_scheduler_type="constant", **overrides,
    )
    if trainer_kind == "grpo":
        config, trainer_cls = GRPOConfig(loss_type="grpo", **settings), ProbedGRPOTrainer
    else:  # forward every row, as GRPO does, so the probe sees the same tokens; the gradient is the same
        config, trainer_cls = GMPOConfig(skip_zero_advantage_rows=False, **settings), ProbedGMPOTrainer
    path = policy_path(TASK)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    train = make_dataset(TASK, rollouts * protocol.ROLLOUT_ROWS // NUM_GENERATIONS + 64, TRAIN_DATA_SEED)
    sampler = Bf16Sampler() if objective.endswith("-bf16") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the on-policy warning at U = 1, TRL's experimental rollout_func notice
        trainer = trainer_cls(model=model, reward_funcs=char_accuracy_reward, args=config, train_dataset=train,
                              processing_class=tokenizer, rollout_func=sampler)
    trainer.setup_probe()
    trainer.add_callback(StepLog(trainer.probe_records))
    evals = EvalPoints(trainer, tokenizer, make_dataset(TASK, eval_size, EVAL_DATA_SEED, split="test"), sched,
                       eval_at)
    trainer.add_callback(evals)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    result = {
        "task": TASK, "objective": objective, "updates": updates, "lr": lr, "seed": seed,
        "trainer": trainer_kind, "schedule": sched.__dict__ | {"updates": sched.updates},
        "config": {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in overrides.items()},
        "rollout_rows": protocol.ROLLOUT_ROWS, "rollouts": rollouts, "completions": protocol.completions_sampled(sched),
        "eval_size": eval_size, "evals": evals.points, "train_s": evals.points[-1]["train_s"],
        "eval_s": round(evals.eval_s, 1), "total_s": round(time.perf_counter() - start, 1), "threads": threads,
        "cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),  # whole process, user + system
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "sampler_mismatch": sampler.stats if sampler else None,
        "records": [dict(step=step, **row) for step, row in sorted(trainer.probe_records.items())],
    }
    write_json_atomic(out_path, result)
    return result


def initial_scores(threads: int, eval_size: int = EVAL_SIZE) -> dict:
    """Held-out greedy scores of the shipped policy (rollout 0), on the runs' test set."""
    torch_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gmpo.tasks import greedy_scores, make_dataset, policy_path

    path = policy_path(TASK)
    test = make_dataset(TASK, eval_size, EVAL_DATA_SEED, split="test")
    return greedy_scores(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), test)
