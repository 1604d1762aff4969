"""`gmpo train`'s exit statuses end to end (the CLI in a subprocess), and the README's restart loop run as written
against a reward that fails once with a transient error (it resumes and finishes) and one that always returns
malformed output (it stops at once)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gmpo.cli import main
from gmpo.cli.exit_status import ExitStatus, is_transient, stopped_by_signal

REPO = Path(__file__).resolve().parents[1]
# Rollouts of 64 completions feeding 4 optimizer steps each, so a start takes seconds; no accuracy measurement
# between the first and the last; a checkpoint at step 3, inside the first rollout.
TINY = ["--max_steps", "8", "--save_steps", "3", "--per_device_train_batch_size", "64", "--steps_per_generation", "4",
        "--train_size", "512", "--eval_size", "64", "--accuracy_steps", "0"]
REWARDS = '''
import pathlib

MARKER = pathlib.Path(__file__).with_name("failed_once")
CALLS = []


def flaky(completions, answer, **kwargs):
    """Exact match; the second call of the first run (the rollout after checkpoint-3) cannot reach its server."""
    CALLS.append(1)
    if len(CALLS) == 2 and not MARKER.exists():
        MARKER.write_text("")
        raise ConnectionError("reward server unreachable")
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def malformed(completions, **kwargs):
    return ["good"] * len(completions)
'''


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def gmpo_train(cwd: Path, *args: str, prefix: tuple[str, ...] = ("-m", "gmpo")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *prefix, "train", *args], capture_output=True, text=True, env=env(),
                          cwd=cwd, timeout=300)


def last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def readme_loop() -> str:
    """The job-script loop exactly as the README prints it; docs/cli.md must print the same one."""
    blocks = re.findall(r"```bash\n(# job script.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README should hold one job-script loop"
    assert blocks[0] in (REPO / "docs" / "cli.md").read_text(), "docs/cli.md prints another loop than the README"
    return blocks[0]


def run_loop(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The README's loop with this interpreter's `gmpo train ARGS` in place of its command and a short sleep."""
    command = " ".join([sys.executable, "-m", "gmpo", "train", *args])
    script = readme_loop().replace("gmpo train --config recipe.yaml", command).replace("sleep 10", "sleep 0.2")
    assert command in script and "sleep 0.2" in script
    (tmp_path / "job.sh").write_text(script)
    return subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, env=env(),
                          cwd=tmp_path, timeout=600)


def test_the_documented_table_is_the_code():
    for path in (REPO / "README.md", REPO / "docs" / "cli.md"):
        table = path.read_text().split("| status | meaning | restart? |\n|---|---|---|\n")[1].split("\n\n")[0]
        rows = [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()]
        assert rows == ["0", "1", "2", "3", "128 + N"], f"{path.name}: {rows}"
    assert [int(status) for status in ExitStatus] == [0, 1, 2, 3]
    assert (stopped_by_signal(2), stopped_by_signal(15)) == (130, 143)


