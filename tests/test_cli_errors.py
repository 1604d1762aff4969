"""Bad input to `gmpo train` / `gmpo plot`: one line naming what is wrong and what is valid, exit status 2, nothing
written; a reward function's bad output during training: one line naming it, exit status 3, no finished-looking run."""

import json

import pytest
import yaml

from gmpo.cli import main
from gmpo.cli.args import parse_train_args
from gmpo.tasks import policy_path

from .test_cli import train_error

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

# --- flags: exact names only; a typo names the closest valid flag ---------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--learning_rat", "3e-3"], "unknown flag --learning_rat; did you mean --learning_rate?"),
    (["--learning-rat", "3e-3"], "unknown flag --learning-rat; did you mean --learning-rate?"),
    (["--max_step", "3"], "unknown flag --max_step; did you mean --max_steps?"),
    (["--epsilon_hi=0.3"], "unknown flag --epsilon_hi; did you mean --epsilon_high?"),
    (["--dataset_nam", "x.jsonl"], "unknown flag --dataset_nam; did you mean --dataset_name?"),
    (["--xyzzy", "1"], "unknown flag --xyzzy (see gmpo train --help)"),
    (["extra"], "unexpected argument 'extra'"),
    (["--config"], "--config needs the path of a YAML file"),
    (["--config", "no/such.yaml"], "--config 'no/such.yaml': no such file"),
])
def test_flags_must_match_exactly(capsys, args, message):
    assert message in train_error(capsys, *args, "--dry-run")


def test_an_abbreviation_no_longer_sets_the_field():
    # argparse's default would take --learning_rat as --learning_rate; the probe parse and the full parse both refuse.
    with pytest.raises(Exception, match="unknown flag --learning_rat"):
        parse_train_args(["--learning_rat", "3e-3"])
    _, training, _ = parse_train_args(["--learning_rate", "3e-3"])
    assert training.learning_rate == 3e-3


def test_config_keys_must_match_exactly(capsys, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"learning_rat": 3e-3}))
    assert f"unknown key 'learning_rat' in config file {config}; did you mean 'learning_rate'?" in train_error(
        capsys, "--config", str(config), "--dry-run")
    config.write_text(yaml.safe_dump({"learning_rate": 3e-3}))
    _, training, _ = parse_train_args([f"--config={config}"])
    assert training.learning_rate == 3e-3


@pytest.mark.parametrize("args, message", [
    (["--train_size", "0"], "--train_size must be an integer >= 1, got 0"),
    (["--eval_size", "-5"], "--eval_size must be an integer >= 1, got -5"),
    (["--accuracy_steps", "-1"], "--accuracy_steps must be an integer >= 0, got -1"),
    (["--num_threads", "0"], "--num_threads must be an integer >= 1, got 0"),
])
def test_script_argument_ranges(capsys, args, message):
    assert message in train_error(capsys, *args, "--dry-run")


def test_plot_and_top_level_typos(capsys):
    assert main(["plot", "--hepl"]) == 2
    assert "unknown flag --hepl; did you mean --help?" in capsys.readouterr().err
    assert main(["plot"]) == 2
    assert "missing OUTPUT_DIR" in capsys.readouterr().err
    assert main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err


# --- the output directory ---------------------------------------------------------------------------------------------


