"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo), launched as a user launches them: `accelerate launch` with
the recipe's accelerate config adapted to CPU (tests/configs/), through the Python API (tests/scripts/chaos_run.py) and
through `gmpo train`.

Per stage, one uninterrupted Python-API run is the reference; a Python-API job and a `gmpo train` job are each
SIGKILLed after a checkpoint inside a rollout, find a torn newer checkpoint, resume and must end bit for bit equal to
it; both then restart once more from the end-of-training checkpoint. One DDP run (torchrun, same settings) checks
that the sharded runs compute the same losses and GMPO statistics. Plain SGD, so that weights compare across
engines. 15 launches of 2 processes, 6-15 s each on 2 lightly loaded cores (mostly imports): about 2 min in all.
The kill-and-resume jobs of ZeRO-2 (5 of those launches) are marked slow: CI runs them for ZeRO-3 only.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .test_chaos import COMPLETE_MARKER, assert_same_run
from .test_distributed import free_port
from .test_training import GMPO_METRICS

pytest.importorskip("deepspeed", reason="DeepSpeed tests need the extra: pip install -e '.[deepspeed]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAOS = os.path.join(ROOT, "tests", "scripts", "chaos_run.py")
ACCELERATE_CONFIGS = {2: "tests/configs/zero2-cpu.yaml", 3: "tests/configs/zero3-cpu.yaml"}
MAX_STEPS, SAVE_STEPS, STEPS_PER_GENERATION = 6, 3, 4  # checkpoint-3 is inside the first rollout (steps 1-4)
CONFIG = {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "steps_per_generation": STEPS_PER_GENERATION,
          "optim": "sgd", "num_prompts": 16}
# DeepSpeed on CPU: use_cpu=False (as on GPUs) with gloo; the torchrun test takes the other way, use_cpu=True.
ON_CPU = {"use_cpu": False, "ddp_backend": "gloo"}
# `gmpo train` with the settings of tests/conftest.py's tiny_config and CONFIG: the same computation as chaos_run.py.
CLI_ARGS = ["--bf16", "false", "--gradient_checkpointing", "false",
            "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "6",
            "--steps_per_generation", str(STEPS_PER_GENERATION), "--max_steps", str(MAX_STEPS),
            "--save_steps", str(SAVE_STEPS), "--save_strategy", "steps", "--learning_rate", "0.05",
            "--logging_steps", "1", "--report_to", "none", "--seed", "0", "--optim", "sgd", "--num_threads", "1",
            "--reward_funcs", "tests.scripts.kill_reward.count_ones_reward"]
# The DeepSpeed and DDP runs differ only in how float32 gradients are summed across the 2 ranks (ZeRO's
# reduce-scatter vs DDP's all-reduce): ~1 ulp (6e-8 relative) per gradient, a few ulps in the weights after a few SGD
# steps. A log-prob of magnitude <= 8 then moves by a few ulp(8) = 9.5e-7, and losses, ratios and weights (all of
# magnitude <= ~4) by a few e-7: abs 2e-6 and rel 1e-5 leave a factor ~8 over the largest difference seen here
# (2.4e-7, a log-ratio extreme at step 3 under ZeRO-3).
TOL = dict(rel=1e-5, abs=2e-6)


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", **extra}


def accelerate_launch(stage: int, *command, **env_extra) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file tests/configs/zero{stage}-cpu.yaml COMMAND` from the repository root."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIGS[stage],
           "--main_process_port", str(free_port()), *command]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env(**env_extra))


def api_run(stage: int, model_dir, output_dir, kill=None, **config) -> subprocess.CompletedProcess:
    settings = json.dumps({**CONFIG, **ON_CPU, **config})
    return accelerate_launch(stage, CHAOS, model_dir, str(output_dir), settings, *[str(x) for x in kill or ()])


def gmpo_train(stage: int, model_dir, dataset, output_dir, **env_extra) -> subprocess.CompletedProcess:
    return accelerate_launch(stage, "-m", "gmpo", "train", "--model_name_or_path", model_dir, "--dataset_name",
                             str(dataset), "--output_dir", str(output_dir), *CLI_ARGS, "--use_cpu", "false",
                             "--ddp_backend", "gloo", "--resume_from_checkpoint", "true", **env_extra)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def report(output_dir) -> dict:
    return json.loads((output_dir / "report.json").read_text())


def tear(checkpoint, into) -> None:
    """A copy of `checkpoint` as a job killed while writing it leaves it: weights and ZeRO state, no
    trainer_state.json, no completion marker."""
    shutil.copytree(checkpoint, into / checkpoint.name)
    (into / checkpoint.name / "trainer_state.json").unlink()
    (into / checkpoint.name / COMPLETE_MARKER).unlink()


def zero_state(checkpoint) -> tuple[list[dict], int]:
    """From DeepSpeed's own files in the checkpoint: per rank, the ZeRO stage, how many ranks share each parameter
    group and the fp32 master elements the rank holds; and the elements of the saved module state (ZeRO-3 writes
    each rank's module with its partitioned, empty parameters; ZeRO-2 one whole copy)."""
    step_dir = checkpoint / f"global_step{checkpoint.name.split('-')[1]}"
    # DeepSpeed's pickles (a loss-scaler object among the tensors), written by this test's own run.
    load = lambda name: torch.load(step_dir / name, weights_only=False)  # noqa: E731
    ranks = []
    for rank in range(2):
        state = load(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        groups = state.get("fp32_flat_groups") or state["single_partition_of_fp32_groups"]
        counts = state["partition_count"]
        ranks.append({"stage": int(state["zero_stage"]), "partition_counts": set(counts if isinstance(counts, list)
                                                                               else [counts]),
                      "master_numel": sum(t.numel() for t in groups)})
    module_files = sorted(step_dir.glob("*model_states.pt"))
    module_numel = sum(t.numel() for path in module_files for t in load(path.name)["module"].values())
    return ranks, module_numel


def assert_sharded(stage: int, checkpoint, model_numel: int) -> None:
    ranks, module_numel = zero_state(checkpoint)
    for rank, part in enumerate(ranks):
        assert (part["stage"], part["partition_counts"]) == (stage, {2}), f"rank {rank} is not ZeRO-{stage} on 2: {part}"
        # Each rank holds its half of the fp32 master weights and optimizer state (plus alignment padding).
        assert model_numel / 2 <= part["master_numel"] < model_numel / 2 + 64, f"rank {rank} holds {part}"
    if stage == 3:
        assert module_numel == 0, "ZeRO-3 saved whole parameters: they were not partitioned"
    else:
        assert module_numel == model_numel, "ZeRO-2 keeps (and saves once) every parameter whole"


def load_weights(path):
    return load_file(path / "model.safetensors")


def step_rows(log_history) -> dict[int, dict]:
    return {row["step"]: row for row in log_history if "loss" in row}


@pytest.fixture(scope="module")
def model_numel(tiny_model_dir):
    return sum(t.numel() for t in load_file(os.path.join(tiny_model_dir, "model.safetensors")).values())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """chaos_run.py's prompts, as a file for `gmpo train`."""
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{10 + i}+{20 + i}="}) + "\n" for i in range(16)))
    return path


@pytest.fixture(scope="module")
def ddp(tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", CHAOS,
           tiny_model_dir, str(output_dir), json.dumps(CONFIG)]
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env()))
    assert report(output_dir)["distributed_type"] == "DistributedType.MULTI_CPU"
    return output_dir


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def stage(request):
    return request.param


@pytest.fixture(scope="module")
def uninterrupted(stage, tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp(f"zero{stage}-uninterrupted")
    ok(api_run(stage, tiny_model_dir, output_dir))
    return output_dir


@pytest.fixture(scope="module")
def api_job(stage, tiny_model_dir, tmp_path_factory, uninterrupted):
    """Killed (SIGKILL, rank 1) in the first loss after checkpoint-3, then a torn checkpoint-6 appears (as if a later
    start died writing it); the next start resumes and finishes, then restarts once more in the same process."""
    output_dir = tmp_path_factory.mktemp(f"zero{stage}-api-job")
    killed = api_run(stage, tiny_model_dir, output_dir, kill=("loss", SAVE_STEPS, 1))
    assert killed.returncode != 0 and not (output_dir / "report.json").exists(), "the kill did not stop the run"
    assert (output_dir / f"checkpoint-{SAVE_STEPS}" / COMPLETE_MARKER).is_file()
    tear(uninterrupted / f"checkpoint-{MAX_STEPS}", output_dir)
    ok(api_run(stage, tiny_model_dir, output_dir, restart=True))
    return output_dir


@pytest.fixture(scope="module")
def cli_job(stage, tiny_model_dir, dataset, tmp_path_factory, uninterrupted):
    """`gmpo train` killed (SIGKILL, rank 0) while scoring its second rollout, after checkpoint-3; a torn
    checkpoint-6 appears; restarted until it finishes; restarted once more with run_complete.json removed (a job
    killed after its last checkpoint, before its summary). Returns the dir, the final files and the last start."""
    output_dir = tmp_path_factory.mktemp(f"zero{stage}-cli-job") / "run"
    killed = gmpo_train(stage, tiny_model_dir, dataset, output_dir, GMPO_TEST_KILL_AT_CALL="2")
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr, f"no kill: {killed.stderr[-3000:]}"
    complete = sorted(p.name for p in output_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file())
    assert complete == [f"checkpoint-{SAVE_STEPS}"], complete
    tear(uninterrupted / f"checkpoint-{MAX_STEPS}", output_dir)
    ok(gmpo_train(stage, tiny_model_dir, dataset, output_dir))
    finished = {name: (output_dir / name).read_bytes() for name in ("model.safetensors", "trainer_state.json")}
    (output_dir / "run_complete.json").unlink()
    restart = ok(gmpo_train(stage, tiny_model_dir, dataset, output_dir))
    return output_dir, finished, restart


# The kill-and-resume jobs (5 launches a stage) run in CI for ZeRO-3, the paper recipe's stage; ZeRO-2's with -m slow.
KILL_STAGES = pytest.mark.parametrize(
    "stage", [pytest.param(2, marks=pytest.mark.slow), 3], indirect=True, ids=["zero2", "zero3"])


def test_runs_sharded_on_two_processes(stage, uninterrupted, model_numel):
    run = report(uninterrupted)
    assert (run["num_processes"], run["distributed_type"]) == (2, "DistributedType.DEEPSPEED")
    assert run["trained_steps"] == list(range(1, MAX_STEPS + 1))
    assert_sharded(stage, uninterrupted / f"checkpoint-{SAVE_STEPS}", model_numel)


def test_first_rollout_matches_ddp(uninterrupted, ddp):
    # Steps 1-4 train on the first rollout, sampled from the same initial weights; later rollouts are sampled from
    # weights a few ulps apart, which may flip a sampled token.
    rows, ddp_rows = step_rows(report(uninterrupted)["log_history"]), step_rows(report(ddp)["log_history"])
    for step in range(1, STEPS_PER_GENERATION + 1):
        row, ddp_row = ({k: v for k, v in r[step].items() if k != "step_time"} for r in (rows, ddp_rows))
        assert row.keys() == ddp_row.keys() and set(GMPO_METRICS) <= row.keys() and "loss" in row
        assert row == pytest.approx(ddp_row, **TOL), f"step {step}"
    assert any(rows[step]["gmpo/log_ratio_max"] > 0 for step in rows), "the run never went off-policy"
    weights, ddp_weights = (load_weights(d / f"checkpoint-{SAVE_STEPS}") for d in (uninterrupted, ddp))
    assert weights.keys() == ddp_weights.keys()
    for name, expected in ddp_weights.items():
        torch.testing.assert_close(weights[name], expected, rtol=TOL["rel"], atol=TOL["abs"], msg=name)


@KILL_STAGES
def test_killed_job_resumes_bit_for_bit(uninterrupted, api_job):
    run, reference = report(api_job), report(uninterrupted)
    assert run["trained_steps"] == list(range(SAVE_STEPS + 1, MAX_STEPS + 1)), "did not resume from checkpoint-3"
    assert_same_run(load_weights(api_job / "final"), run, load_weights(uninterrupted / "final"), reference,
                    max_steps=MAX_STEPS)
    assert (api_job / f"checkpoint-{MAX_STEPS}" / COMPLETE_MARKER).is_file(), "the torn checkpoint was not rewritten"


@KILL_STAGES
def test_restart_of_a_finished_job_changes_nothing(uninterrupted, api_job):
    run = report(api_job)
    assert run["restart_trained_steps"] == [], "a finished run trained again"
    assert_same_run(load_weights(api_job / "final-restart"), {"log_history": run["restart_log_history"]},
                    load_weights(uninterrupted / "final"), report(uninterrupted), max_steps=MAX_STEPS)


@KILL_STAGES
def test_gmpo_train_killed_and_resumed_equals_the_python_api(stage, uninterrupted, cli_job, model_numel):
    output_dir, finished, _ = cli_job
    assert_sharded(stage, output_dir / f"checkpoint-{SAVE_STEPS}", model_numel)
    history = json.loads(finished["trainer_state.json"])["log_history"]
    assert_same_run(load_file(output_dir / "model.safetensors"), {"log_history": history},
                    load_weights(uninterrupted / "final"), report(uninterrupted), max_steps=MAX_STEPS)


@KILL_STAGES
def test_gmpo_train_restart_at_the_end_of_training(cli_job):
    output_dir, finished, restart = cli_job
    assert "is the end of training" in restart.stderr, restart.stderr[-3000:]
    summary = json.loads((output_dir / "run_complete.json").read_text())
    assert summary["global_step"] == MAX_STEPS and summary["resumed_from"].endswith(f"checkpoint-{MAX_STEPS}")
    assert (output_dir / "model.safetensors").read_bytes() == finished["model.safetensors"], "the restart changed it"


@pytest.mark.parametrize("stage", [3], indirect=True, ids=["zero3"])
def test_torchrun_with_a_deepspeed_config_equals_accelerate_launch(stage, tiny_model_dir, dataset, uninterrupted,
                                                                   tmp_path):
    # `--deepspeed CONFIG` under torchrun on CPU: use_cpu true (gloo); the same computation as accelerate launch.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gmpo",
           "train", "--deepspeed", "tests/configs/ds_zero3_cpu.json", "--use_cpu", "true", "--model_name_or_path",
           tiny_model_dir, "--dataset_name", str(dataset), "--output_dir", str(tmp_path), *CLI_ARGS]
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env()))
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert_same_run(load_file(tmp_path / "model.safetensors"), {"log_history": history},
                    load_weights(uninterrupted / "final"), report(uninterrupted), max_steps=MAX_STEPS)
    assert_sharded(3, tmp_path / f"checkpoint-{SAVE_STEPS}", sum(t.numel() for t in load_file(
        os.path.join(tiny_model_dir, "model.safetensors")).values()))


def test_nonfinite_gradient_policy_acts_under_deepspeed(tiny_model_dir, tmp_path):
    # The engine steps inside backward and skips a non-finite step itself; the guard must still count it ("skip")
    # or raise ("stop"), as without DeepSpeed (tests/test_reliability.py). Rank 1 alone has the NaN gradient.
    script = os.path.join(ROOT, "tests", "scripts", "deepspeed_nonfinite.py")
    ok(accelerate_launch(2, script, tiny_model_dir, str(tmp_path)))
    run = report(tmp_path)
    assert run["distributed_type"] == "DistributedType.DEEPSPEED"
    assert run["changed"] == {"1": True, "2": True, "3": False, "4": True}, "the NaN step moved the weights"
    assert run["skipped"] == {"1": 0, "2": 0, "3": 1, "4": 1}, "nonfinite_steps_skipped missed the skipped step"
    assert run["stop_error"] and "optimizer step 3" in run["stop_error"], run["stop_error"]
    assert run["stop_step"] == 2 and run["stop_finite"]
