"""This process and its neighbours on the host: the cores it may run on, its peak memory, and whether another
process (a converter's partial output, an msrun rank) still runs."""
from __future__ import annotations

import os
import resource
import sys


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (a container or `taskset` may allow fewer than the
    host has), else the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes.

    Linux: VmHWM (which `echo 5 > /proc/self/clear_refs` resets). Not ru_maxrss, which after fork + exec still
    holds the parent's peak (a command started from a big Python process would report that process's memory).
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def is_alive(pid: int) -> bool:
    """True while `pid` runs; an exited child its parent has not reaped yet (a zombie) counts as ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: kill(pid, 0) is all there is to know
