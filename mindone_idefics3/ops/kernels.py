"""Which Ascend kernels the model uses, decided once per model build — and the one place they are imported from.

Two decisions, both read by the Cells' constructors and kept as Python constants (so a `mindspore.jit` graph sees
a constant and compiles one branch only):

- `fused_ops()`: `rms_norm`, `add_rms_norm`, `rotary_position_embedding`, `swiglu` — on an Ascend device, any
  dtype (the kernels take fp32/fp16/bf16).
- `attention_kernels(dtype)`: `flash_attention_score` (prefill) and `fused_infer_attention_score` (decode) — on an
  Ascend device for fp16/bf16 only (the kernels reject fp32; fp32 on Ascend runs the eager math).

`MINDONE_ASCEND_KERNELS=0` turns both off on an Ascend device (eager math everywhere): for NPUs whose CANN lacks
these kernels (the flash kernels are documented for Atlas A2 products, i.e. 910B, not the first 910) and for
bisecting a numerical difference. The CPU always runs the eager math: these kernels are not registered there.

Everything else calls the kernels as `kernels.<name>(...)`, never `ops.<name>`: the tests replace these module
attributes with numpy references of the documented contracts (tests/kernel_reference.py) to run the Ascend branch
on the CPU. The signatures are MindSpore 2.10's (its docs announce a new `rms_norm` signature and the removal of
`rotary_position_embedding` for later versions: re-check this file when upgrading).
"""
from __future__ import annotations

import os

import mindspore as ms
from mindspore.ops import (add_rms_norm, flash_attention_score, fused_infer_attention_score, rms_norm,  # noqa: F401
                           rotary_position_embedding, swiglu)

from ..device import is_ascend
from ..errors import Idefics3Error

ENV = "MINDONE_ASCEND_KERNELS"


def _enabled() -> bool:
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise Idefics3Error(f"{ENV} must be 1 (use the Ascend kernels) or 0 (eager math), got {value!r}")
    return value in ("1", "true", "on") and is_ascend()


def fused_ops() -> bool:
    """Use Ascend's fused RMSNorm / add+RMSNorm / RoPE / SwiGLU (any dtype)."""
    return _enabled()


def attention_kernels(dtype) -> bool:
    """Use Ascend's flash / fused-infer attention kernels for a model in `dtype` (they take fp16 and bf16 only)."""
    return _enabled() and dtype in (ms.float16, ms.bfloat16)
