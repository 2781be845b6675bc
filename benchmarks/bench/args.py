"""Command-line pieces the benchmark scripts share."""
from __future__ import annotations

import argparse
import os
from typing import List

from mindone_idefics3.process import usable_cores

from . import CACHE
from .presets import PRESETS


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--model | --preset (default tiny), --work-dir, --ram-budget-gb."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory in the Hugging Face layout (or a hub repo id)")
    src.add_argument("--preset", choices=list(PRESETS),
                     help="random weights of these shapes with processor files, written once under --work-dir "
                          "(default: tiny)")
    p.add_argument("--work-dir", default=str(CACHE),
                   help="where preset weights (and test images) are written (default: benchmarks/.cache)")
    p.add_argument("--ram-budget-gb", type=float, default=None,
                   help="memory the run may use; a model whose weights x 2.5 exceed it is refused before anything is "
                        "written or loaded (default: MemAvailable of /proc/meminfo)")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both sides: MindSpore's ms.device_context.cpu.op_tuning.threads_num and "
                        "torch.set_num_threads (default: $MINDONE_CPU_THREADS, else the cores this process may use)")


def checked(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The default preset, and positive --threads / --repeats where the script has them."""
    if args.model is None and args.preset is None:
        args.preset = "tiny"
    for name in ("threads", "repeats"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def use_threads(threads) -> int:
    """Export the thread count to children ($MINDONE_CPU_THREADS, read by mindone_idefics3.device) and return it:
    `threads`, else $MINDONE_CPU_THREADS, else the cores this process may use."""
    if threads:
        os.environ["MINDONE_CPU_THREADS"] = str(threads)
    n = int(os.environ.get("MINDONE_CPU_THREADS") or usable_cores())
    os.environ["MINDONE_CPU_THREADS"] = str(n)
    return n


def choices(text: str, allowed, flag: str) -> List[str]:
    """A comma list restricted to `allowed` (duplicates dropped); ValueError names the bad values."""
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{flag}: {', '.join(bad) or 'nothing given'}; choose from {','.join(allowed)}")
    return list(dict.fromkeys(values))


def positive_ints(text: str, flag: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} takes positive integers, got {text!r}")
    return list(dict.fromkeys(values))
