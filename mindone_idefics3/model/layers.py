"""Small building blocks shared by the vision tower and the decoder, with Hugging Face parameter names."""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..device import is_ascend


def weights_in_out() -> bool:
    """Whether the decoder's projections store their weights (in, out), the transpose of torch's (out, in).

    On the CPU, MindSpore 2.10's fp32 matmul of one token reads an (in, out) weight faster than an (out, in) one
    through transpose_b (2-core Xeon, median of 20: vocab 49280 × 576 lm_head 6.5 vs 8.8 ms, qkv 960 × 576
    0.14 vs 0.18 ms, the MLP's equal); Ascend's MatMul takes either layout natively, so there they stay as in
    the checkpoint. The loader transposes once (weights.load_weights); checkpoints and converted files always
    hold torch's layout.
    """
    return not is_ascend()


class Linear(nn.Cell):
    """y = x @ weight.T (+ bias); weight (out, in) as in torch, or (in, out) with `in_out` (y = x @ weight)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=ms.float32, in_out: bool = False):
        super().__init__()
        self.in_out = in_out
        shape = (in_features, out_features) if in_out else (out_features, in_features)
        self.weight = Parameter(initializer("zeros", shape, dtype))
        self.bias = Parameter(initializer("zeros", (out_features,), dtype)) if bias else None
        self.matmul = ops.MatMul(transpose_b=not in_out)

    def construct(self, x: Tensor) -> Tensor:
        if x.ndim == 2:  # (tokens, in): the decoder's residual stream, no reshape kernels around the matmul
            y = self.matmul(x, self.weight)
            return y if self.bias is None else y + self.bias
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)


class Embedding(nn.Cell):
    """Lookup table; `weight` (num, dim)."""

    def __init__(self, num: int, dim: int, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (num, dim), dtype))

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.weight, ids, 0)
