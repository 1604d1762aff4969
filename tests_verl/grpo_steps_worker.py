"""GRPO steps with loss_mode=gmpo through verl's FSDP2 engine on CPU (one process per rank, gloo), on fixed rollouts.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests_verl/grpo_steps_worker.py MODEL_DIR OUT_JSON

The 16 completions (4 prompts x 4) are fixed random tokens (verl's own trainer with vLLM rollouts is
`test_main_ppo.py`); each step does what verl's trainer does with them: verl's GRPO advantage estimator on a reward
(the fraction of a row's response tokens below VOCAB / 4), the old log-probs from the engine's `infer_batch`, then
`ppo_epochs = 2` calls of the engine's `train_batch` (AdamW step, gradient clipping) with verl's `ppo_loss` and
loss_mode=gmpo, so that the second epoch is off-policy. Rank 0 writes the GRPO surrogate J = sum_i A_i (1/|o_i|) sum_t
log pi(o_it) before and after every step, and the metrics and grad norms `train_batch` returned.
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_worker as ew  # noqa: E402
from cpu_platform import use_cpu_platform  # noqa: E402

STEPS, EPOCHS, GROUP, LR = 3, 2, 4, 0.02


def fixed_rollouts() -> dict:
    """16 rows in the layout of `engine_worker.make_batch`, grouped 4 per prompt (each group shares its prompt)."""
    batch = ew.make_batch(seed=1, dual=False)
    for key in ("prompts", "prompt_mask"):
        batch[key] = batch[key][::GROUP].repeat_interleave(GROUP, 0)
    return batch


def grpo_advantages(batch: dict) -> torch.Tensor:
    """(B,) advantages from verl's GRPO estimator (outcome reward on the last response token)."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    mask = batch["response_mask"].float()
    reward = ((batch["responses"] < ew.VOCAB // 4).float() * mask).sum(-1) / mask.sum(-1)
    token_rewards = torch.zeros_like(mask)
    token_rewards[torch.arange(ew.ROWS), mask.sum(-1).long() - 1] = reward
    index = np.repeat(np.arange(ew.ROWS // GROUP), GROUP)
    advantages, _ = compute_grpo_outcome_advantage(token_rewards, mask, index)
    return advantages[:, 0]


def assign_defaults(data, **extra) -> None:
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(data, temperature=1.0, use_remove_padding=False, use_fused_kernels=False,
                         calculate_entropy=False, use_dynamic_bsz=True,
                         max_token_len_per_gpu=ew.MAX_TOKENS_PER_MICRO_BATCH, micro_batch_size_per_gpu=2, **extra)


def log_probs(engine, data) -> torch.Tensor:
    """(B_rank, T) log pi of this rank's response tokens, through the engine's forward-only pass."""
    from verl.workers.utils.padding import no_padding_2_padding

    data = data.clone()
    assign_defaults(data)
    with engine.eval_mode():
        output = engine.infer_batch(data)
    return no_padding_2_padding(output["model_output"]["log_probs"], data).float()


def surrogate(engine, data, advantages: torch.Tensor) -> float:
    """J over all ranks: sum_i A_i * mean_t log pi(o_it)."""
    mask = data["response_mask"].float()
    value = (advantages * (log_probs(engine, data) * mask).sum(-1) / mask.sum(-1)).sum()
    dist.all_reduce(value)
    return value.item()


def metric_value(value) -> float:
    """One number per metric, as verl's worker reduces it (a `Metric` aggregates its micro-batch values)."""
    if hasattr(value, "aggregate"):
        return float(value.aggregate())
    return float(np.mean([float(v) for v in value]) if isinstance(value, list) else value)


def main(model_dir: str, out_path: str) -> None:
    use_cpu_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    import verl  # noqa: F401  (loads the verl.plugins entry points: loss_mode=gmpo)
    from verl.workers.utils.losses import ppo_loss

    ew.save_tiny_model(model_dir)
    engine = ew.build_engine(model_dir, lr=LR)
    config = ew.actor_config("gmpo")
    batch = fixed_rollouts()
    advantages = grpo_advantages(batch)
    batch["advantages"] = advantages
    rows = slice(rank * ew.ROWS // world, (rank + 1) * ew.ROWS // world)
    data = ew.rank_data(batch, torch.zeros(ew.ROWS, ew.RESPONSE), rank, world)
    record = {"surrogate": [surrogate(engine, data, advantages[rows])], "metrics": [], "grad_norm": []}
    for _ in range(STEPS):
        data["old_log_probs"] = log_probs(engine, data)
        for _ in range(EPOCHS):
            step_data = data.clone()
            assign_defaults(step_data, global_batch_size=ew.ROWS)
            with engine.train_mode():
                output = engine.train_batch(step_data, loss_function=lambda **kw: ppo_loss(config=config, **kw))
            metrics = {k: metric_value(v) for k, v in output["metrics"].items() if k != "grad_norm"}
            record["metrics"].append(metrics)
            record["grad_norm"].append(float(output["metrics"]["grad_norm"]))
        record["surrogate"].append(surrogate(engine, data, advantages[rows]))
    if rank == 0:
        record["advantages"] = advantages.tolist()
        with open(out_path, "w") as f:
            json.dump(record, f, indent=1)
        print("surrogate J per step:", " ".join(f"{j:.4f}" for j in record["surrogate"]))
        print("grad norms:", " ".join(f"{g:.3g}" for g in record["grad_norm"]),
              "| clip fractions (last epoch):", record["metrics"][-1].get("actor/pg_clipfrac"),
              record["metrics"][-1].get("actor/pg_clipfrac_lower"), "| finite:",
              all(math.isfinite(v) for m in record["metrics"] for v in m.values()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
