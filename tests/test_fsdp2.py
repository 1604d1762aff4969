"""FSDP2 parameters (DTensor shards) on 2 CPU processes (gloo), without accelerate's FSDP path.

accelerate 1.15 builds its FSDP state only for GPU-type devices, so on CPU a Trainer never shards with FSDP (and
`gmpo train` refuses FSDP settings there, tests/test_launch_checks.py). What gmpo itself does with the parameters is
tested here on a tiny model sharded with torch's `fully_shard` over a CPU mesh: GMPOTrainer's loss, its gradients
and its logged statistics through the sharded model equal those of the whole model, and the non-finite-gradient guard
reads sharded gradients (a NaN in one rank's shard skips the step on both ranks). FSDP checkpoints (weights and
optimizer, written by accelerate) and the resume of a sharded run are not reached on CPU.
"""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from datasets import Dataset

from gmpo import GMPOTrainer

from .conftest import count_ones_reward, tiny_config
from .test_distributed import free_port
from .test_trainer_loss import make_inputs

WORLD_SIZE = 2
# Float32 forward and backward of the same model, sharded or whole: the sharded gradient is reduce-scattered (an
# average of 2 ranks' float32 gradients summed in another order), ~1 ulp (6e-8) relative per element; entries
# near 0 compare absolutely. rtol 1e-5 / atol 1e-6 leave more than a factor 10 over that.
TOL = dict(rtol=1e-5, atol=1e-6)


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _rank_worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM
    from trl.trainer.grpo_trainer import add_fused_lm_head

    torch.set_num_threads(1)  # the model is tiny
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        trainer = GMPOTrainer(model=model_dir, reward_funcs=count_ones_reward, train_dataset=Dataset.from_dict({"prompt": ["1+1="]}),
                              args=tiny_config(os.path.join(out_dir, f"rank{rank}"), max_grad_norm=0.0))
        trainer.current_gradient_accumulation_steps = 1
        whole = trainer.model.train()
        sharded = AutoModelForCausalLM.from_pretrained(model_dir)
        # The fused log-prob head GRPOTrainer puts on its own model, put on this one before it is sharded.
        add_fused_lm_head(sharded, temperature=trainer.temperature, outputs=("log_probs", "entropy"),
                          cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32)
        sharded = _shard(sharded, init_device_mesh("cpu", (WORLD_SIZE,)))
        sharded.train()
        inputs = make_inputs(whole, seed=rank)  # each rank its own micro-batch, as in data-parallel training

        losses = {}
        for name, model in (("whole", whole), ("sharded", sharded)):
            loss = trainer._compute_loss(model, inputs)
            loss.backward()
            losses[name] = loss.item()
        metrics = {name: values for name, values in trainer._metrics["train"].items()}
        grads = {}
        for (name, p), q in zip(whole.named_parameters(), sharded.parameters()):
            local = p.grad.clone()
            dist.all_reduce(local)  # the data-parallel gradient: the mean over the ranks' micro-batches
            grads[name] = (local / WORLD_SIZE, q.grad.full_tensor())
        result = {"losses": losses, "metrics": metrics, "is_dtensor": type(next(sharded.parameters())).__name__,
                  "local_numel": sum(q.to_local().numel() for q in sharded.parameters()),
                  "numel": sum(p.numel() for p in whole.parameters()),
                  "grads_close": {name: torch.allclose(a, b, **TOL) for name, (a, b) in grads.items()}}

        guard, state = trainer._nonfinite_guard, SimpleNamespace(global_step=6)
        guard.on_pre_optimizer_step(trainer.args, state, None, model=sharded)
        result["finite_kept"] = all(q.grad is not None for q in sharded.parameters()) and guard.skipped == 0
        if rank == 1:
            next(sharded.parameters()).grad.to_local()[0, 0] = math.nan  # only rank 1's shard holds the NaN
        guard.on_pre_optimizer_step(trainer.args, state, None, model=sharded)
        result["nan_skipped"] = all(q.grad is None for q in sharded.parameters()) and guard.skipped == 1
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tiny_model_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp2")
    # Spawned, not forked: a child forked from a pytest process whose earlier tests ran OpenMP threads hangs in its
    # first multi-threaded MKL call (the model's rotary cos), whatever its own thread count.
    mp.start_processes(_rank_worker, args=(free_port(), tiny_model_dir, str(out_dir)), nprocs=WORLD_SIZE,
                       join=True, start_method="spawn")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def test_parameters_are_dtensor_shards(ranks):
    for rank in ranks:
        assert rank["is_dtensor"] == "DTensor"
        assert rank["local_numel"] < rank["numel"], "each rank should hold only its shard"
    assert sum(rank["local_numel"] for rank in ranks) >= ranks[0]["numel"]


def test_loss_gradients_and_statistics_equal_the_whole_model(ranks):
    for index, rank in enumerate(ranks):
        assert rank["losses"]["sharded"] == pytest.approx(rank["losses"]["whole"], rel=TOL["rtol"], abs=TOL["atol"])
        assert all(rank["grads_close"].values()), f"rank {index}: {rank['grads_close']}"
        assert "gmpo/seq_weight_mean" in rank["metrics"]
        for name, (whole, sharded) in rank["metrics"].items():  # recorded by the whole, then the sharded call
            assert sharded == pytest.approx(whole, rel=TOL["rtol"], abs=TOL["atol"], nan_ok=True), name
    assert ranks[0]["losses"]["whole"] != ranks[1]["losses"]["whole"], "the ranks should hold different batches"


def test_a_nan_in_one_shard_skips_the_step_on_every_rank(ranks):
    for index, rank in enumerate(ranks):
        assert rank["finite_kept"], f"rank {index} dropped finite gradients"
        assert rank["nan_skipped"], f"rank {index} did not skip the step with a NaN in rank 1's shard"
