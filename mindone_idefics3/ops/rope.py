"""Rotary position embeddings (Llama), with the `linear` and `llama3` frequency scalings.

The inverse frequencies are computed once on the host in fp32; cos/sin are computed in the graph from the position
ids (fp32, as transformers does), so no position table of max_position_embeddings rows is ever allocated.

Two ways to apply them, chosen by ops/kernels.py:
- eager (the CPU): straight on the fused q‖k‖v projection row, (tokens, (Nq + 2·Nkv)·D), with tables made once
  per forward and shared by every layer: `row · cos + row[perm] · sin`. perm swaps the two halves of every q and
  k head; sin carries rotate-half's minus sign on the first half; the v columns get cos = 1, sin = 0 (angle 0), so
  they pass unchanged. Four kernels per layer (gather, two products, a sum) instead of the slices, negation and
  concatenation of rotate-half on split heads; the arithmetic of each element is rotate-half's, bit for bit
  (−x₂·sin = x₂·(−sin); x·1 + 0 = x).
- Ascend's fused `rotary_position_embedding` (mode 0, rotate-half) in (batch, seq, heads, head_dim) layout, to
  the q and k heads together, before the heads move forward for attention: the kernel takes that layout
  (cos/sin (B, S, 1, D)) for any shape, while in (B, N, S, D) it is documented as not allowed when B·N > 8·S —
  every decode step. With q and k together there are always ≥ 2 heads, so the shapes cannot be read as
  (B, N, S, D) either.
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
        inv_freq = inverse_frequencies(cfg)
        self.inv_freq = Tensor(inv_freq)
        self.dtype = dtype
        # Per column of the fused q‖k‖v row (see the module docstring): angle rate, sign of sin, source column.
        nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rotated, half = nq + nkv, d // 2
        rate = np.concatenate([np.tile(np.concatenate([inv_freq, inv_freq]), rotated), np.zeros(nkv * d, np.float32)])
        sign = np.concatenate([np.tile(np.repeat(np.float32([-1, 1]), half), rotated), np.ones(nkv * d, np.float32)])
        heads = np.arange(rotated * d).reshape(rotated, 2, half)[:, ::-1].reshape(-1)
        self.row_rate, self.row_sign = Tensor(rate.astype(np.float32)), Tensor(sign)
        self.row_perm = Tensor(np.concatenate([heads, np.arange(rotated * d, (rotated + nkv) * d)]).astype(np.int32))

    def construct(self, position_ids: Tensor):
        freqs = position_ids.astype(ms.float32)[:, :, None] * self.inv_freq[None, None, :]
        emb = ops.cat((freqs, freqs), axis=-1)[:, :, None]
        return ops.cos(emb).astype(self.dtype), ops.sin(emb).astype(self.dtype)

    def row_tables(self, position_ids: Tensor):
        """(cos, signed sin, perm) for `rotate_qkv`: cos/sin (B·S, (Nq + 2·Nkv)·D) in `dtype`, perm int32."""
        angles = position_ids.astype(ms.float32).reshape(-1, 1) * self.row_rate
        return ops.cos(angles).astype(self.dtype), (ops.sin(angles) * self.row_sign).astype(self.dtype), self.row_perm


def rotate_qkv(qkv: Tensor, tables) -> Tensor:
    """The fused projection row (B·S, (Nq + 2·Nkv)·D) with its q and k heads rotated, v unchanged (eager)."""
    cos, sin, perm = tables
    return qkv * cos + ops.gather(qkv, perm, 1) * sin


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


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Rotary positions of a left-padded batch: real tokens count from 0; pads get 1 (as transformers' generate)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int32)
