"""SigLIP's activation, gelu with the tanh approximation (`gelu_pytorch_tanh`), by device.

On the CPU, MindSpore 2.10's GeLU kernel (`ops.gelu(approximate="tanh")`) is many times slower than the same
function written as x · sigmoid(2·√(2/π)·(x + 0.044715·x³)) — equal to 0.5·x·(1 + tanh(…)) since
1 + tanh(z) = 2·sigmoid(2z) — and its Tanh kernel is an approximation; the sigmoid form is as close to torch as
MindSpore's own kernel (figures: docs/performance.md §11). On Ascend the fused GeLU kernel is used.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Tensor, ops

_TWO_SQRT_2_OVER_PI = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: Tensor, fused: bool = False) -> Tensor:
    """gelu(x, approximate="tanh"); `fused`: MindSpore's GeLU kernel (Ascend), else the sigmoid form in fp32."""
    if fused:
        return ops.gelu(x, approximate="tanh")
    x32 = x.astype(ms.float32)
    return (x32 * ops.sigmoid(_TWO_SQRT_2_OVER_PI * (x32 + 0.044715 * (x32 * x32 * x32)))).astype(x.dtype)
