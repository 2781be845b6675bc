"""Pixel shuffle (s² fewer tokens, s²× wider) and the bias-free projection to the text hidden size."""
from __future__ import annotations

import math

from mindspore import Tensor, nn

from ..config import Idefics3Config
from ..errors import Idefics3Error
from .layers import Linear


def pixel_shuffle(x: Tensor, s: int) -> Tensor:
    """(T, n², D) → (T, (n/s)², D·s²), the same view/permute order as transformers' Idefics3Connector."""
    t, seq, d = x.shape
    n = math.isqrt(seq)
    if n * n != seq or n % s:
        raise Idefics3Error(f"the vision tower produced {seq} patches per tile; pixel shuffle needs a square grid "
                            f"whose side is a multiple of scale_factor={s} (pad tiles to a square, as the "
                            "processor does)")
    x = x.reshape(t, n, n // s, d * s)
    x = x.transpose(0, 2, 1, 3).reshape(t, n // s, n // s, d * s * s)
    x = x.transpose(0, 2, 1, 3).reshape(t, seq // (s * s), d * s * s)
    return x


class ModalityProjection(nn.Cell):
    def __init__(self, cfg: Idefics3Config, dtype):
        super().__init__()
        in_features = cfg.vision_config.hidden_size * cfg.scale_factor**2
        self.proj = Linear(in_features, cfg.text_config.hidden_size, bias=False, dtype=dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Connector(nn.Cell):
    """(T, n², D_vision) → (T, (n/s)², D_text)."""

    def __init__(self, cfg: Idefics3Config, dtype):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.modality_projection = ModalityProjection(cfg, dtype)

    def construct(self, x: Tensor) -> Tensor:
        return self.modality_projection(pixel_shuffle(x, self.scale_factor))
