"""Updates-per-rollout study: how many optimizer updates per rollout GRPO and GMPO sustain at a fixed generation
budget, on the long-answer `reverse` task (protocol: benchmarks/reuse/protocol.py and docs/results.md).

Each run is a subprocess writing `OUT/<objective>__u<U>__lr<lr>__seed<s>.json` when it finishes; a rerun skips the
files that exist, so an interrupted study resumes where it stopped. Then `python -m benchmarks.reuse.report`.

    python -m benchmarks.reuse                  # full protocol (per-run JSON in runs/reuse/)
    python -m benchmarks.reuse --quick          # smoke test: 2 rollouts, lr 1e-5, U in {1, 8, 32}, 1 seed, 128 prompts
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.pool import run_pool
from benchmarks.reuse import protocol
from benchmarks.reuse.runs import initial_scores, run_name, run_one

QUICK = {"updates": {1e-5: (1, 8, 32)}, "seeds": {1e-5: (0,)}, "rollouts": 2, "eval_at": (1, 2), "eval_size": 128,
         "mismatch": (("gmpo-e0.4-bf16", 8, 1e-5, (0,)),)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test (a few minutes), separate output dir")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one subprocess each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", type=Path, help="directory of the per-run JSON files (default runs/reuse[-quick])")
    p.add_argument("--only", nargs=4, metavar=("OBJECTIVE", "U", "LR", "SEED"), help="run one condition here")
    args = p.parse_args(argv)
    args.out = args.out or Path("runs/reuse-quick" if args.quick else "runs/reuse")
    return args


def machine_line(args) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (f"{os.cpu_count()} cores of {cpu}, CPU only, {args.jobs} runs at a time with {args.threads} torch "
            f"thread(s) each, started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main(argv=None):
    args = parse_args(argv)
    q = QUICK if args.quick else {}
    sizes = {"rollouts": q.get("rollouts", protocol.ROLLOUTS), "eval_at": q.get("eval_at", protocol.EVAL_ROLLOUTS),
             "eval_size": q.get("eval_size", 512)}
    if args.only:
        objective, u, lr, seed = args.only[0], int(args.only[1]), float(args.only[2]), int(args.only[3])
        path = args.out / f"{run_name(objective, u, lr, seed)}.json"
        result = run_one(objective, u, lr, seed, path, args.threads, **sizes)
        print(f"{path.name}: final {result['evals'][-1]} train {result['train_s']}s", flush=True)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    initial = args.out / "initial.json"
    if not initial.exists():
        initial.write_text(json.dumps({"scores": initial_scores(args.threads, sizes["eval_size"]), **sizes}))
    machine = args.out / "machine.txt"
    if not machine.exists():
        machine.write_text(machine_line(args))
    todo = [c for c in protocol.grid(updates=q.get("updates", protocol.UPDATES_AT), seeds=q.get("seeds", protocol.SEEDS),
                                     mismatch=q.get("mismatch", protocol.MISMATCH))
            if not (args.out / f"{run_name(*c)}.json").exists()]
    print(f"{len(todo)} runs to do in {args.out} ({args.jobs} at a time; load {os.getloadavg()})", flush=True)
    jobs = [(run_name(*cond), [sys.executable, "-m", "benchmarks.reuse", "--only", *map(str, cond), "--out",
                               str(args.out), "--threads", str(args.threads)] + (["--quick"] if args.quick else []))
            for cond in todo]
    run_pool(jobs, args.out, args.jobs, args.threads, start)


if __name__ == "__main__":
    main()
