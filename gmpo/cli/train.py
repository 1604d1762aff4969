"""`gmpo train`: check the input, build a GMPOTrainer as `trl grpo` builds a GRPOTrainer, train, save, report.

The output directory holds a finished run only if `run_complete.json` is there: it is removed when a run starts and
written last, after the model, tokenizer, trainer_state.json and plots. `--resume_from_checkpoint true|PATH` resumes
from a complete checkpoint (a finished run is left as it is).

Exit statuses (`gmpo.cli.exit_status`): 0 finished; 1 a failure a restart may fix (a reward function's ConnectionError
or TimeoutError, or a crash with its traceback); 2 the configuration cannot run (bad input, a missing optional package,
an option upstream rejects, a model that does not load; nothing written); 3 a failure a restart reproduces (a reward
function that raised or returned malformed output, a non-finite gradient with nonfinite_grad_policy="stop", a vLLM
sampler that does not run the trainer's weights with stale_sampler_policy="stop");
128 + N stopped by signal N (130 SIGINT, 143 SIGTERM), worth resuming. GMPO_TRACEBACK=1 adds the traceback.
"""

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import psutil
import yaml
from transformers.utils import logging as transformers_logging

from gmpo.cli.args import describe_rollouts, parse_train_args, resolved_config, rollout_summary
from gmpo.cli.callbacks import CompactProgress, HeldOutAccuracy
from gmpo.cli.checks import check_arguments, check_chat_template, check_model, check_output_dir
from gmpo.cli.exit_status import UsageError, stopped_by_signal, training_stop
from gmpo.cli.preflight import (
    check_lora_targets,
    check_optional_packages,
    check_vllm_platform,
    options_set,
    rejected_at_construction,
)
from gmpo.cli.resume import Stopped, close_progress_bars, resume_request, stop_message, stop_on_signals
from gmpo.cli.rewards import check_reward_columns, resolve_rewards
from gmpo.trl.checkpoint import resolve_resume_checkpoint
from gmpo.trl.guards import NonFiniteGradientError, RewardFunctionError
from gmpo.trl.sampler_guard import StaleSamplerError

MARKER = "run_complete.json"


def train(argv: list[str]) -> None:
    script_args, training_args, model_args = parse_train_args(argv)
    check_arguments(script_args, model_args)
    check_optional_packages(training_args, model_args, strict=not script_args.dry_run)
    if not script_args.dry_run:
        check_vllm_platform(training_args)
    check_output_dir(training_args.output_dir)
    reward_funcs = resolve_rewards(script_args.reward_funcs, training_args, require_packages=not script_args.dry_run)
    if script_args.dry_run:
        print(yaml.safe_dump(resolved_config(script_args, training_args, model_args), sort_keys=False), end="")
        return

    output_dir = Path(training_args.output_dir)
    resume = resume_request(training_args.resume_from_checkpoint)
    if resume and (output_dir / MARKER).is_file():
        print(f"{output_dir} holds a finished run ({MARKER}): nothing to resume")
        return
    try:
        checkpoint = resolve_resume_checkpoint(resume, str(output_dir))
    except ValueError as err:
        raise UsageError(str(err)) from None
    running = {}
    with stop_on_signals():
        try:
            run(argv, script_args, training_args, model_args, reward_funcs, checkpoint, running)
        except Stopped as stop:
            trainer = running.get("trainer")
            if trainer is not None:
                close_progress_bars(trainer)
            if int(os.environ.get("RANK", "0")) == 0:
                step = trainer.state.global_step if trainer is not None else None
                print(stop_message(argv, str(output_dir), stop.signum, step), file=sys.stderr)
            raise SystemExit(stopped_by_signal(stop.signum)) from None


def run(argv, script_args, training_args, model_args, reward_funcs, checkpoint, running: dict) -> None:
    """Load, train from `checkpoint` (None: step 0), save, report; `running["trainer"]` is the trainer once built."""
    data = load_data(script_args, training_args)
    source = script_args.dataset_name or f"built-in task {script_args.task!r}"
    check_reward_columns(script_args.reward_funcs, reward_funcs, data[0].column_names, source)
    check_model(model_args, training_args)
    check_lora_targets(model_args, training_args)
    check_chat_template(data[0], model_args, training_args, source)
    plots_available = matplotlib_available()

    output_dir = Path(training_args.output_dir)
    created_output_dir = not output_dir.exists()
    settings = options_set(argv, script_args, training_args, model_args)
    with rejected_at_construction(settings, output_dir, created_output_dir):
        trainer, accuracy = build_trainer(script_args, training_args, model_args, reward_funcs, data)
    running["trainer"] = trainer
    # Loaded and downloaded: from here on, no "Writing model shards" bar breaks the training bar at every checkpoint.
    transformers_logging.disable_progress_bar()

    is_main = trainer.accelerator.is_main_process
    if is_main:
        (output_dir / MARKER).unlink(missing_ok=True)  # from here on the directory is not a finished run
        if not plots_available:
            print("matplotlib is not installed: no plots will be written (pip install matplotlib)", file=sys.stderr)
    trainer.accelerator.print(f"GMPO on {source}: {describe_rollouts(training_args)}")
    if checkpoint is not None:
        trainer.accelerator.print(f"resuming from {checkpoint}")

    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except (RewardFunctionError, NonFiniteGradientError, StaleSamplerError) as err:
        close_progress_bars(trainer)
        kept = remove_unfinished_output(output_dir, created_output_dir) if is_main else ""
        raise training_stop(err, kept) from err
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if is_main:
        wall_time_s = time.time() - psutil.Process().create_time()  # since the process started, imports included
        summary = run_summary(argv, script_args, training_args, model_args, trainer, accuracy, wall_time_s)
        summary["resumed_from"] = checkpoint
        report(summary, output_dir, plots_available)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers and the process group, as `trl grpo` does
        trainer.end()


