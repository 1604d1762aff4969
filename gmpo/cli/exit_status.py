"""Exit statuses of `gmpo train`, and which failure of a run maps to which. A job script restarts a run only when a
restart can change the outcome (the README's loop):

    0        finished (or already finished: nothing to resume)                                       done
    1        may succeed on a restart: a reward function, the Hub or another service could not be     a few restarts
             reached or timed out (one line), or an unexpected error (a crash, with its traceback)
    2        cannot run: bad input, a missing optional package, an option upstream rejects, a model   fix the command
             that does not load (one line; nothing written)
    3        a restart reproduces the failure: a reward function raised, or returned anything but     fix the code or
             one number (or None) per completion; a non-finite gradient with                          the configuration
             nonfinite_grad_policy="stop"; a vLLM sampler that does not run the trainer's weights
             with stale_sampler_policy="stop" (one line)
    128 + N  stopped by signal N: 130 SIGINT, 143 SIGTERM (one line naming the resume command);       resume
             a shell reports 137 for SIGKILL

GMPO_TRACEBACK=1 prints the traceback (and the upstream error it came from) above each one-line error.
"""

import os
import sys
import traceback
from enum import IntEnum


class ExitStatus(IntEnum):
    FINISHED = 0
    MAY_SUCCEED_ON_RESTART = 1
    CANNOT_RUN = 2
    REPRODUCIBLE_FAILURE = 3


def stopped_by_signal(signum: int) -> int:
    """128 + N for signal N, as a shell reports a process that signal N killed."""
    return 128 + signum


# Errors that the same call can escape on a retry: a service that could not be reached, a call that timed out.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError)


def is_transient(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from or while handling (its __cause__ / __context__ chain), is one
    of TRANSIENT_ERRORS. HTTP clients (httpx) and huggingface_hub keep the socket's ConnectionError or
    TimeoutError in that chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, TRANSIENT_ERRORS):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


class CommandError(Exception):
    """A failure reported as one line `gmpo <command>: error: <message>` and exit status `status`."""

    status = ExitStatus.REPRODUCIBLE_FAILURE


class UsageError(CommandError):
    """Bad user input or a configuration that cannot run: one line and exit status 2, without a traceback."""

    status = ExitStatus.CANNOT_RUN


class RunError(CommandError):
    """A failure that only shows during training and that a restart reproduces (a reward function's output, a
    non-finite gradient with nonfinite_grad_policy="stop"): one line and exit status 3, without a traceback."""

    status = ExitStatus.REPRODUCIBLE_FAILURE


class RetryableError(CommandError):
    """A failure during training that a restart may fix (a reward service that could not be reached): one line and
    exit status 1, without a traceback."""

    status = ExitStatus.MAY_SUCCEED_ON_RESTART


def training_stop(err: Exception, what_is_left: str) -> CommandError:
    """The CLI error for a RewardFunctionError, NonFiniteGradientError or StaleSamplerError, with what the output
    directory holds now."""
    from gmpo.trl.guards import RewardFunctionError

    if isinstance(err, RewardFunctionError) and is_transient(err.__cause__):
        return RetryableError(f"{err}; a restart may succeed ({what_is_left})")
    return RunError(f"{err} ({what_is_left})")


def report(command: str, err: CommandError) -> int:
    """Print `err` as one line on stderr (the traceback above it with GMPO_TRACEBACK=1); its exit status."""
    if os.environ.get("GMPO_TRACEBACK", "").strip().lower() in ("1", "true", "yes"):
        traceback.print_exception(err)
    print(f"gmpo {command}: error: {err}", file=sys.stderr)
    return int(err.status)
