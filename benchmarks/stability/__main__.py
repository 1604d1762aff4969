"""Stability study: GRPO vs GMPO and GMPO's ablations, off-policy, on the built-in tasks.

For each task (addition: 2-3 answer tokens; reverse: 32-40), each variant (`runs.VARIANTS`) and each seed, train
from the shipped policy and record per optimizer step the token log-ratio extremes and the step's lag, clip
fractions, entropy, gradient norm and KL to the initial policy; then evaluate held-out greedy accuracy. Each run is
a subprocess writing `OUT/<task>__<variant>__seed<s>.json` when it finishes; a rerun skips the files that exist, so
an interrupted study resumes where it stopped. Then `python -m benchmarks.stability.report` builds docs/results.md.

    python -m benchmarks.stability                      # full study: 2 tasks x 10 variants x 3 seeds
    python -m benchmarks.stability --quick              # 8 steps, 1 seed, separate output dir: a smoke test
    python -m benchmarks.stability --tasks reverse --seeds 0 1 2 3 4
"""

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.pool import run_pool
from benchmarks.stability.runs import TASKS, VARIANTS, initial_scores, run_name, run_one


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: per task, see runs.TASKS)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one subprocess each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", type=Path, help="directory of the per-run JSON files (default runs/stability[-quick])")
    p.add_argument("--quick", action="store_true", help="8 steps per run, seed 0 only (a few minutes)")
    p.add_argument("--worker", nargs=3, metavar=("TASK", "VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = [0]
    if args.out is None:
        args.out = Path("runs/stability-quick" if args.quick else "runs/stability")
    return args


def steps_for(task: str, args) -> int:
    return args.steps or TASKS[task]["quick_steps" if args.quick else "steps"]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        task, variant, seed = args.worker
        path = args.out / f"{run_name(task, variant, int(seed))}.json"
        result = run_one(task, variant, int(seed), steps_for(task, args), path, args.threads)
        print(f"{path.name}: {result['scores']} train {result['train_s']}s", flush=True)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for task in args.tasks:
        path = args.out / f"initial__{task}.json"
        if not path.exists():
            path.write_text(json.dumps({"task": task, "scores": initial_scores(task, args.threads)}))
    # Seed-major order: a study stopped early has every variant at the first seeds rather than some at all seeds.
    todo = [(t, v, s) for s in args.seeds for t in args.tasks for v in args.variants
            if not (args.out / f"{run_name(t, v, s)}.json").exists()]
    print(f"{len(todo)} runs to do in {args.out} ({args.jobs} at a time)", flush=True)
    jobs = []
    for task, variant, seed in todo:
        cmd = [sys.executable, "-m", "benchmarks.stability", "--worker", task, variant, str(seed),
               "--out", str(args.out), "--threads", str(args.threads)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--steps", str(args.steps)] if args.steps else []
        jobs.append((run_name(task, variant, seed), cmd))
    run_pool(jobs, args.out, args.jobs, args.threads, start)


if __name__ == "__main__":
    main()
