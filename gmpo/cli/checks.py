"""Checks of `gmpo train`'s input that need no model weights: each bad value is a UsageError (one line, exit status 2)
raised before anything is written."""

import os
from pathlib import Path

from gmpo.cli.exit_status import RetryableError, UsageError, is_transient


def check_arguments(script_args, model_args) -> None:
    """What TRL would only discover after loading: a user dataset needs a model and rewards."""
    if script_args.dataset_name is not None:
        if model_args.model_name_or_path is None:
            raise UsageError("--model_name_or_path is required with --dataset_name (a local directory or a Hub id)")
        if not script_args.reward_funcs:
            from gmpo.cli.rewards import REWARDS

            raise UsageError(
                f"--reward_funcs is required with --dataset_name: names from {sorted(REWARDS)} or dotted import "
                "paths 'package.module.function'"
            )
    name = model_args.model_name_or_path
    if name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise UsageError(f"--model_name_or_path {name!r}: no such directory")


def check_output_dir(output_dir: str) -> None:
    """The output directory must be a directory, or creatable: its nearest existing ancestor a writable directory."""
    path = Path(output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {output_dir!r} is a file, not a directory; pass a directory path")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(
            f"--output_dir {output_dir!r} cannot be created: {str(ancestor)!r} is a file, not a directory"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir!r} is not writable ({str(ancestor)!r} does not allow writing)")


def check_model(model_args, training_args) -> None:
    """Load the model's config only, so that a bad model name fails before anything is written."""
    from transformers import AutoConfig

    name = model_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0]
        if is_transient(err):
            raise RetryableError(f"cannot load model {name!r}: {first_line} (a restart may succeed)") from err
        raise UsageError(
            f"cannot load model {name!r}: {first_line} (pass a directory written by save_pretrained or a Hub model id)"
        ) from err
    if not getattr(config, "architectures", None):
        raise UsageError(
            f"cannot load model {name!r}: its config names no `architectures`, from which TRL picks the model class "
            "(save the model with save_pretrained, which writes them, or add them to config.json)"
        )


def check_chat_template(train_set, model_args, training_args, source: str) -> None:
    """Conversational prompts (lists of messages) are rendered with the tokenizer's chat template, which must exist."""
    if not hasattr(train_set, "__len__") or len(train_set) == 0 or not isinstance(train_set[0]["prompt"], list):
        return
    from transformers import AutoTokenizer

    name = model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except (OSError, ValueError):
        return  # a model that ships a processor instead of a tokenizer: TRL loads it and checks it itself
    if getattr(tokenizer, "chat_template", None) is None:
        raise UsageError(
            f"{source} has conversational prompts (lists of chat messages), but the tokenizer of {name!r} has no chat "
            "template to render them; use string prompts, or a model whose tokenizer defines chat_template"
        )
