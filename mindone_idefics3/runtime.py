"""How the model runs on MindSpore's runtime: Cells compiled as graphs (`jit_cell`), weights passed as graph inputs
(`as_graph_inputs`), waiting for results (`synchronize`), and keeping MindSpore's spinning pipeline thread out of
the way of compiled graphs on the CPU (`idle_pipeline`).

What the device can run (device choice, dtypes, CPU threads) is device.py's.
"""
from __future__ import annotations

import contextlib
import os

import mindspore as ms

from .device import current_device, is_ascend
from .errors import Idefics3Error

# MindSpore 2.10's PyNative pipeline thread. Between ops it waits for work by spinning on sched_yield, and on the CPU
# it spins beside the kernel threads of a compiled graph it waits for, taking a good part of a core from them (most
# of it in the kernel) and slowing the graph down.
SPINNING_THREADS = ("frontend_queue",)
_IDLE_ENV = "MINDONE_IDLE_PIPELINE"
_spinning: list = []  # thread ids found by the last scan
_idle_depth = 0


def jit_cell(cell):
    """`cell` as a `mindspore.jit` function (capture_mode='ast': in-place Parameter writes persist), compiled once
    per input shape. Each graph is the Cell's own: a shared Python wrapper made MindSpore warn that "the same
    function" was compiled again for every new graph."""
    return ms.jit(cell, capture_mode="ast")


def as_graph_inputs(params) -> list:
    """Parameters as plain Tensors sharing their data (None stays None), to pass as inputs of one compiled graph
    that several layers share: given Parameters, MindSpore compiles (and keeps the memory of) one graph per
    Parameter set. In-place writes of the graph (a KV cache's scatter) still reach the Parameter."""
    return [None if p is None else ms.Tensor(p) for p in params]


def synchronize(tensor) -> None:
    """Wait until `tensor` (and everything queued before it) is computed. On the CPU, MindSpore's
    runtime.synchronize() logs "CPU device is not supported", so one element is read back instead."""
    if is_ascend():
        ms.runtime.synchronize()
    else:
        tensor.reshape(-1)[:1].asnumpy()


@contextlib.contextmanager
def idle_pipeline():
    """While a loop of compiled-graph calls runs on the CPU: MindSpore's spinning pipeline thread
    (`SPINNING_THREADS`) under the SCHED_IDLE policy, so it runs only when a core has nothing else to do, and back
    to the policy it had afterwards. Only around compiled graphs: PyNative ops run *on* that thread, so an idle
    thread slows them down. Linux only; a no-op on Ascend (the host cores feed the NPU there), when nested, and
    with $MINDONE_IDLE_PIPELINE=0."""
    global _spinning, _idle_depth
    if _idle_depth or not _idle_enabled():
        _idle_depth += 1
        try:
            yield
        finally:
            _idle_depth -= 1
        return
    _idle_depth += 1
    previous = _set_idle(_spinning)
    if len(previous) != len(_spinning) or not _spinning:  # first use, or the threads changed: look again
        _restore(previous)
        _spinning = _scan_spinning_threads()
        previous = _set_idle(_spinning)
    try:
        yield
    finally:
        _restore(previous)
        _idle_depth -= 1


def _idle_enabled() -> bool:
    value = os.environ.get(_IDLE_ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise Idefics3Error(f"{_IDLE_ENV} must be 1 (idle MindSpore's spinning pipeline thread while compiled "
                            f"graphs run) or 0, got {value!r}")
    return value in ("1", "true", "on") and current_device() == "CPU" and hasattr(os, "sched_setscheduler")


def _scan_spinning_threads() -> list:
    found = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() in SPINNING_THREADS:
                    found.append(int(tid))
        except (OSError, ValueError):  # the thread ended meanwhile
            continue
    return found


def _set_idle(tids: list) -> dict:
    """SCHED_IDLE for the threads; returns {tid: the policy it had} for those that took it (a thread may have
    ended, or the host may refuse the policy)."""
    done = {}
    for tid in tids:
        try:
            before = os.sched_getscheduler(tid)
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            done[tid] = before
        except OSError:
            continue
    return done


def _restore(previous: dict) -> None:
    for tid, policy in previous.items():
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError:  # the thread ended meanwhile
            continue
