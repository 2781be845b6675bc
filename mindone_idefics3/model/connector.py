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
    n = math.isqrt(seq)  # the caller checked the grid (check_patch_grid): this runs inside compiled graphs too
    x = x.reshape(t, n, n // s, d * s)
    x = x.transpose(0, 2, 1, 3).reshape(t, n // s, n // s, d * s * s)
    x = x.transpose(0, 2, 1, 3).reshape(t, seq // (s * s), d * s * s)
    return x


def check_patch_grid(grid_h: int, grid_w: int, s: int) -> None:
    """Pixel shuffle needs a square patch grid whose side is a multiple of the scale factor."""
    if grid_h != grid_w or grid_h % s:
        raise Idefics3Error(f"image tiles of {grid_h}x{grid_w} patches cannot be pixel-shuffled: the grid must be "
                            f"square with a side that is a multiple of scale_factor={s} (pad tiles to a square of "
                            "the vision image size, as the processor does)")


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
