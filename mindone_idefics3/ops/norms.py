"""Normalisation layers with Hugging Face parameter names (`weight`, `bias`).

RMSNorm uses Ascend's fused `rms_norm` / `add_rms_norm` where ops/kernels.py says so. Their documented formula is
x / rms(x) · weight with no rounding in between, where transformers rounds x / rms(x) to the input dtype before
scaling: equal in fp32, in fp16/bf16 they may differ by a rounding step (tests/ascend's tolerances cover it).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from . import kernels


def rms_norm(x: Tensor, weight: Tensor, eps: float, fused: bool = False) -> Tensor:
    """Llama RMSNorm: normalise in fp32, cast back to the input dtype, then scale (transformers' order).
    fused: Ascend's `rms_norm` kernel."""
    if fused:
        return kernels.rms_norm(x, weight, eps)[0]
    x32 = x.astype(ms.float32)
    variance = ops.mean(x32 * x32, -1, keep_dims=True)
    return weight * (x32 * ops.rsqrt(variance + eps)).astype(x.dtype)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float, fused: bool = False):
    """The residual sum and its norm: (x + delta, rms_norm(x + delta)), one `add_rms_norm` kernel when fused."""
    if fused:
        normed, _, total = kernels.add_rms_norm(x, delta, weight, eps)
        return total, normed
    total = x + delta
    return total, rms_norm(total, weight, eps)


class RMSNorm(nn.Cell):
    """`rms_norm` with its parameter (eager, or Ascend's fused kernel)."""

    def __init__(self, hidden_size: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("ones", (hidden_size,), dtype))
        self.eps = eps
        self.fused = kernels.fused_ops()

    def construct(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.fused)

    def add_and_norm(self, x: Tensor, delta: Tensor):
        """(x + delta, norm(x + delta)), one `add_rms_norm` kernel on Ascend."""
        return add_rms_norm(x, delta, self.weight, self.eps, self.fused)


def layer_norm_op(eps: float):
    """The LayerNorm primitive over the last axis (ops.layer_norm is Ascend-only in 2.10)."""
    return ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, norm) -> Tensor:
    """LayerNorm over the last axis, computed in fp32 and cast back to the input dtype; norm: `layer_norm_op`."""
    y, _, _ = norm(x.astype(ms.float32), weight.astype(ms.float32), bias.astype(ms.float32))
    return y.astype(x.dtype)


class LayerNorm(nn.Cell):
    """`layer_norm` with its parameters."""

    def __init__(self, hidden_size: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("ones", (hidden_size,), dtype))
        self.bias = Parameter(initializer("zeros", (hidden_size,), dtype))
        self.norm = layer_norm_op(eps)

    def construct(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight, self.bias, self.norm)
