"""`gmpo plot OUTPUT_DIR`: PNG figures of a run's log history (trainer_state.json), into OUTPUT_DIR/plots/.

One figure per quantity, over optimizer steps: reward, held-out greedy accuracy, the per-step extremes of the token
log-ratio log(pi_theta / pi_old) (the paper's stability plot, Fig. 1), clip fractions and mean token entropy. A
figure whose metrics the run did not log is skipped.
"""

import argparse
import json
from pathlib import Path

from gmpo.cli.exit_status import UsageError
from gmpo.cli.flags import check_no_leftovers

# file stem -> (title, y label, log-history keys)
FIGURES = {
    "reward": ("Mean reward of the sampled completions", "reward", ("reward",)),
    "accuracy": ("Held-out greedy accuracy", "exact-match accuracy", ("greedy_accuracy",)),
    "log_ratio": (
        "Token log-ratio log(pi/pi_old): extremes per step",
        "log-ratio",
        ("gmpo/log_ratio_max", "gmpo/log_ratio_min"),
    ),
    "clip_fraction": (
        "Fraction of tokens clipped",
        "fraction",
        ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"),
    ),
    "entropy": ("Mean token entropy", "nats", ("entropy",)),
}


def load_log_history(output_dir: Path) -> list[dict]:
    path = output_dir / "trainer_state.json"
    if not path.is_file():
        raise UsageError(f"{output_dir} has no trainer_state.json; pass the output directory of a `gmpo train` run")
    try:
        return json.loads(path.read_text())["log_history"]
    except (json.JSONDecodeError, KeyError) as err:
        raise UsageError(f"{path} is not a Trainer state file (no readable log_history: {err})") from None


def write_plots(output_dir: Path, clip_bounds: tuple[float, float] | None = None) -> list[Path]:
    """Draw every figure whose metrics the log history has; returns the PNG paths written.

    `clip_bounds` (epsilon, epsilon_high), log space, adds the clip range to the log-ratio figure.
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = load_log_history(output_dir)
    plots_dir = output_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    written = []
    for stem, (title, ylabel, keys) in FIGURES.items():
        series = {key: [(row["step"], row[key]) for row in history if key in row and "step" in row] for key in keys}
        series = {key: points for key, points in series.items() if points}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, marker="o" if len(points) <= 20 else None, linewidth=1.2)
        if stem == "log_ratio" and clip_bounds is not None:
            for bound, label in ((-clip_bounds[0], "clip range"), (clip_bounds[1], None)):
                ax.axhline(bound, color="grey", linestyle="--", linewidth=0.8, label=label)
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 or stem == "log_ratio":
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = plots_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (usage: gmpo plot OUTPUT_DIR)")


def plot_command(argv: list[str]) -> None:
    parser = _Parser(prog="gmpo plot", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("output_dir", type=Path, nargs="?", help="output directory of a `gmpo train` run")
    args, leftovers = parser.parse_known_args(argv)
    check_no_leftovers(leftovers, list(parser._option_string_actions), "usage: gmpo plot OUTPUT_DIR")
    if args.output_dir is None:
        raise UsageError("missing OUTPUT_DIR, the output directory of a `gmpo train` run (usage: gmpo plot OUTPUT_DIR)")
    summary_path = args.output_dir / "run_complete.json"
    clip_bounds = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
            clip_bounds = (float(summary["epsilon"]), float(summary["epsilon_high"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            clip_bounds = None  # an unreadable summary only costs the clip-range lines of the log-ratio figure
    written = write_plots(args.output_dir, clip_bounds)
    if not written:
        raise UsageError(f"{args.output_dir}/trainer_state.json logs none of the plotted metrics")
    print("\n".join(str(path) for path in written))
