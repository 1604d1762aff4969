"""`--dataset_name`: a Hub dataset, a local json/jsonl/csv/parquet file, or a directory (`save_to_disk` or data files).

A training set needs a `prompt` column, a string or a list of chat messages (TRL's standard and conversational
formats); its other columns reach the reward functions as keyword arguments.
"""

from pathlib import Path

from gmpo.cli import UsageError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompt_dataset(script_args):
    """The `datasets.DatasetDict` (or streamed `IterableDatasetDict`) that `script_args.dataset_name` names.

    A single local file becomes one split, "train"; `save_to_disk` output of a single Dataset likewise.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    name = script_args.dataset_name
    path = Path(name).expanduser()
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
    except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, DatasetNotFoundError, ...)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"cannot load dataset {name!r}: {first_line} (pass a Hub dataset name, a {'/'.join(LOCAL_FORMATS)} file, "
            "or a directory written by save_to_disk)"
        ) from None


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
    return dataset
