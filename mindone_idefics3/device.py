"""Device choice, dtype policy and MindSpore's CPU threads: the one place that knows what each device can run.

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
from mindspore._c_expression import DeviceManagerConf, RuntimeConf

from .errors import Idefics3Error
from .process import usable_cores

DEVICES = ("Ascend", "CPU")
_DTYPES = {
    "fp32": ms.float32, "float32": ms.float32,
    "fp16": ms.float16, "float16": ms.float16,
    "bf16": ms.bfloat16, "bfloat16": ms.bfloat16,
}
SUPPORTED_DTYPES = {"Ascend": (ms.float32, ms.float16, ms.bfloat16), "CPU": (ms.float32, ms.float16)}

_chosen: Optional[str] = None  # MindSpore's device, once known (it cannot change within a process)
_threads_we_set: Optional[int] = None  # the CPU kernel threads this package set, if it set them


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
    """The device MindSpore runs on, set here only if nobody set it before; returns 'Ascend' or 'CPU'.

    name: 'Ascend' or 'CPU' (any case), or None for the device already in use, else Ascend when available, else
    CPU. MindSpore's device and CPU threads can be set once per process, and its user may have set them first
    (`ms.set_device`, `ms.device_context.cpu.op_tuning.threads_num`, or by running an op): what is set is kept,
    and only an explicit request that contradicts it is an error.
    """
    global _chosen
    wanted = _canonical(name) if name is not None else None
    current = _chosen or _device_in_use()
    if current is not None:
        if current not in DEVICES:
            raise Idefics3Error(f"MindSpore runs on {current} in this process, which mindone_idefics3 does not "
                                f"support; use one of {', '.join(DEVICES)} (set it before any MindSpore op runs)")
        if wanted is not None and wanted != current:
            raise Idefics3Error(f"device {wanted!r} was asked for, but MindSpore already runs on {current} in this "
                                f"process and cannot switch; pass device={current!r} (or none), or start a new "
                                "process")
    else:
        current = wanted or ("Ascend" if ascend_available() else "CPU")
        if current == "Ascend" and not ascend_available():
            raise Idefics3Error("device 'Ascend' was asked for but no Ascend NPU is usable here (MindSpore's Ascend "
                                "plugin or CANN is missing); use --device CPU")
        if current == "Ascend" and os.environ.get("DEVICE_ID", "").isdigit():
            ms.set_device(current, int(os.environ["DEVICE_ID"]))  # msrun sets DEVICE_ID = the local rank
        else:
            ms.set_device(current)
    _chosen = current
    if current == "CPU":
        _set_cpu_threads()
    return current


def _canonical(name: str) -> str:
    canonical = {d.lower(): d for d in DEVICES}.get(str(name).lower())
    if canonical is None:
        raise Idefics3Error(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    return canonical


def _device_in_use() -> Optional[str]:
    """The device MindSpore was set to (`ms.set_device`) or already runs ops on; None while neither happened.

    MindSpore 2.10 has no public "was it set" getter (`ms.get_current_device()` answers CPU before anything is
    set): this is the check its own `set_device` makes before refusing a change.
    """
    if DeviceManagerConf.get_instance().is_device_enable():
        return ms.get_current_device().device_target
    target = ms.get_context("device_target")
    return target if ms.hal.is_initialized(target) else None


def _set_cpu_threads() -> None:
    """Set MindSpore's CPU kernel threads to `cpu_threads()` unless they are set already (by us or by the user).

    An explicit $MINDONE_CPU_THREADS that cannot be applied is an error: MindSpore does not tell how many threads
    someone else set, so it cannot be checked against the request.
    """
    global _threads_we_set
    requested = os.environ.get("MINDONE_CPU_THREADS")
    if not RuntimeConf.get_instance().is_op_threads_num_configured():  # the check threads_num itself makes
        _threads_we_set = cpu_threads()
        ms.device_context.cpu.op_tuning.threads_num(_threads_we_set)
    elif requested and (_threads_we_set is None or cpu_threads() != _threads_we_set):
        already = f"to {_threads_we_set} by mindone_idefics3" if _threads_we_set else "by other code in this process"
        raise Idefics3Error(f"MINDONE_CPU_THREADS={requested} cannot be applied: MindSpore's CPU threads were "
                            f"already set {already} (ms.device_context.cpu.op_tuning.threads_num can be called "
                            "once per process); unset MINDONE_CPU_THREADS to keep that setting")


def cpu_threads() -> int:
    """Kernel threads for MindSpore's CPU backend: $MINDONE_CPU_THREADS, else the cores this process may use.

    Not MindSpore's default: its pool is sized for the host, not for the cores the process is allowed to run on,
    and more threads than cores make even small ops many times slower.
    """
    env = os.environ.get("MINDONE_CPU_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise Idefics3Error(f"MINDONE_CPU_THREADS must be a positive integer, got {env!r}") from None
    return usable_cores()


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


def dtype_argument(dtype, mindspore_dtype):
    """The one dtype of `dtype=` and `mindspore_dtype=` (mindone.transformers' name for it), for `resolve_dtype`;
    both given and different is an error."""
    if mindspore_dtype is None:
        return dtype
    if dtype is not None and _as_ms_dtype(dtype) != _as_ms_dtype(mindspore_dtype):
        raise Idefics3Error(f"dtype={dtype!r} and mindspore_dtype={mindspore_dtype!r} disagree; pass one of them "
                            "(mindspore_dtype is mindone.transformers' name for dtype)")
    return mindspore_dtype


def _as_ms_dtype(dtype):
    return _DTYPES.get(dtype.lower(), dtype) if isinstance(dtype, str) else dtype


def dtype_name(dtype) -> str:
    return {ms.float32: "fp32", ms.float16: "fp16", ms.bfloat16: "bf16"}.get(dtype, str(dtype))
