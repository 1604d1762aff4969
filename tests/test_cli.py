"""`gmpo train` / `gmpo plot`: parsing, rewards, local datasets, bad input, recipes, and an end-to-end run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict

from gmpo.cli import UsageError, main
from gmpo.cli.args import parse_train_args
from gmpo.cli.data import load_prompt_dataset, select_split
from gmpo.cli.rewards import REWARDS, check_reward_columns, resolve_reward, resolve_rewards
from gmpo.tasks import char_accuracy_reward, exact_match_reward

# GRPOConfig's own default triggers this transformers deprecation; `gmpo` filters it in main(), tests parse directly.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
ROWS = {"prompt": ["12+34=", "50+50="], "answer": ["46", "100"]}


def run_cli(*args, timeout=300):
    """The real entry point in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gmpo", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def train_error(capsys, *args) -> str:
    """Run `gmpo train ARGS` in-process; it must fail with exit status 2 and one error line, the last on stderr
    (progress bars of the datasets library may precede it), and no traceback."""
    capsys.readouterr()
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("gmpo train: error: "), lines
    assert sum("error" in line.lower() for line in lines) == 1, lines
    return lines[-1]


@pytest.fixture
def jsonl_dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    Dataset.from_dict(ROWS).to_json(path)
    return str(path)


# --- parsing --------------------------------------------------------------------------------------------------------

def test_builtin_defaults_are_the_addition_preset():
    script, training, model = parse_train_args([])
    assert script.task == "addition" and script.reward_funcs == ["exact_match"]
    assert Path(model.model_name_or_path, "model.safetensors").is_file()
    assert training.use_cpu and not training.bf16 and training.report_to == []
    assert training.steps_per_generation > training.gradient_accumulation_steps and training.clip_can_act


def test_flags_set_config_and_model_fields():
    script, training, model = parse_train_args(["--learning_rate", "0.5", "--epsilon", "0.2", "--max_steps", "7",
                                                "--eval_size", "64", "--dtype", "bfloat16", "--dry-run"])
    assert (training.learning_rate, training.epsilon, training.epsilon_high, training.max_steps) == (0.5, 0.2, 0.2, 7)
    assert script.eval_size == 64 and script.dry_run and model.dtype == "bfloat16"


def test_yaml_config_and_flags_override_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"learning_rate": 3e-4, "temperature": 0.9, "num_generations": 4}))
    _, training, _ = parse_train_args(["--config", str(config)])
    assert (training.learning_rate, training.temperature, training.num_generations) == (3e-4, 0.9, 4)
    _, training, _ = parse_train_args(["--config", str(config), "--temperature", "0.5"])
    assert (training.learning_rate, training.temperature) == (3e-4, 0.5)


def test_preset_applies_only_to_the_builtin_task(jsonl_dataset):
    _, training, _ = parse_train_args(["--dataset_name", jsonl_dataset, "--model_name_or_path", "m", "--use_cpu"])
    assert training.learning_rate == 1e-6 and training.per_device_train_batch_size == 8  # GRPOConfig's defaults


# --- rewards --------------------------------------------------------------------------------------------------------

def test_registry_rewards(tmp_path):
    _, training, _ = parse_train_args([])
    assert resolve_reward("exact_match", training) is exact_match_reward
    assert resolve_reward("char_accuracy", training) is char_accuracy_reward
    from trl.rewards import think_format_reward

    assert resolve_reward("think_format_reward", training) is think_format_reward
    _, training, _ = parse_train_args(["--max_completion_length", "100"])
    overlong = resolve_reward("soft_overlong_punishment", training)  # a factory: penalty over the last 20 tokens
    assert overlong(completion_ids=[[1] * 80, [1] * 90]) == [0.0, -0.5]
    assert {"exact_match", "char_accuracy", "accuracy_reward"} <= set(REWARDS)


def test_dotted_path_reward_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def length(completions, **kwargs):\n    return [len(c) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    _, training, _ = parse_train_args(["--reward_weights", "1.0", "0.5"])
    funcs = resolve_rewards(["my_rewards.length", "exact_match"], training)
    assert funcs[0](completions=["ab", "c"]) == [2, 1] and funcs[1] is exact_match_reward


def test_reward_columns_must_exist():
    with pytest.raises(UsageError, match=r"reward 'exact_match' needs the column\(s\) \['answer'\]"):
        check_reward_columns(["exact_match"], [exact_match_reward], ["prompt", "solution"], "data.jsonl")


# --- local datasets -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet", "save_to_disk", "save_to_disk_dict"])
def test_local_dataset_formats(tmp_path, fmt):
    data = Dataset.from_dict(ROWS)
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps([dict(zip(ROWS, row)) for row in zip(*ROWS.values())]))
    elif fmt == "jsonl":
        data.to_json(path)
    elif fmt == "csv":
        data.to_csv(path)
    elif fmt == "parquet":
        data.to_parquet(path)
    elif fmt == "save_to_disk":
        data.save_to_disk(path)
    else:
        DatasetDict({"train": data, "test": data}).save_to_disk(path)
    script, _, _ = parse_train_args(["--dataset_name", str(path), "--model_name_or_path", "m", "--use_cpu"])
    train = select_split(load_prompt_dataset(script), "train", str(path), "--dataset_train_split")
    assert list(train["prompt"]) == ROWS["prompt"] and [str(a) for a in train["answer"]] == ROWS["answer"]


