"""The `gmpo` command: `gmpo train` (GMPO training, parsed like `trl grpo`) and `gmpo plot OUTPUT_DIR`.

Bad input ends the command with one line on stderr, ``gmpo <command>: error: <what is wrong and what is valid>``, and
exit status 2, before anything is written to the output directory. Every exit status of `gmpo train` (0 finished, 1
may succeed on a restart, 2 cannot run, 3 a restart reproduces the failure, 128 + N stopped by signal N) is in
`gmpo.cli.exit_status`; GMPO_TRACEBACK=1 prints the traceback above a one-line error.
"""

import sys
import warnings

from gmpo.cli.exit_status import CommandError, RetryableError, RunError, UsageError, report

__all__ = ["CommandError", "RetryableError", "RunError", "UsageError", "main"]

USAGE = """usage: gmpo <command> [options]

commands:
  train   train a policy with GMPO; with no arguments, the built-in addition task (a few minutes on CPU)
  plot    redraw the figures of a `gmpo train` output directory: gmpo plot OUTPUT_DIR

`gmpo <command> --help` lists the command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from gmpo import __version__

        print(f"gmpo {__version__}")
        return 0
    # Deprecations that TRL 1.16 itself triggers on transformers 5 (GRPOConfig's gradient_checkpointing default, its
    # trainer's is_gradient_checkpointing call): not the user's to fix, and they would bury a one-line error.
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)
    command, rest = argv[0], argv[1:]
    if command == "train":
        from gmpo.cli.train import train as run
    elif command == "plot":
        from gmpo.cli.plot import plot_command as run
    else:
        from gmpo.cli.flags import closest

        suggestion = closest(command, ["train", "plot", "--help", "--version"])
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        print(f"gmpo: error: unknown command {command!r}{hint} (valid commands are 'train' and 'plot')", file=sys.stderr)
        return 2
    try:
        run(rest)
    except CommandError as err:
        return report(command, err)
    return 0