def test_loop_resumes_after_a_transient_reward_failure_and_finishes(tmp_path):
    (tmp_path / "flaky_rewards.py").write_text(REWARDS)
    out = tmp_path / "run"
    result = run_loop(tmp_path, "--output_dir", str(out), "--reward_funcs", "flaky_rewards.flaky", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("GMPO on built-in task") == 2, "expected one failed start and one resumed start"
    assert "raised ConnectionError: reward server unreachable; a restart may succeed" in result.stderr
    summary = json.loads((out / "run_complete.json").read_text())
    assert summary["global_step"] == 8 and Path(summary["resumed_from"]).name == "checkpoint-3"


def test_loop_stops_at_once_on_malformed_reward_output(tmp_path):
    (tmp_path / "flaky_rewards.py").write_text(REWARDS)
    out = tmp_path / "run"
    result = run_loop(tmp_path, "--output_dir", str(out), "--reward_funcs", "flaky_rewards.malformed", *TINY)
    assert result.returncode == ExitStatus.REPRODUCIBLE_FAILURE == 3, result.stderr[-3000:]
    assert result.stdout.count("GMPO on built-in task") == 1, "the loop restarted a failure that a restart reproduces"
    assert "Traceback" not in result.stderr
    assert last_line(result.stderr).startswith(
        "gmpo train: error: reward function 'malformed' returned a non-numeric reward at index 0")
    assert not out.exists(), "a run that saved nothing left its output directory"


def test_nonfinite_gradient_with_policy_stop_is_status_3(tmp_path):
    # A learning rate of 1e30 puts the weights near 1e30 after one AdamW step; the next forward overflows to inf.
    out = tmp_path / "run"
    result = gmpo_train(REPO, "--output_dir", str(out), *TINY, "--learning_rate", "1e30",
                        "--nonfinite_grad_policy", "stop")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert last_line(result.stderr).startswith("gmpo train: error: Non-finite gradient at optimizer step 2: stopping")
    assert not (out / "run_complete.json").exists()


CRASH = """import sys, transformers
def fail(*args, **kwargs):
    raise RuntimeError("simulated device failure")
transformers.Trainer.training_step = fail  # a failure inside the upstream training step, as a lost device gives
from gmpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_error_is_status_1_with_its_traceback(tmp_path):
    out = tmp_path / "run"
    result = gmpo_train(REPO, "--output_dir", str(out), *TINY, prefix=("-c", CRASH))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" in result.stderr and "\nRuntimeError: simulated device failure\n" in result.stderr
    assert not (out / "run_complete.json").exists()


def test_bad_input_is_status_2_and_gmpo_traceback_shows_where(tmp_path, monkeypatch):
    # Without GMPO_TRACEBACK the same error is one line: test_cli.test_console_entry_point_exit_status_and_one_line.
    monkeypatch.setenv("GMPO_TRACEBACK", "1")
    result = gmpo_train(REPO, "--reward_funcs", "nope", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" in result.stderr and "resolve_reward" in result.stderr, result.stderr
    assert last_line(result.stderr).startswith("gmpo train: error: unknown reward function 'nope'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", ""])
def test_gmpo_traceback_off_prints_one_line(capsys, monkeypatch, value):
    monkeypatch.setenv("GMPO_TRACEBACK", value)
    assert main(["train", "--reward_funcs", "nope"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_transient_errors_are_found_along_the_chain():
    def raised_while_handling(outer, inner):
        try:
            try:
                raise inner
            except Exception:
                raise outer  # noqa: B904 (the implicit __context__ is the chain under test)
        except Exception as err:
            return err

    # huggingface_hub's shape: OSError <- LocalEntryNotFoundError (a FileNotFoundError) <- httpx <- the socket's error
    assert is_transient(raised_while_handling(OSError("We couldn't connect"), ConnectionRefusedError(111, "refused")))
    assert is_transient(raised_while_handling(RuntimeError("reward failed"), TimeoutError("read timed out")))
    assert not is_transient(raised_while_handling(OSError("no file named config.json"), FileNotFoundError("x")))
    assert not is_transient(None)


def unreachable_hub(*args, **kwargs):
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from None


def test_an_unreachable_hub_is_status_1_not_bad_input(capsys, monkeypatch, tmp_path):
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable_hub)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    status = main(["train", "--dataset_name", str(data), "--model_name_or_path", "some-org/some-model",
                   "--reward_funcs", "exact_match", "--use_cpu", "--output_dir", str(tmp_path / "out")])
    assert status == 1 and last_line(capsys.readouterr().err) == (
        "gmpo train: error: cannot load model 'some-org/some-model': We couldn't connect to 'https://huggingface.co' "
        "to load the files (a restart may succeed)")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_unreachable_hub_end_to_end(tmp_path):
    """A closed local port as the Hub: huggingface_hub retries for about 30 s, then the run exits 1."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    variables = {key: value for key, value in env().items() if key != "HF_HUB_OFFLINE"}
    variables.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "gmpo", "train", "--dataset_name", str(data), "--model_name_or_path",
                             "some-org/some-model", "--reward_funcs", "exact_match", "--use_cpu"], capture_output=True,
                            text=True, env=variables, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert last_line(result.stderr).endswith("(a restart may succeed)")
