"""Small building blocks shared by the vision tower and the decoder, with Hugging Face parameter names."""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer


class Linear(nn.Cell):
    """y = x @ weight.T (+ bias); weight (out, in) as in torch."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (out_features, in_features), dtype))
        self.bias = Parameter(initializer("zeros", (out_features,), dtype)) if bias else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        flat = x.ndim == 2  # (tokens, in): the decoder's residual stream, no reshape kernels around the matmul
        y = self.matmul(x if flat else x.reshape(-1, x.shape[-1]), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y if flat else y.reshape(*x.shape[:-1], -1)


class Embedding(nn.Cell):
    """Lookup table; `weight` (num, dim)."""

    def __init__(self, num: int, dim: int, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (num, dim), dtype))

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.weight, ids, 0)
