"""Run a study's per-run subprocesses a few at a time, each logging to OUT/<name>.log."""

import json
import subprocess
import time
from pathlib import Path


def run_pool(jobs: list[tuple[str, list[str]]], out: Path, parallel: int, threads: int, start: float) -> list[str]:
    """Run every (name, command) with at most `parallel` at once; print each end, write OUT/study_wall_s.json with the
    wall time since `start` (time.time() when the study began).

    Returns the names of the runs that failed (non-zero exit status).
    """
    todo, running, failed = list(jobs), [], []
    while todo or running:
        while todo and len(running) < parallel:
            name, cmd = todo.pop(0)
            log = open(out / f"{name}.log", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, name))
        time.sleep(1)
        for entry in list(running):
            proc, log, name = entry
            if proc.poll() is not None:
                running.remove(entry)
                log.close()
                failed += [name] if proc.returncode else []
                status = "done" if proc.returncode == 0 else f"FAILED (rc {proc.returncode}, see {name}.log)"
                print(f"[{time.time() - start:7.0f}s] {name} {status}", flush=True)
    wall = time.time() - start
    (out / "study_wall_s.json").write_text(json.dumps({"wall_s": round(wall), "jobs": parallel, "threads": threads,
                                                        "failed": failed}))
    print(f"study wall time {wall:.0f}s; failed: {failed or 'none'}", flush=True)
    return failed
