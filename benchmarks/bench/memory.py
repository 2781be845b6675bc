"""Memory of this process: resident set now (VmRSS), resetting its peak (VmHWM, read with
mindone_idefics3.process.peak_rss_bytes); Ascend device memory. The peak of one call = reset_peak() before it,
peak_rss_bytes() after it."""
from __future__ import annotations

from typing import Optional

from mindone_idefics3.process import peak_rss_bytes


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_bytes() / 2**20


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
