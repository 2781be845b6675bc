"""Memory of this process: resident set now (VmRSS), its peak (VmHWM) and resetting that peak; Ascend device
memory. The peak of one call = reset_peak() before it, peak_rss_mb() after it."""
from __future__ import annotations

import resource
from typing import Optional


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else _max_rss_mb()


def peak_rss_mb() -> float:
    """The process's peak resident memory since it started or since the last reset_peak()."""
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else _max_rss_mb()


def reset_peak(device: str = "CPU") -> bool:
    """Reset VmHWM to the current RSS (Linux: `echo 5 > /proc/self/clear_refs`) and, on Ascend, the device's peak
    statistics. False when the host peak cannot be reset (it then counts from the process start)."""
    if device == "Ascend":
        import mindspore as ms

        ms.runtime.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_peak_mb(device: str) -> Optional[float]:
    """Peak device memory since reset_peak() (Ascend), None on the CPU."""
    if device != "Ascend":
        return None
    import mindspore as ms

    return ms.runtime.max_memory_allocated() / 2**20