# --- bad input: one line, exit status 2, nothing written --------------------------------------------------------------

def test_unknown_reward(capsys, tmp_path):
    line = train_error(capsys, "--reward_funcs", "exact_matchh", "--output_dir", str(tmp_path / "out"))
    assert "unknown reward function 'exact_matchh'" in line and "'exact_match'" in line
    assert not (tmp_path / "out").exists()


def test_unimportable_dotted_reward(capsys):
    assert "cannot import module 'no_such_pkg.rewards'" in train_error(capsys, "--reward_funcs", "no_such_pkg.rewards.f")


def test_reward_weights_must_match(capsys):
    line = train_error(capsys, "--reward_funcs", "exact_match", "char_accuracy", "--reward_weights", "1.0")
    assert "--reward_weights has 1 values" in line


def test_dataset_without_prompt_column(capsys, tmp_path):
    path = tmp_path / "data.csv"
    Dataset.from_dict({"question": ["1+1="], "answer": ["2"]}).to_csv(path)
    line = train_error(capsys, "--dataset_name", str(path), "--model_name_or_path", "m", "--reward_funcs",
                       "exact_match", "--use_cpu", "--output_dir", str(tmp_path / "out"))
    assert "has no 'prompt' column; its columns are ['question', 'answer']" in line
    assert not (tmp_path / "out").exists()


def test_missing_dataset_file_and_split(capsys, tmp_path, jsonl_dataset):
    common = ["--model_name_or_path", "m", "--reward_funcs", "exact_match", "--use_cpu"]
    assert "no such file or directory" in train_error(capsys, "--dataset_name", str(tmp_path / "x.jsonl"), *common)
    line = train_error(capsys, "--dataset_name", jsonl_dataset, "--dataset_train_split", "dev", *common)
    assert "has no split 'dev'; its splits are ['train']" in line


def test_missing_model_path(capsys, tmp_path, jsonl_dataset):
    common = ["--dataset_name", jsonl_dataset, "--reward_funcs", "exact_match", "--use_cpu"]
    assert "no such directory" in train_error(capsys, *common, "--model_name_or_path", str(tmp_path / "none"))
    line = train_error(capsys, *common, "--model_name_or_path", str(tmp_path))  # exists, but holds no model
    assert line.startswith(f"gmpo train: error: cannot load model '{tmp_path}'")
    assert "--model_name_or_path is required" in train_error(capsys, *common[:4], "--use_cpu")


def test_invalid_flag_values(capsys):
    assert "`epsilon` is a GMPO clip bound in log space" in train_error(capsys, "--epsilon", "-1")
    assert "`loss_type` must be 'gmpo'" in train_error(capsys, "--loss_type", "grpo")
    assert "invalid float value: 'abc'" in train_error(capsys, "--learning_rate", "abc")
    assert "--not_a_flag" in train_error(capsys, "--not_a_flag", "1")
    assert "has no built-in preset" in train_error(capsys, "--task", "chess")


def test_console_entry_point_exit_status_and_one_line():
    result = run_cli("train", "--reward_funcs", "nope")  # the default 300 s: importing TRL is slow on a loaded machine
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"gmpo train: error: unknown reward function 'nope'; valid names are {sorted(REWARDS)}, or a dotted import "
        "path such as 'my_package.rewards.my_reward'"
    ]


def test_top_level_usage(capsys):
    assert main([]) == 2 and "commands:" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gmpo: error: unknown command 'trian'; did you mean 'train'? (valid commands are 'train' and 'plot')")


def test_plot_errors(capsys, tmp_path):
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"gmpo plot: error: {tmp_path} has no trainer_state.json; pass the output directory of a `gmpo train` run"
    )


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    from gmpo.cli.plot import write_plots

    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "reward": 0.5}]}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(UsageError, match=r"plots need matplotlib: pip install matplotlib"):
        write_plots(tmp_path)


# --- dry run --------------------------------------------------------------------------------------------------------

