"""HF generation against vLLM colocate on the built-in task, and vLLM's importance-sampling correction on and off.

Each run is a whole default `gmpo train` (the addition preset: 200 optimizer steps, rollouts of 8 steps) in its own
process, with only `--seed`, `--output_dir` and the variant's options added. The GRPO variants are the same command
with the trainer swapped for `trl.GRPOTrainer` (`loss_type="grpo"`, ratio clip 1±0.2, TRL's defaults); on CPU it gets
the same vLLM weight sync as GMPOTrainer. Runs go one after another, never two at once (vLLM pins a core).

    python benchmarks/vllm_generation.py                         # 6 variants x 3 seeds
    python benchmarks/vllm_generation.py --seeds 0 --steps 16    # a quick look
    python benchmarks/vllm_generation.py --report runs/vllm-generation/results.json   # tables of a finished grid

Per run: wall time of the process (imports, engine start, training, evaluation), time inside the trainer's
`_generate` (generation and, with vLLM, the weight sync), held-out greedy accuracy before/after (800 prompts, as
`gmpo train` prints it), and the mean over rollouts of TRL's sampler/trainer mismatch metrics (vLLM runs only).
The report adds the within-seed differences of the final accuracy between variants (PAIRS).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.files import write_json_atomic  # noqa: E402

VLLM = ["--use_vllm", "true", "--vllm_mode", "colocate"]
# name -> (trainer, extra `gmpo train` options). TRL's IS correction is on by default.
VARIANTS = {
    "gmpo-hf": ("gmpo", []),
    "gmpo-vllm-is": ("gmpo", VLLM),
    "gmpo-vllm-nois": ("gmpo", VLLM + ["--vllm_importance_sampling_correction", "false"]),
    "grpo-hf": ("grpo", ["--epsilon", "0.2"]),
    "grpo-vllm-is": ("grpo", ["--epsilon", "0.2"] + VLLM),
    "grpo-vllm-nois": ("grpo", ["--epsilon", "0.2"] + VLLM + ["--vllm_importance_sampling_correction", "false"]),
}
MISMATCH = ["sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/min",
            "sampling/importance_sampling_ratio/max", "sampling/sampling_logp_difference/mean",
            "sampling/sampling_logp_difference/max"]


def run_one(variant: str, seed: int, steps: int | None, output_dir: Path, result_path: Path) -> None:
    """One `gmpo train` in this process, with `_generate` timed; writes `result_path`."""
    import trl

    import gmpo
    import gmpo.cli.train as cli_train
    from gmpo.cli import main

    timer = {"seconds": 0.0, "calls": 0}
    generate = trl.GRPOTrainer._generate

    def timed_generate(self, prompts):
        start = time.perf_counter()
        try:
            return generate(self, prompts)
        finally:
            timer["seconds"] += time.perf_counter() - start
            timer["calls"] += 1

    trl.GRPOTrainer._generate = timed_generate
    cli_train.matplotlib_available = lambda: False  # plots are not measured (and GRPO logs no GMPO metrics)
    trainer_kind, options = VARIANTS[variant]
    if trainer_kind == "grpo":
        gmpo.GMPOTrainer = grpo_trainer_class()
    argv = ["train", "--seed", str(seed), "--output_dir", str(output_dir), *options]
    if steps is not None:
        argv += ["--max_steps", str(steps)]
    status = main(argv)
    if status:
        raise SystemExit(f"{variant} seed {seed}: gmpo train exited {status}")
    summary = json.loads((output_dir / "run_complete.json").read_text())
    logs = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    rollouts = [row for row in logs if "reward" in row]
    result = {
        "variant": variant, "trainer": trainer_kind, "seed": seed, "command": "gmpo " + " ".join(argv),
        "global_step": summary["global_step"], "wall_time_s": summary["wall_time_s"],
        "generate_s": round(timer["seconds"], 2), "generate_calls": timer["calls"],
        "accuracy_before": summary["accuracy_before"], "accuracy_after": summary["accuracy_after"],
        "reward_first": rollouts[0]["reward"], "reward_last": rollouts[-1]["reward"],
        "loadavg_end": machine()["loadavg_1_5_15"],
        "mismatch": {key: statistics.fmean(row[key] for row in rollouts) for key in MISMATCH
                     if rollouts and all(key in row for row in rollouts)},
    }
    write_json_atomic(result_path, result)


def grpo_trainer_class():
    """trl.GRPOTrainer with loss_type 'grpo' (gmpo train's config says 'gmpo') and, on CPU, the vLLM reload sync."""
    from trl import GRPOTrainer

    from gmpo.trl.vllm_sync import use_reload_sync_where_needed

    class GRPOBaseline(GRPOTrainer):
        def __init__(self, model, reward_funcs=None, args=None, **kwargs):
            args.loss_type = "grpo"
            super().__init__(model, reward_funcs, args, **kwargs)
            if self.use_vllm:
                use_reload_sync_where_needed(self.vllm_generation)

    return GRPOBaseline


def machine() -> dict:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        model = platform.processor()
    load = os.getloadavg()
    return {"cpu": model, "cores": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in load]}


