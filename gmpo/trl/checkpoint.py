"""All-or-nothing checkpoints: a marker written last says that a checkpoint's write finished.

`checkpoint-N/gmpo_checkpoint_complete.json` is written atomically (temporary file, fsync, rename) after every file
of the checkpoint, every rank's part included, has been written and flushed to disk. It lists each file with its size.
A checkpoint is complete when the marker parses, names its own step, and every file it lists is there with that size.
Resuming loads only complete checkpoints; rotation (`save_total_limit`) counts only complete ones.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "gmpo_checkpoint_complete.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as JSON so that `path` holds either its old content or all of the new one, also after a crash."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a folder named checkpoint-N, else None."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def unmark(checkpoint_dir: str | os.PathLike) -> None:
    """Remove the marker before a checkpoint folder is (re)written, so that a half-rewritten folder is incomplete."""
    marker = Path(checkpoint_dir) / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        _fsync_dir(marker.parent)


def mark_complete(checkpoint_dir: str | os.PathLike, global_step: int, world_size: int, required: list[str]) -> None:
    """Flush every file of the checkpoint to disk, then write the marker listing them (the last write).

    `required` names files every complete checkpoint holds (each rank's part): with one missing (ranks on machines
    that do not share this directory) the checkpoint is left incomplete, with an error in the log.
    """
    checkpoint_dir = Path(checkpoint_dir)
    missing = [name for name in required if not (checkpoint_dir / name).is_file()]
    if missing:
        logger.error(f"{checkpoint_dir} lacks {missing} after every process wrote its part: it is not marked complete "
                     "and will not be resumed from (do all processes write to one shared output_dir?)")
        return
    files = {}
    for path in sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.relative_to(checkpoint_dir).as_posix()] = path.stat().st_size
    write_json_atomic(
        checkpoint_dir / COMPLETE_MARKER, {"global_step": global_step, "world_size": world_size, "files": files}
    )


def incompleteness(checkpoint_dir: str | os.PathLike) -> str | None:
    """Why `checkpoint_dir` is not a complete checkpoint, or None when it is."""
    checkpoint_dir = Path(checkpoint_dir)
    marker = checkpoint_dir / COMPLETE_MARKER
    if not checkpoint_dir.is_dir():
        return "no such directory"
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (its write did not finish, or it was not written by GMPOTrainer)"
    try:
        info = json.loads(marker.read_text())
        step, files = info["global_step"], info["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE_MARKER}"
    if checkpoint_step(checkpoint_dir) not in (None, step):
        return f"{COMPLETE_MARKER} is for step {step}"
    for name, size in files.items():
        path = checkpoint_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or has changed size since the checkpoint was written"
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N folder in `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in output_dir.iterdir() if p.is_dir()]
    return sorted((step, path) for step, path in found if step is not None)


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir: str) -> str | None:
    """The checkpoint a run resumes from: None (start at step 0), or the path of a complete checkpoint.

    `True` takes the newest complete checkpoint in `output_dir`, logging the incomplete ones it skips, and starts
    from step 0 with a warning when there is none. A path must be a complete checkpoint (ValueError otherwise).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is not True:
        reason = incompleteness(resume_from_checkpoint)
        if reason is not None:
            raise ValueError(
                f"resume_from_checkpoint={str(resume_from_checkpoint)!r} is not a complete checkpoint: {reason}. "
                "Pass resume_from_checkpoint=True to resume from the newest complete checkpoint in output_dir."
            )
        return str(resume_from_checkpoint)
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        reason = incompleteness(path)
        if reason is None:
            if skipped:
                logger.warning(f"Resuming from {path}; skipped incomplete checkpoint(s): {'; '.join(skipped)}")
            return str(path)
        skipped.append(f"{path.name} ({reason})")
    logger.warning(
        f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint"
        + (f" (incomplete: {'; '.join(skipped)})" if skipped else "")
        + ": training starts from step 0."
    )
    return None


def finished_state(checkpoint_dir: str, max_steps: int):
    """The checkpoint's TrainerState when it is the end of training (global_step >= max_steps, or the state's own
    max_steps when `max_steps` <= 0), else None."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(os.path.join(checkpoint_dir, "trainer_state.json"))
    target = max_steps if max_steps > 0 else state.max_steps
    return state if target and state.global_step >= target else None


def rotate_checkpoints(output_dir: str, keep: int | None, current: str, best: str | None = None) -> None:
    """Delete checkpoints beyond the newest `keep` complete ones, and every incomplete one but `current`.

    `current` (just marked complete) and `best` are never deleted, so a complete checkpoint always remains.
    """
    if keep is None or keep <= 0:
        return
    current, best = Path(current).resolve(), Path(best).resolve() if best else None
    complete, incomplete = [], []
    for _, path in list_checkpoints(output_dir):
        (complete if incompleteness(path) is None else incomplete).append(path)
    protected = {current, best}
    kept = [p for p in complete if p.resolve() in protected]
    for path in reversed(complete):
        if len(kept) < keep and path not in kept:
            kept.append(path)
    for path in complete + incomplete:
        if path not in kept and path.resolve() not in protected:
            logger.info(f"Deleting checkpoint {path} (save_total_limit={keep})")
            shutil.rmtree(path, ignore_errors=True)
