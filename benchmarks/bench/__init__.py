"""What the benchmark scripts share (importing this package puts the checkout first on sys.path, so the scripts
measure this tree's mindone_idefics3 without installing it):

    args.py      command-line pieces every script takes (checkpoint or preset, threads, device, output)
    presets.py   random-weight presets with processor files, written once under --work-dir; memory refusals
    images.py    the deterministic test pictures (a 640×480 photo, 1024×768, 300×900) written next to them
    machine.py   what machine ran it (CPU model, cores, RAM, load, versions) and its memory bandwidth
    memory.py    this process's RSS and its peak (resettable), device memory on Ascend
    processes.py a fresh process per measurement: jobs for `script --child`, and commands with their own rusage
    runs.py      one timed generate() call on either side (ours, transformers) with a per-token clock
    kernels.py   facts of our compiled decode step: attention backend, bytes read, kernels launched
    report.py    markdown tables, atomic JSON files, the optional matplotlib import
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))


class Refused(Exception):
    """The run cannot go ahead (memory, disk, arguments); the message says why and what to do."""
