"""Rotary position embeddings (Llama), with the `linear` and `llama3` frequency scalings.

The inverse frequencies are computed once on the host in fp32; cos/sin are computed in the graph from the position
ids (fp32, as transformers does), so no position table of max_position_embeddings rows is ever allocated.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import TextConfig


def inverse_frequencies(cfg: TextConfig) -> np.ndarray:
    """(head_dim/2,) fp32 inverse frequencies after the config's rope scaling."""
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling.rope_type == "linear":
        inv_freq = (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    elif scaling.rope_type == "llama3":
        factor = scaling.factor
        old_len = scaling.original_max_position_embeddings
        low_freq_wavelen = old_len / scaling.low_freq_factor
        high_freq_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by `factor`, short ones kept, the band in between interpolated smoothly.
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


class RotaryEmbedding(nn.Cell):
    """position_ids (B, S) int → cos, sin (B, 1, S, head_dim) in `dtype` (computed in fp32)."""

    def __init__(self, cfg: TextConfig, dtype=ms.float32):
        super().__init__()
        self.inv_freq = Tensor(inverse_frequencies(cfg))
        self.dtype = dtype

    def construct(self, position_ids: Tensor):
        freqs = position_ids.astype(ms.float32)[:, :, None] * self.inv_freq[None, None, :]
        emb = ops.cat((freqs, freqs), axis=-1)[:, None]
        return ops.cos(emb).astype(self.dtype), ops.sin(emb).astype(self.dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), axis=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, N, S, D) rotated by the angles of cos/sin (B, 1, S, D) (rotate-half convention)."""
    return x * cos + rotate_half(x) * sin
