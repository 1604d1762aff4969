"""Settings that a launch would silently not apply stop at construction (GMPOConfig) and in `gmpo train` (exit 2):
FSDP where accelerate cannot shard (CPU), and processes of a multi-process launch that accelerate runs alone; vLLM's
server mode without CUDA stops at the trainer's construction, before TRL waits for a server."""

import pytest
import torch

from gmpo import GMPOTrainer

from .conftest import count_ones_reward, tiny_config
from .test_cli import train_error


@pytest.mark.parametrize("setting", ["argument", "accelerate-config"])
def test_fsdp_on_cpu_is_an_error_not_plain_ddp(tmp_path, monkeypatch, setting):
    # accelerate 1.15 builds its FSDP state only for GPU-type devices: on CPU the run would be unsharded.
    kwargs = {"fsdp": "full_shard"} if setting == "argument" else {}
    if setting == "accelerate-config":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(ValueError, match="cannot shard here") as err:
        tiny_config(tmp_path, **kwargs)
    assert ("fsdp=" if setting == "argument" else "ACCELERATE_USE_FSDP") in str(err.value)


def test_fsdp_flag_of_gmpo_train_is_a_usage_error(capsys):
    message = train_error(capsys, "--fsdp", "full_shard", "--use_cpu", "true", "--dry-run")
    assert "fsdp=" in message and "cannot shard here" in message


def test_a_process_of_a_launch_that_runs_alone_is_an_error(tmp_path, monkeypatch):
    # What torchrun / accelerate launch tell process 0 of 2; with use_cpu=False on a machine without a GPU accelerate
    # 1.15 picks no backend and runs the process alone (each rank would train its own model).
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"one of WORLD_SIZE=2, but accelerate runs it alone.*use_cpu=True"):
        tiny_config(tmp_path, use_cpu=False, deepspeed=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="server mode is TRL's own path where CUDA is")
def test_vllm_server_mode_without_cuda_stops_before_connecting(tiny_model_dir, prompt_dataset, tmp_path):
    # TRL would wait vllm_server_timeout (240 s) for a server, then fail: its weight sync needs NCCL on CUDA.
    args = tiny_config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_timeout=1)
    with pytest.raises(ValueError, match=r"vllm_mode='server' needs a CUDA device.*NCCL.*vllm_mode='colocate'"):
        GMPOTrainer(model=tiny_model_dir, reward_funcs=count_ones_reward, args=args, train_dataset=prompt_dataset)
    assert not (tmp_path / "checkpoint-1").exists() and not any(tmp_path.iterdir())
