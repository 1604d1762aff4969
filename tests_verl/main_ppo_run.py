"""Launch verl's own trainer, `python -m verl.trainer.main_ppo`, on CPU: GRPO on the built-in addition policy.

The launch is what a verl user runs (Hydra overrides on verl's `ppo_trainer` config, vLLM rollout, FSDP2 actor,
verl's reward loop with a custom reward function), plus what CPU needs: `cpu_main_ppo.py`, loaded through verl's
`VERL_USE_EXTERNAL_MODULES`, and the overrides in `CPU_OVERRIDES` (no CUDA allocator, so no sleep mode; float32 in
vLLM and in FSDP, whose default compute dtype is bf16; eager attention without remove-padding; one logical GPU for
Ray's placement; one worker of each kind).

    python tests_verl/main_ppo_run.py OUT_DIR [override ...]

writes OUT_DIR/{train,val}.parquet, runs main_ppo there and leaves verl's metrics in OUT_DIR/metrics.jsonl (verl's
file logger: one JSON line per step, {"step": k, "data": {name: value}}).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "gmpo" / "assets" / "addition"
# The policy was pretrained on "<bos>a+b=": the chat template is the prompt itself after BOS.
CHAT_TEMPLATE = "{{ bos_token }}{{ messages[0].content }}"

CPU_OVERRIDES = [
    "trainer.device=cpu",
    "trainer.nnodes=1",
    "trainer.n_gpus_per_node=1",
    "+ray_kwargs.ray_init.num_gpus=1",
    # TransferQueue's storage actors take every logical CPU otherwise, and the run waits forever.
    "ray_kwargs.ray_init.num_cpus=32",
    "+ray_kwargs.ray_init.include_dashboard=False",
    "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "reward.num_workers=1",
    "data.dataloader_num_workers=0",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "actor_rollout_ref.actor.fsdp_config.strategy=fsdp2",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
    "actor_rollout_ref.model.use_remove_padding=False",
    "+actor_rollout_ref.model.override_config.attn_implementation=eager",
    "actor_rollout_ref.model.enable_gradient_checkpointing=False",
    "actor_rollout_ref.actor.use_torch_compile=False",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
    "actor_rollout_ref.rollout.dtype=float32",
    "actor_rollout_ref.rollout.enforce_eager=True",
    "actor_rollout_ref.rollout.free_cache_engine=False",
    "+actor_rollout_ref.rollout.enable_sleep_mode=False",
]


def write_addition_parquet(path: Path, size: int, seed: int, split: str) -> None:
    """verl's RLHF dataset layout: a one-message chat prompt "a+b=", the sum as the rule reward's ground truth."""
    import pandas as pd

    from gmpo.tasks.data import addition_dataset

    rows = addition_dataset(size, seed, split)
    pd.DataFrame(
        {
            "data_source": "addition",
            "prompt": [[{"role": "user", "content": prompt}] for prompt in rows["prompt"]],
            "ability": "arithmetic",
            "reward_model": [{"style": "rule", "ground_truth": answer} for answer in rows["answer"]],
            "extra_info": [{"index": i} for i in range(size)],
        }
    ).to_parquet(path)


def grpo_overrides(data_dir: Path, loss_mode: str = "gmpo", steps: int = 3, prompts: int = 16, group: int = 8,
                   micro_batch: int | None = None, lr: float = 1e-4) -> list[str]:
    """GRPO with the given policy loss on the addition task: `prompts` x `group` rollouts per step, one update
    (mini-batch = the whole batch) split into micro-batches of `micro_batch` rows (default: one micro-batch)."""
    rows = prompts * group
    loss = [f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}"]
    if loss_mode == "gmpo":
        loss += ["actor_rollout_ref.actor.policy_loss._target_=gmpo.verl.GMPOPolicyLossConfig",
                 "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean"]
    return [
        "algorithm.adv_estimator=grpo",
        f"data.train_files={data_dir / 'train.parquet'}",
        f"data.val_files={data_dir / 'val.parquet'}",
        f"data.train_batch_size={prompts}",
        "data.max_prompt_length=8",
        "data.max_response_length=4",
        f"actor_rollout_ref.model.path={MODEL}",
        f"actor_rollout_ref.model.custom_chat_template='{CHAT_TEMPLATE}'",
        f"actor_rollout_ref.rollout.n={group}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={rows}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro_batch or rows}",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        "actor_rollout_ref.actor.clip_ratio_low=0.4",
        "actor_rollout_ref.actor.clip_ratio_high=0.4",
        "actor_rollout_ref.actor.use_kl_loss=False",
        *loss,
        f"reward.custom_reward_function.path={REPO / 'tests_verl' / 'addition_reward.py'}",
        "reward.custom_reward_function.name=compute_score",
        f"trainer.total_training_steps={steps}",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.logger=[console,file]",
        "trainer.project_name=gmpo-cpu",
        "trainer.experiment_name=addition",
    ]


def cpu_env(out_dir: Path) -> dict:
    """The environment of the launch: CPU support in every verl process, metrics and weight syncs to out_dir."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "VERL_USE_EXTERNAL_MODULES": "tests_verl.cpu_main_ppo",
        "VERL_PLATFORM": "cpu",
        "VERL_ENGINE_DEVICE": "cuda",
        "VERL_FILE_LOGGER_PATH": str(out_dir / "metrics.jsonl"),
        "GMPO_TEST_WEIGHT_SYNC_LOG": str(out_dir / "weight_syncs.jsonl"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "TQ_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
    }


def run_main_ppo(out_dir: Path, overrides: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m verl.trainer.main_ppo` with the CPU overrides, then `overrides` (a later key wins), in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, size, seed, split in (("train.parquet", 2048, 1, "train"), ("val.parquet", 256, 0, "test")):
        if not (out_dir / name).exists():
            write_addition_parquet(out_dir / name, size, seed, split)
    command = [sys.executable, "-m", "verl.trainer.main_ppo", *CPU_OVERRIDES, *overrides]
    with open(out_dir / "main_ppo.log", "w") as log:
        return subprocess.run(command, cwd=out_dir, env=cpu_env(out_dir), stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout, text=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


if __name__ == "__main__":
    out = Path(sys.argv[1]).resolve()
    result = run_main_ppo(out, grpo_overrides(out) + sys.argv[2:])
    print(f"main_ppo exited {result.returncode}; log {out / 'main_ppo.log'}, metrics {out / 'metrics.jsonl'}")
    sys.exit(result.returncode)
