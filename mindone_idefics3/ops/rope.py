"""Rotary position embeddings (Llama), with the `linear` and `llama3` frequency scalings.

The inverse frequencies are computed once on the host in fp32; cos/sin are computed in the graph from the position
ids (fp32, as transformers does), so no position table of max_position_embeddings rows is ever allocated.

The rotation is applied in (batch, seq, heads, head_dim) layout, to the q and k heads together, before the heads
move forward for attention: Ascend's fused `rotary_position_embedding` takes that layout (cos/sin (B, S, 1, D))
for any shape, while in (B, N, S, D) it is documented as not allowed when B·N > 8·S — every decode step. With
q and k together there are always ≥ 2 heads, so the shapes cannot be read as (B, N, S, D) either. The eager math
is elementwise: layout and grouping do not change its result.
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..config import TextConfig
from . import kernels


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
    """position_ids (B, S) int → cos, sin (B, S, 1, head_dim) in `dtype` (computed in fp32)."""

    def __init__(self, cfg: TextConfig, dtype=ms.float32):
        super().__init__()
        self.inv_freq = Tensor(inverse_frequencies(cfg))
        self.dtype = dtype

    def construct(self, position_ids: Tensor):
        freqs = position_ids.astype(ms.float32)[:, :, None] * self.inv_freq[None, None, :]
        emb = ops.cat((freqs, freqs), axis=-1)[:, :, None]
        return ops.cos(emb).astype(self.dtype), ops.sin(emb).astype(self.dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), axis=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, fused: bool = False) -> Tensor:
    """x (B, S, N, D) rotated by the angles of cos/sin (B, S, 1, D) (rotate-half convention, as HF Llama).

    fused: Ascend's `rotary_position_embedding` in mode 0 (rotate-half), layout BSND.
    """
    if fused:
        return kernels.rotary_position_embedding(x, cos, sin, 0)
    return x * cos + rotate_half(x) * sin
