"""Settings that a launch would silently not apply stop at construction (GMPOConfig) and in `gmpo train` (exit 2):
FSDP where accelerate cannot shard (CPU), and processes of a multi-process launch that accelerate runs alone."""

import pytest

from .conftest import tiny_config
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