def dry_run(capsys, *args) -> dict:
    assert main(["train", *args, "--dry-run"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_dry_run_of_the_builtin_default(capsys):
    config = dry_run(capsys)
    assert config["derived"]["optimizer_steps_per_rollout"] == 8 and config["derived"]["clip_can_act"] is True
    assert config["training"]["output_dir"] == "runs/gmpo-addition" and config["script"]["task"] == "addition"


@pytest.mark.parametrize("generation, accumulation, iterations, steps, acts", [
    (8, 1, 1, 8, True),  # 8 optimizer steps per rollout
    (4, 4, 1, 1, False),  # TRL's default shape: each rollout used by exactly one optimizer step
    (4, 4, 2, 2, True),  # num_iterations reuses a rollout after a step
    (2, 4, 1, 0.5, False),  # one optimizer step spans two rollouts, each generated with the current weights
    (4, 3, 1, 4 / 3, True),  # optimizer steps fall inside rollouts
])
def test_dry_run_optimizer_steps_per_rollout(capsys, generation, accumulation, iterations, steps, acts):
    derived = dry_run(capsys, "--steps_per_generation", str(generation), "--gradient_accumulation_steps",
                      str(accumulation), "--num_iterations", str(iterations))["derived"]
    assert derived["optimizer_steps_per_rollout"] == pytest.approx(steps) and derived["clip_can_act"] is acts


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_dry_run_of_every_recipe(capsys, recipe):
    config = dry_run(capsys, "--config", str(recipe))
    training, derived = config["training"], config["derived"]
    assert training["loss_type"] == "gmpo" and training["epsilon"] == 0.4 and training["beta"] == 0.0
    assert derived["clip_can_act"] is True and derived["optimizer_steps_per_rollout"] > 1
    assert config["script"]["reward_funcs"] == ["accuracy_reward"]


def test_paper_recipe_matches_the_paper(capsys):
    config = dry_run(capsys, "--config", str(REPO / "recipes" / "gmpo-qwen2.5-math-7b-math-lvl3to5.yaml"))
    training, derived = config["training"], config["derived"]
    assert config["model"]["model_name_or_path"] == "Qwen/Qwen2.5-Math-7B"
    assert (training["num_generations"], training["learning_rate"], training["lr_scheduler_type"]) == (8, 1e-6,
                                                                                                      "constant")
    assert (training["max_completion_length"], training["temperature"], training["use_vllm"]) == (3000, 1.0, True)
    assert derived["optimizer_steps_per_rollout"] == 8
    processes = 8  # the recipe's per-device sizes are for one 8-GPU node
    assert derived["prompts_per_rollout"] * processes == 128
    assert derived["completions_per_optimizer_step"] * processes == 128


def test_prepare_math_script(tmp_path):
    source, output = tmp_path / "src", tmp_path / "out"
    DatasetDict({"train": Dataset.from_dict({"problem": ["What is $1+1$?"], "answer": ["2"]})}).save_to_disk(source)
    subprocess.run([sys.executable, str(REPO / "recipes" / "prepare_math_lvl3to5.py"), str(source), str(output)],
                   check=True, capture_output=True)
    script, _, _ = parse_train_args(["--dataset_name", str(output), "--model_name_or_path", "m", "--use_cpu"])
    row = select_split(load_prompt_dataset(script), "train", str(output), "--dataset_train_split")[0]
    assert row["prompt"][1] == {"role": "user", "content": "What is $1+1$?"} and row["solution"] == "\\boxed{2}"


# --- end to end -----------------------------------------------------------------------------------------------------

PLOTS = ["accuracy.png", "clip_fraction.png", "entropy.png", "log_ratio.png", "reward.png"]


def test_train_end_to_end_and_plot(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_complete.json").write_text("{}")  # a stale marker from an earlier run must not survive
    # 4 steps (half a rollout) on 128 prompts: enough to exercise generation, the off-policy loss and every output.
    result = run_cli("train", "--output_dir", str(out), "--max_steps", "4", "--train_size", "512", "--eval_size", "64",
                     "--accuracy_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out greedy accuracy before training" in result.stdout and "->" in result.stdout
    for name in ["model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "run_complete.json"]:
        assert (out / name).is_file(), f"{name} missing from the output dir"
    summary = json.loads((out / "run_complete.json").read_text())
    assert summary["global_step"] == 4 and summary["seed"] == 42 and summary["clip_can_act"] is True
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [row["step"] for row in history if "greedy_accuracy" in row] == [0, 2, 4]
    assert sum("gmpo/log_ratio_max" in row for row in history) == 4
    assert sorted(p.name for p in (out / "plots").iterdir()) == PLOTS

    for png in (out / "plots").iterdir():
        png.unlink()
    assert main(["plot", str(out)]) == 0
    assert sorted(p.name for p in (out / "plots").iterdir()) == PLOTS
    assert all((out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in PLOTS)


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """`gmpo train` with no arguments (but the output dir): at least +10 points of held-out accuracy with the default
    seed. Measured gains, seeds 42 and 0-3 on an Intel Xeon and an AMD EPYC, were +20.2 to +26.1 points (docs/cli.md):
    the threshold is half the smallest, so it holds on processors whose rounding gives another trajectory."""
    result = run_cli("train", "--output_dir", str(tmp_path / "run"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_complete.json").read_text())
    gain = summary["accuracy_after"] - summary["accuracy_before"]
    assert gain >= 0.10, f"held-out accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}"
