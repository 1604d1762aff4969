"""`gmpo train` under a job scheduler: `--resume_from_checkpoint true|PATH`, and SIGINT / SIGTERM as a clean stop.

A stopped run exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM) and one line on stderr naming
the command that resumes it; `run_complete.json` is not written, so the directory does not pass for a finished run.
"""

import shlex
import signal
from contextlib import contextmanager

from gmpo.trl.checkpoint import incompleteness, list_checkpoints

_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0", ""}
_FLAGS = ("--resume_from_checkpoint", "--resume-from-checkpoint")


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way
    swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def resume_request(value: str | None) -> bool | str | None:
    """`--resume_from_checkpoint` as the trainer takes it: True for 'true', None for 'false' or unset, else a path."""
    if value is None or str(value).strip().lower() in _FALSE:
        return None
    return True if str(value).strip().lower() in _TRUE else value


@contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM raise `Stopped`; the previous handlers come back after it."""

    def handler(signum, frame):
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def resume_command(argv: list[str]) -> str:
    """`gmpo train ARGV` with `--resume_from_checkpoint true` in place of any resume flag ARGV has."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _FLAGS:
            skip = True
        elif not arg.startswith(tuple(flag + "=" for flag in _FLAGS)):
            kept.append(arg)
    return shlex.join(["gmpo", "train", *kept, "--resume_from_checkpoint", "true"])


def stop_message(argv: list[str], output_dir: str, signum: int, step: int | None) -> str:
    """The one line a stopped run prints: what stopped it, where, and the command that resumes it."""
    newest = next((path for _, path in reversed(list_checkpoints(output_dir)) if incompleteness(path) is None), None)
    where = f" at optimizer step {step}" if step is not None else ""
    start = f"from {newest}" if newest is not None else "from step 0: no complete checkpoint yet"
    return (f"gmpo train: stopped by {signal.Signals(signum).name}{where}; resume ({start}) with: "
            f"{resume_command(argv)}")


def close_progress_bars(trainer) -> None:
    """Close the trainer's tqdm bars now, so that none is redrawn after the stop message."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)
