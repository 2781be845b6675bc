"""Device choice and dtype policy: the one place that knows what each device can run.

MindSpore's CPU backend has no bf16 matmul/softmax/conv kernels and no flash attention (mindspore-notes.md), so
bf16 is refused on the CPU with a message that says what to use instead. Branch on the device, never probe
kernels with try/except: on the CPU a missing kernel can fail later, in an unrelated op.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Union

import mindspore as ms
from mindspore import log as ms_log

from .errors import Idefics3Error

DEVICES = ("Ascend", "CPU")
_DTYPES = {
    "fp32": ms.float32, "float32": ms.float32,
    "fp16": ms.float16, "float16": ms.float16,
    "bf16": ms.bfloat16, "bfloat16": ms.bfloat16,
}
SUPPORTED_DTYPES = {"Ascend": (ms.float32, ms.float16, ms.bfloat16), "CPU": (ms.float32, ms.float16)}

_chosen: Optional[str] = None


def ascend_available() -> bool:
    """Whether an Ascend NPU is usable — asked without MindSpore's "Device Ascend is not available" warnings, which
    it logs on every CPU-only machine (our own error says what to do when Ascend was asked for)."""
    logger = ms_log._get_logger()  # noqa: SLF001 - the only handle on MindSpore's Python logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return bool(ms.device_context.ascend.is_available())
    finally:
        logger.setLevel(level)


def select_device(name: Optional[str] = None) -> str:
    """Set MindSpore's device once: `name` ('Ascend' or 'CPU', any case), or Ascend when available, else CPU."""
    global _chosen
    if name is not None:
        canonical = {d.lower(): d for d in DEVICES}.get(str(name).lower())
        if canonical is None:
            raise Idefics3Error(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
        if canonical == "Ascend" and not ascend_available():
            raise Idefics3Error("device 'Ascend' was asked for but no Ascend NPU is usable here (MindSpore's Ascend "
                                "plugin or CANN is missing); use --device CPU")
    else:
        canonical = _chosen or ("Ascend" if ascend_available() else "CPU")
    if _chosen is not None and canonical != _chosen:
        raise Idefics3Error(f"this process already runs on {_chosen}; MindSpore cannot switch to {canonical} "
                            "afterwards: start a new process")
    if _chosen is None:
        if canonical == "Ascend" and os.environ.get("DEVICE_ID", "").isdigit():
            ms.set_device(canonical, int(os.environ["DEVICE_ID"]))  # msrun sets DEVICE_ID = the local rank
        else:
            ms.set_device(canonical)
        if canonical == "CPU":
            ms.device_context.cpu.op_tuning.threads_num(cpu_threads())
        _chosen = canonical
    return canonical


def cpu_threads() -> int:
    """Kernel threads for MindSpore's CPU backend: $MINDONE_CPU_THREADS, else the cores this process may use.

    Left at MindSpore's default, a 2-core machine here spent 1–4 ms on a 57k-element multiply instead of ~50 µs
    (the pool is sized for the host, not for the cores the process is allowed to run on).
    """
    env = os.environ.get("MINDONE_CPU_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise Idefics3Error(f"MINDONE_CPU_THREADS must be a positive integer, got {env!r}") from None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def synchronize(tensor) -> None:
    """Wait until `tensor` (and everything queued before it) is computed. On the CPU, MindSpore's
    runtime.synchronize() logs "CPU device is not supported", so one element is read back instead."""
    if is_ascend():
        ms.runtime.synchronize()
    else:
        tensor.reshape(-1)[:1].asnumpy()


def current_device() -> str:
    """The device in use (selecting the default one if nothing was chosen yet)."""
    return _chosen or select_device()


def is_ascend() -> bool:
    return current_device() == "Ascend"


def resolve_dtype(dtype: Union[str, "ms.dtype.Type", None], device: Optional[str] = None):
    """Turn 'bf16'/'fp16'/'fp32' (or a MindSpore dtype) into a MindSpore dtype the device can run.

    None means the device's default: bf16 on Ascend, fp32 on the CPU.
    """
    device = device or current_device()
    if dtype is None:
        return ms.bfloat16 if device == "Ascend" else ms.float32
    if isinstance(dtype, str):
        resolved = _DTYPES.get(dtype.lower())
        if resolved is None:
            raise Idefics3Error(f"unknown dtype {dtype!r}; choose one of bf16, fp16, fp32")
    elif dtype in (ms.float32, ms.float16, ms.bfloat16):
        resolved = dtype
    else:
        raise Idefics3Error(f"unsupported dtype {dtype!r}; choose one of bf16, fp16, fp32")
    if resolved not in SUPPORTED_DTYPES[device]:
        raise Idefics3Error(f"dtype {dtype_name(resolved)} is not supported by MindSpore's {device} backend "
                            "(no bf16 matmul/softmax kernels); use fp32/fp16 or an Ascend device")
    return resolved


def dtype_name(dtype) -> str:
    return {ms.float32: "fp32", ms.float16: "fp16", ms.bfloat16: "bf16"}.get(dtype, str(dtype))


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