def test_output_dir_below_a_file_or_a_file(capsys, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    line = train_error(capsys, "--output_dir", str(blocker / "run"), "--max_steps", "1")
    assert f"cannot be created: '{blocker}' is a file, not a directory" in line
    assert "is a file, not a directory" in train_error(capsys, "--output_dir", str(blocker), "--max_steps", "1")
    assert blocker.read_text() == "not a directory"


# --- the data: every row is checked before anything is written ------------------------------------------------------

BAD_FILES = {
    "empty.jsonl": ("", "is empty: a training set needs rows"),
    "blank.jsonl": ("\n  \n", "is empty: a training set needs rows"),
    "header-only.csv": ("prompt,answer\n", "it has no rows"),
    "empty-array.json": ("[]", "it has no rows"),
    "truncated.jsonl": ('{"prompt": "1+1="}\n{"prompt": \n', "line 2 is not valid JSON"),
    "not-objects.jsonl": ('"1+1="\n', "line 1 is a JSON str, not an object"),
    "int-prompts.jsonl": ('{"prompt": 12}\n{"prompt": 13}\n', "row 0: 'prompt' is int 12"),
    "null-prompt.jsonl": ('{"prompt": "1+1="}\n{"prompt": null}\n', "row 1: 'prompt' is missing (null)"),
    "missing-prompt.jsonl": ('{"prompt": "1+1="}\n{"question": "2+2="}\n', "row 1: 'prompt' is missing (null)"),
    "empty-prompt.jsonl": ('{"prompt": "1+1="}\n{"prompt": "  "}\n', "row 1: 'prompt' is an empty string"),
    "no-role.jsonl": ('{"prompt": [{"content": "hi"}]}\n', "row 0: 'prompt' message 0 is {'content': 'hi'}, not a"),
    "no-messages.jsonl": ('{"prompt": [{"role": "user", "content": "hi"}]}\n{"prompt": []}\n',
                          "row 1: 'prompt' is an empty list of messages"),
    "mixed-formats.jsonl": ('{"prompt": "1+1="}\n{"prompt": [{"role": "user", "content": "hi"}]}\n',
                            "mixes prompt formats: row 0 is a string, row 1 a list of chat messages"),
    "float-prompts.csv": ("prompt,answer\n1.5,2\n", "row 0: 'prompt' is float 1.5"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_data_is_one_line(capsys, tmp_path, name):
    content, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "out"
    line = train_error(capsys, "--dataset_name", str(path), "--model_name_or_path", "m", "--reward_funcs",
                       "exact_match", "--use_cpu", "--output_dir", str(out))
    assert message in line, line
    if "'prompt' " in message:
        assert "a prompt is a non-empty string, or a non-empty list of chat messages" in line
    assert not out.exists()


def test_conversational_prompts_need_a_chat_template(capsys, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}) + "\n")
    line = train_error(capsys, "--dataset_name", str(path), "--model_name_or_path", str(policy_path("addition")),
                       "--reward_funcs", "exact_match", "--use_cpu", "--output_dir", str(tmp_path / "out"))
    assert "has conversational prompts (lists of chat messages), but the tokenizer of" in line
    assert "has no chat template" in line and not (tmp_path / "out").exists()


# --- a reward function's output, seen only during training -----------------------------------------------------------

REWARDS_MODULE = '''
def one_short(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def text(completions, **kwargs):
    return ["good"] * len(completions)
'''


@pytest.mark.parametrize("func, message", [
    ("one_short", "reward function 'one_short' returned 7 rewards for 8 completions"),
    ("text", "reward function 'text' returned a non-numeric reward at index 0: str 'good'"),
])
def test_bad_reward_output_stops_with_one_line(capsys, tmp_path, monkeypatch, func, message):
    (tmp_path / "bad_rewards.py").write_text(REWARDS_MODULE)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "12+34=", "answer": "46"}\n{"prompt": "50+50=", "answer": "100"}\n')
    monkeypatch.chdir(tmp_path)  # a dotted-path reward is imported from the working directory, as `trl grpo` does
    out = tmp_path / "out"
    capsys.readouterr()
    status = main(["train", "--dataset_name", str(data), "--model_name_or_path", str(policy_path("addition")),
                   "--reward_funcs", f"bad_rewards.{func}", "--use_cpu", "--output_dir", str(out), "--max_steps", "2",
                   "--per_device_train_batch_size", "8", "--num_generations", "4", "--report_to", "none"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 3 and "Traceback" not in err
    assert lines[-1].startswith(f"gmpo train: error: {message}"), lines[-1]
    assert lines[-1].endswith(f"(stopped; nothing was saved, {out} removed)")
    assert not out.exists(), "a failed run left its output directory behind"
