"""What machine a benchmark ran on: every JSON carries `describe()`, every printed table starts with `headline()`.

Reads /proc and package metadata only (no MindSpore or torch import), so a lean parent process can call it.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from mindone_idefics3.process import usable_cores


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(threads: int, device: str, reference: bool = False) -> dict:
    """CPU model, cores, RAM, load average, device, threads, versions (torch/transformers with a reference), date."""
    info = dict(cpu=cpu_model(), cores_usable=usable_cores(), cores_total=os.cpu_count(),
                ram_gb=round(meminfo_bytes("MemTotal") / 1e9, 1),
                ram_available_gb=round(meminfo_bytes("MemAvailable") / 1e9, 1),
                load_average_1min_at_start=os.getloadavg()[0], device=device, threads=threads,
                os=platform.platform(), python=platform.python_version(), numpy=np.__version__,
                mindspore=package_version("mindspore"), date=datetime.datetime.now().isoformat(timespec="seconds"))
    if reference:
        info.update(torch=package_version("torch"), transformers=package_version("transformers"))
    return info


def finish(machine: dict) -> None:
    """Record the load average at the end of the run."""
    machine["load_average_1min_at_end"] = os.getloadavg()[0]


def headline(machine: dict) -> str:
    """One line: CPU, cores, RAM, versions, date and load, e.g. for the top of a results table."""
    versions = f"MindSpore {machine['mindspore']}" + (
        f", torch {machine['torch']}, transformers {machine['transformers']}" if machine.get("torch") else "")
    end = machine.get("load_average_1min_at_end")
    return (f"Machine: {machine['cpu']}, {machine['cores_usable']} usable cores, {machine['ram_gb']} GB RAM; "
            f"{versions}; {machine['date']}; load average {machine['load_average_1min_at_start']:.2f} at start, "
            f"{'—' if end is None else f'{end:.2f}'} at end.")


def memory_bandwidth_gbs(threads: int) -> float:
    """Host memory read bandwidth: best of 5 sums of a 512 MB float64 array split over `threads` threads."""
    a = np.ones(64 * 2**20, np.float64)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best