def remove_unfinished_output(output_dir: Path, created: bool) -> str:
    """Delete the output directory of a failed run if this run created it and it holds no checkpoint; say what is left.
    Either way it holds no run_complete.json, so it never reads as a finished run."""
    if created and output_dir.is_dir() and not any(output_dir.glob("checkpoint-*")):
        shutil.rmtree(output_dir, ignore_errors=True)
        return f"stopped; nothing was saved, {output_dir} removed"
    return f"stopped; {output_dir} holds no {MARKER}: not a finished run"


def build_trainer(script_args, training_args, model_args, reward_funcs, data):
    """The GMPOTrainer, built as `trl grpo` builds its GRPOTrainer, and the held-out accuracy callback (or None)."""
    import torch
    from transformers import ProgressCallback
    from trl import get_peft_config, get_quantization_config

    from gmpo import GMPOTrainer

    train_dataset, eval_dataset, heldout = data
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    trainer = GMPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    accuracy = None
    if heldout is not None:  # added before the progress bar so that the accuracy before training prints above it
        accuracy = HeldOutAccuracy(trainer.processing_class, heldout, script_args.accuracy_steps)
        trainer.add_callback(accuracy)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgress())
    return trainer, accuracy


def load_data(script_args, training_args):
    """(train, eval or None, held-out set for greedy accuracy or None)."""
    need_eval = training_args.eval_strategy != "no"
    if script_args.dataset_name is None:
        from gmpo.tasks import make_dataset

        train_set = make_dataset(script_args.task, script_args.train_size, training_args.seed, "train")
        heldout = make_dataset(script_args.task, script_args.eval_size, training_args.seed, "test")
        return train_set, heldout if need_eval else None, heldout

    from gmpo.cli.data import load_prompt_dataset, select_split

    data = load_prompt_dataset(script_args)
    name = script_args.dataset_name
    train_set = select_split(data, script_args.dataset_train_split, name, "--dataset_train_split")
    eval_set = select_split(data, script_args.dataset_test_split, name, "--dataset_test_split") if need_eval else None
    return train_set, eval_set, None


def matplotlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def run_summary(argv, script_args, training_args, model_args, trainer, accuracy, wall_time_s: float) -> dict:
    summary = {
        "source": script_args.dataset_name or f"task:{script_args.task}",
        "model": model_args.model_name_or_path,
        "reward_funcs": script_args.reward_funcs,
        "seed": training_args.seed,
        "global_step": trainer.state.global_step,
        "epsilon": training_args.epsilon,
        "epsilon_high": training_args.epsilon_high,
        **rollout_summary(training_args),
        "wall_time_s": round(wall_time_s, 1),
        "command": shlex.join(["gmpo", "train", *argv]),
    }
    if accuracy is not None:  # before: measured at step 0 of the run, also when this process resumed it
        before, after = accuracy.before_and_after(trainer.state, trainer.model)
        summary.update(accuracy_before=before, accuracy_after=after, accuracy_prompts=len(accuracy.dataset))
    return summary


def report(summary: dict, output_dir: Path, plots_available: bool) -> None:
    """Print the result, draw the plots, then write the marker: the last file of a finished run."""
    if "accuracy_before" in summary:
        before, after = 100 * summary["accuracy_before"], 100 * summary["accuracy_after"]
        print(
            f"held-out greedy accuracy: {before:.1f}% -> {after:.1f}% ({after - before:+.1f} points; "
            f"{summary['accuracy_prompts']} prompts, seed {summary['seed']})"
        )
    if plots_available:
        from gmpo.cli.plot import write_plots

        written = write_plots(output_dir, clip_bounds=(summary["epsilon"], summary["epsilon_high"]))
        print(f"plots: {', '.join(str(p) for p in written)}")
    tmp = output_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, output_dir / MARKER)
    print(f"finished in {summary['wall_time_s']:.0f} s: model, trainer_state.json and {MARKER} in {output_dir}")

