"""`--dataset_name`: a Hub dataset, a local json/jsonl/csv/parquet file, or a directory (`save_to_disk` or data files).

A training set needs a `prompt` column, a string or a list of chat messages (TRL's standard and conversational
formats); its other columns reach the reward functions as keyword arguments.
"""

import json
from pathlib import Path

from gmpo.cli.exit_status import RetryableError, UsageError, is_transient

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompt_dataset(script_args):
    """The `datasets.DatasetDict` (or streamed `IterableDatasetDict`) that `script_args.dataset_name` names.

    A single local file becomes one split, "train"; `save_to_disk` output of a single Dataset likewise.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    name = script_args.dataset_name
    path = Path(name).expanduser()
    if path.is_file() and path.stat().st_size < 2**20 and not path.read_bytes().strip():
        raise UsageError(f"--dataset_name {name!r} is empty: a training set needs rows with a 'prompt' column")
    try:
        if path.is_file():
            builder = LOCAL_FORMATS.get(path.suffix.lower())
            if builder is None:
                raise UsageError(
                    f"--dataset_name {name!r} is a file of an unsupported type {path.suffix!r}; local files must be "
                    f"one of {sorted(LOCAL_FORMATS)}, or a directory written by Dataset.save_to_disk"
                )
            return load_dataset(builder, data_files=str(path))
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = load_from_disk(str(path))
            return DatasetDict({"train": data}) if isinstance(data, Dataset) else data
        if not path.exists() and (name.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_FORMATS):
            raise UsageError(f"--dataset_name {name!r}: no such file or directory")
        return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    except UsageError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, DatasetGenerationError, ...)
        if is_transient(err):
            raise RetryableError(f"cannot load dataset {name!r}: {' '.join(str(err).split())} (a restart may "
                                 "succeed)") from err
        raise UsageError(f"cannot load dataset {name!r}: {load_error_reason(err, path)}") from None


def load_error_reason(err: Exception, path: Path) -> str:
    """One line on why `datasets` could not load `path`: the first malformed line of a JSON Lines file, or the
    innermost cause of the error (DatasetGenerationError hides it)."""
    if path.is_file() and path.suffix.lower() == ".jsonl":
        bad_line = first_bad_json_line(path)
        if bad_line is not None:
            return bad_line
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    message = " ".join(str(err).split()) or type(err).__name__
    if "corresponds to no data" in message:
        return "it has no rows; a training set needs rows with a 'prompt' column"
    return f"{message} (pass a Hub dataset name, a {'/'.join(LOCAL_FORMATS)} file, or a directory written by save_to_disk)"


def first_bad_json_line(path: Path) -> str | None:
    """'line N ...' for the first non-blank line of a JSON Lines file that is not a JSON object, else None."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg}); each line must be one JSON object such as " \
                       '{"prompt": "..."}'
            if not isinstance(row, dict):
                return f"line {number} is a JSON {type(row).__name__}, not an object such as {{\"prompt\": \"...\"}}"
    return None


def select_split(data, split: str, name: str, flag: str):
    """`data[split]`, which must exist and have a `prompt` column (a streamed split may not know its columns)."""
    if split not in data:
        raise UsageError(f"dataset {name!r} has no split {split!r}; its splits are {list(data)} (set {flag})")
    dataset = data[split]
    columns = dataset.column_names
    if columns is not None and "prompt" not in columns:
        raise UsageError(
            f"dataset {name!r} (split {split!r}) has no 'prompt' column; its columns are {columns}. GMPO needs a "
            "'prompt' column (a string, or a list of chat messages); other columns are passed to the reward functions"
        )
    if hasattr(dataset, "__len__"):  # a streamed split is only read during training
        check_prompts(dataset, f"dataset {name!r} (split {split!r})")
    return dataset


PROMPT_FORMS = "a prompt is a non-empty string, or a non-empty list of chat messages {'role': str, 'content': ...}"


def check_prompts(dataset, where: str) -> str:
    """Every row's prompt in one of TRL's two formats; returns "standard" (strings) or "conversational" (messages)."""
    if len(dataset) == 0:
        raise UsageError(f"{where} has no rows; a training set needs rows with a 'prompt' column")
    formats = {}
    for index, prompt in enumerate(dataset["prompt"]):
        form, problem = prompt_format(prompt)
        if problem is not None:
            raise UsageError(f"{where}, row {index}: 'prompt' {problem}; {PROMPT_FORMS}")
        formats.setdefault(form, index)
        if len(formats) > 1:
            raise UsageError(
                f"{where} mixes prompt formats: row {formats['standard']} is a string, row "
                f"{formats['conversational']} a list of chat messages; use one format for every row"
            )
    return next(iter(formats))


def prompt_format(prompt) -> tuple[str | None, str | None]:
    """("standard" | "conversational", None) for a valid prompt, else (None, what is wrong with it)."""
    if isinstance(prompt, str):
        return ("standard", None) if prompt.strip() else (None, f"is an empty string {prompt!r}")
    if isinstance(prompt, list):
        if not prompt:
            return None, "is an empty list of messages"
        for position, message in enumerate(prompt):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
                return None, f"message {position} is {_short(message)}, not a mapping with 'role' and 'content'"
        return "conversational", None
    if prompt is None:
        return None, "is missing (null)"
    return None, f"is {type(prompt).__name__} {_short(prompt)}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
