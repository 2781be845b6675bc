"""A fresh process per measurement.

- `run_child(script, job)`: a script re-runs itself as `script --child JOB.json` (MindSpore keeps every graph it
  compiled, so one process for everything would grow by GBs, and a peak RSS is only clean in a fresh process);
  `script_main` hands the child its job, which saves its results with `save_results` after each row, so a crash
  keeps what was measured. `run_jobs(script, jobs, label)`: run_child over a list of jobs, failures reported and
  skipped.
- `run_measured(cmd)`: a command's wall time (spawn to exit) and peak RSS, read with os.wait4 by a lean launcher
  (a child's ru_maxrss starts from the RSS of the process that forked it: a benchmark holding models would
  inflate it).
- `evict(directory)`: drop files from the page cache, so the next reader starts cold.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .report import write_json

CHILD_FLAG = "--child"


def run_child(script: Path, job: dict) -> Tuple[dict, Optional[str]]:
    """Run `python script --child JOB.json`; returns (the results it saved, None or why it failed)."""
    with tempfile.TemporaryDirectory() as d:
        job_file, out = Path(d) / "job.json", Path(d) / "results.json"
        job_file.write_text(json.dumps(dict(job, out=str(out))))
        code = subprocess.call([sys.executable, str(script), CHILD_FLAG, str(job_file)])
        results = json.loads(out.read_text()) if out.exists() else {}
    if code == 0:
        return results, None
    why = "killed by the system (out of memory?)" if code == -9 else f"exit code {code}, see stderr"
    return results, f"the measuring process failed: {why}"


def run_jobs(script: Path, jobs: List[dict], label: Callable[[dict], str],
             after_each: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """`run_child` for each job in turn (progress and failures on stderr, a failed job skipped); returns the
    results of those that succeeded. after_each(results so far) runs after every success (e.g. to save them)."""
    rows: List[dict] = []
    for job in jobs:
        print(f"{label(job)} ...", file=sys.stderr, flush=True)
        result, failed = run_child(script, job)
        if failed:
            print(f"{label(job)}: {failed}", file=sys.stderr)
            continue
        rows.append(result)
        if after_each is not None:
            after_each(rows)
    return rows


def script_main(argv: Optional[List[str]], parent: Callable[[List[str]], int],
                child: Optional[Callable[[dict], int]] = None) -> int:
    """A benchmark script's main: `script --child JOB.json` runs child(job), anything else parent(argv). A refusal
    (bench.Refused) or a user error (Idefics3Error) prints one line on stderr and returns 2."""
    from mindone_idefics3.errors import Idefics3Error

    from . import Refused

    argv = sys.argv[1:] if argv is None else argv
    try:
        if child is not None and argv[:1] == [CHILD_FLAG]:
            return child(json.loads(Path(argv[1]).read_text()))
        return parent(argv)
    except (Refused, Idefics3Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def save_results(job: dict, results: dict) -> None:
    write_json(Path(job["out"]), results)


# Runs argv[2:], then writes its exit code, wall time and peak RSS (bytes) as JSON to argv[1].
LAUNCHER = """import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024}, f)
"""


@dataclass
class Measured:
    rc: int
    wall_s: float  # from spawning the command to its exit
    peak_rss_bytes: int  # the command's own peak resident memory (ru_maxrss)
    stdout: str
    stderr: str


def run_measured(cmd: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> Measured:
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "rusage.json"
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(result), *cmd], capture_output=True, text=True,
                              env=env, cwd=cwd)
        if not result.exists():
            raise RuntimeError(f"the launcher failed ({proc.returncode}): {proc.stderr[-2000:]}")
        usage = json.loads(result.read_text())
    return Measured(usage["rc"], usage["wall_s"], usage["peak_rss_bytes"], proc.stdout, proc.stderr)


def evict(directory: Path) -> None:
    """Drop a directory's files from the page cache (no root needed for files we can open)."""
    for f in Path(directory).iterdir():
        if not f.is_file():
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
