"""Which Ascend kernels the model uses, decided once per model build — and the one place they are imported from.

Two decisions, both read by the Cells' constructors and kept as Python constants (so a `mindspore.jit` graph sees
a constant and compiles one branch only):

- `fused_ops()`: `rms_norm`, `add_rms_norm`, `rotary_position_embedding`, `swiglu` — on an Ascend device, any
  dtype (the kernels take fp32/fp16/bf16).
- `attention_kernels(dtype)`: `flash_attention_score` (prefill) and `fused_infer_attention_score` (decode) — on an
  Ascend device for fp16/bf16 only (the kernels reject fp32; fp32 on Ascend runs the eager math).

`from_pretrained(attn_implementation=...)` (mindone.transformers' argument) overrides the attention decision for
one model build: "eager" is the eager math on any device, "flash_attention_2" the Ascend kernels — an error where
they cannot run (no NPU, fp32, MINDONE_ASCEND_KERNELS=0), never a silent fallback; unset, the device and dtype
decide as above. ("sdpa", transformers' default, is refused: MindSpore has no such backend, and mindone.transformers
reports it unavailable too.)

`MINDONE_ASCEND_KERNELS=0` turns both off on an Ascend device (eager math everywhere): for NPUs whose CANN lacks
these kernels (the flash kernels are documented for Atlas A2 products, i.e. 910B, not the first 910) and for
bisecting a numerical difference. The CPU always runs the eager math: these kernels are not registered there.

Everything else calls the kernels as `kernels.<name>(...)`, never `ops.<name>`: the tests replace these module
attributes with numpy references of the documented contracts (tests/kernel_reference.py) to run the Ascend branch
on the CPU. The signatures are the same in every supported MindSpore release, 2.7.0 to 2.10.x (compat.py says how
that was checked; its docs announce a new `rms_norm` signature and the removal of `rotary_position_embedding` for
later releases: a release that makes them gets its branch in compat.py).
"""
from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from typing import Iterator, Optional

import mindspore as ms
from mindspore.ops import (add_rms_norm, flash_attention_score, fused_infer_attention_score, rms_norm,  # noqa: F401
                           rotary_position_embedding, swiglu)

from ..device import is_ascend
from ..errors import Idefics3Error

ENV = "MINDONE_ASCEND_KERNELS"
ATTN_IMPLEMENTATIONS = ("eager", "flash_attention_2")
_HALF = (ms.float16, ms.bfloat16)  # the dtypes the attention kernels take
_requested: ContextVar[Optional[str]] = ContextVar("attn_implementation", default=None)


def _enabled() -> bool:
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on"):
        raise Idefics3Error(f"{ENV} must be 1 (use the Ascend kernels) or 0 (eager math), got {value!r}")
    return value in ("1", "true", "on") and is_ascend()


def fused_ops() -> bool:
    """Use Ascend's fused RMSNorm / add+RMSNorm / RoPE / SwiGLU (any dtype)."""
    return _enabled()


def attention_kernels(dtype) -> bool:
    """Use Ascend's flash / fused-infer attention kernels for a model in `dtype` (they take fp16 and bf16 only),
    unless an `attention_implementation` block decides."""
    requested = _requested.get()
    if requested is not None:
        return requested == "flash_attention_2"
    return _enabled() and dtype in _HALF


def check_attn_implementation(name: Optional[str], dtype) -> Optional[str]:
    """`name` if a model in `dtype` can use that attention on the current device (None: automatic); else one
    error saying why and what to pass instead."""
    if name is None:
        return None
    if name not in ATTN_IMPLEMENTATIONS:
        why = " (MindSpore has no SDPA backend)" if name == "sdpa" else ""
        raise Idefics3Error(f"unknown attn_implementation {name!r}{why}; choose 'eager' (matmul + fp32 softmax, any "
                            "device and dtype) or 'flash_attention_2' (Ascend's flash attention kernels, fp16/bf16), "
                            "or leave it unset to let the device and dtype decide")
    if name == "flash_attention_2":
        if not is_ascend():
            raise Idefics3Error("attn_implementation='flash_attention_2' needs an Ascend NPU: MindSpore's "
                                "flash_attention_score and fused_infer_attention_score are Ascend kernels; on the CPU "
                                "use 'eager' or leave it unset")
        if dtype not in _HALF:
            raise Idefics3Error("attn_implementation='flash_attention_2' takes fp16 or bf16 weights (the kernels reject "
                                "fp32); pass mindspore_dtype=ms.bfloat16, or attn_implementation='eager' for fp32")
        if not _enabled():
            raise Idefics3Error(f"attn_implementation='flash_attention_2' contradicts {ENV}=0, which turns the Ascend "
                                f"kernels off; unset {ENV} or pass attn_implementation='eager'")
    return name


@contextlib.contextmanager
def attention_implementation(name: Optional[str], dtype) -> Iterator[None]:
    """Build models inside this block with attention `name` ('eager' | 'flash_attention_2' | None = automatic),
    checked first for `dtype` on the current device (`check_attn_implementation`)."""
    token = _requested.set(check_attn_implementation(name, dtype))
    try:
        yield
    finally:
        _requested.reset(token)
