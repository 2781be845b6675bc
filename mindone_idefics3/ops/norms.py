"""Normalisation layers with Hugging Face parameter names (`weight`, `bias`)."""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer


class RMSNorm(nn.Cell):
    """Llama RMSNorm: normalise in fp32, cast back to the input dtype, then scale (transformers' order)."""

    def __init__(self, hidden_size: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("ones", (hidden_size,), dtype))
        self.eps = eps

    def construct(self, x: Tensor) -> Tensor:
        x32 = x.astype(ms.float32)
        variance = ops.mean(x32 * x32, -1, keep_dims=True)
        return self.weight * (x32 * ops.rsqrt(variance + self.eps)).astype(x.dtype)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, computed in fp32 and cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("ones", (hidden_size,), dtype))
        self.bias = Parameter(initializer("zeros", (hidden_size,), dtype))
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x: Tensor) -> Tensor:
        y, _, _ = self.norm(x.astype(ms.float32), self.weight.astype(ms.float32), self.bias.astype(ms.float32))
        return y.astype(x.dtype)