def run_grid(variants, seeds, steps, work: Path, collect_only: bool = False) -> dict:
    results = {"machine_at_start": machine(), "steps": steps, "runs": []}
    for seed in seeds:
        for variant in variants:
            path = work / f"{variant}__seed{seed}.json"
            if collect_only and not path.exists():
                continue
            if not path.exists():
                cmd = [sys.executable, __file__, "--one", variant, str(seed), str(steps or 0),
                       str(work / f"{variant}__seed{seed}"), str(path)]
                # 1 GiB of KV cache: vLLM's CPU worker otherwise sizes it from the machine's free memory
                env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "PYTHONPATH": str(ROOT)}
                subprocess.run(cmd, check=True, env=env)
            run = json.loads(path.read_text())
            results["runs"].append(run)
            print(f"{variant:15s} seed {seed}: {run['wall_time_s']:.0f} s, generation {run['generate_s']:.0f} s, "
                  f"accuracy {run['accuracy_before']:.3f} -> {run['accuracy_after']:.3f}", flush=True)
    results["machine_at_end"] = machine()
    return results


def mean_se(values, digits: int = 3, sign: str = "") -> str:
    """Mean ± standard error over seeds (the value alone for one seed); sign "+" writes the mean's sign."""
    values = list(values)
    if len(values) < 2:
        return f"{values[0]:{sign}.{digits}f}"
    return f"{statistics.fmean(values):{sign}.{digits}f} ± {statistics.stdev(values) / len(values) ** 0.5:.{digits}f}"


def table(results: dict) -> str:
    by_variant = {}
    for run in results["runs"]:
        by_variant.setdefault(run["variant"], []).append(run)
    head = ("| variant | seeds | run wall [s] | generation [s] | accuracy before | accuracy after | IS ratio mean "
            "(min / max) | logp diff mean |")
    lines = [head, "|" + "---|" * 8]
    for variant, runs in by_variant.items():
        mismatch = runs[0]["mismatch"]
        ratio = "-"
        if mismatch:
            ratio = (f"{mean_se(r['mismatch']['sampling/importance_sampling_ratio/mean'] for r in runs)} "
                     f"({min(r['mismatch']['sampling/importance_sampling_ratio/min'] for r in runs):.2f} / "
                     f"{max(r['mismatch']['sampling/importance_sampling_ratio/max'] for r in runs):.2f})")
        diff = mean_se(r["mismatch"]["sampling/sampling_logp_difference/mean"] for r in runs) if mismatch else "-"
        lines.append(
            f"| {variant} | {len(runs)} | {mean_se((r['wall_time_s'] for r in runs), 0)} | "
            f"{mean_se((r['generate_s'] for r in runs), 0)} | {mean_se(r['accuracy_before'] for r in runs)} | "
            f"{mean_se(r['accuracy_after'] for r in runs)} | {ratio} | {diff} |")
    return "\n".join(lines)


# (variant, baseline): accuracy after training, variant minus baseline, seed by seed.
PAIRS = [("gmpo-vllm-is", "gmpo-hf"), ("gmpo-vllm-nois", "gmpo-vllm-is"),
         ("grpo-vllm-is", "grpo-hf"), ("grpo-vllm-nois", "grpo-vllm-is")]


def paired(results: dict) -> str:
    """Within-seed differences of the final accuracy (same data, same held-out set), with their mean ± SE."""
    after = {(run["variant"], run["seed"]): run["accuracy_after"] for run in results["runs"]}
    lines = ["| accuracy after, difference | per seed | mean ± SE |", "|---|---|---|"]
    for variant, baseline in PAIRS:
        seeds = sorted(seed for name, seed in after if name == variant and (baseline, seed) in after)
        if not seeds:
            continue
        diffs = [after[variant, seed] - after[baseline, seed] for seed in seeds]
        per_seed = ", ".join(f"{d:+.3f} (seed {seed})" for seed, d in zip(seeds, diffs))
        lines.append(f"| {variant} - {baseline} | {per_seed} | {mean_se(diffs, sign='+')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="--max_steps (default: the preset's 200)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "vllm-generation")
    parser.add_argument("--report", type=Path, help="print the table of a results JSON and exit")
    parser.add_argument("--collect", action="store_true", help="no new runs: gather the finished ones in --work")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, seed, steps, output_dir, result_path = args.one
        run_one(variant, int(seed), int(steps) or None, Path(output_dir), Path(result_path))
        return
    if args.report:
        results = json.loads(args.report.read_text())
        print(table(results) + "\n\n" + paired(results))
        return
    results = run_grid(args.variants, args.seeds, args.steps, args.work, args.collect)
    write_json_atomic(args.work / "results.json", results)
    print(f"\n{results['machine_at_start']['cpu']}, {results['machine_at_start']['cores']} cores, load average at "
          f"start {results['machine_at_start']['loadavg_1_5_15']}, at end {results['machine_at_end']['loadavg_1_5_15']}")
    print(table(results))
    print("\n" + paired(results))
    print(f"\nwritten: {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
