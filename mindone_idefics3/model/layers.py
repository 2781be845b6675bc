"""Small building blocks shared by the vision tower and the decoder, with Hugging Face parameter names."""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..weights import Parts

_matmul_t = ops.MatMul(transpose_b=True)


def linear(x: Tensor, weight, bias: Optional[Tensor] = None) -> Tensor:
    """x @ weight.T (+ bias); weight (out, in) as in torch. A 2-D x (tokens, in) — the residual streams — needs
    no reshape kernels around the matmul.

    weight may also be `(weight, adapter)` (`Linear.weight_arg` while an adapter is attached, e.g. LoRA in
    model/lora.py): the adapter's output `adapter(x)` (..., out) is added, the frozen weight is used as is."""
    if isinstance(weight, tuple):
        base, adapter = weight
        return linear(x, base, bias) + adapter(x)
    flat = x.ndim == 2
    y = _matmul_t(x if flat else x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        y = y + bias
    return y if flat else y.reshape(*x.shape[:-1], -1)


class Linear(nn.Cell):
    """`linear` with its parameters: weight (out, in), bias (out,) or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (out_features, in_features), dtype))
        self.bias = Parameter(initializer("zeros", (out_features,), dtype)) if bias else None
        self.parts: Optional[Parts] = None  # a FusedLinear's; a plain Linear is one module, under its own name
        self.adapter: Optional[nn.Cell] = None  # a trainable delta (LoRA) while fine-tuning; see `weight_arg`

    def weight_arg(self):
        """What the layer math passes to `linear`: `weight`, or (weight, adapter) while an adapter is attached
        (training; for inference an adapter is merged into `weight` instead, so compiled graphs see tensors)."""
        return self.weight if self.adapter is None else (self.weight, self.adapter)

    def construct(self, x: Tensor) -> Tensor:
        return linear(x, self.weight_arg(), self.bias)


class FusedLinear(Linear):
    """Several of transformers' linear modules in one matmul: their weights (and biases) concatenated on the output
    axis in the order of `parts` (weights.py declares them), so rows [start, start + rows) are one module's."""

    def __init__(self, in_features: int, parts: Parts, bias: bool, dtype=ms.float32):
        super().__init__(in_features, sum(rows for _, rows in parts), bias, dtype)
        self.parts = parts


class Embedding(nn.Cell):
    """Lookup table; `weight` (num, dim)."""

    def __init__(self, num: int, dim: int, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (num, dim), dtype))

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.weight, ids, 0)
