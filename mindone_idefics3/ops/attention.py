"""The attention seam: every attention call of the model (vision and text) goes through `attention()`.

Everything above this file is backend-agnostic: callers hand over q/k/v in (batch, heads, seq, head_dim) layout
and a boolean *keep* mask (True = attend, the Hugging Face polarity). This file decides how to compute it.
For now there is one backend, eager math (matmul, fp32 softmax, matmul) that runs on every device.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Tensor, ops

_FP32_MIN = -3.4028234663852886e38  # torch.finfo(float32).min, what transformers fills masked scores with


def split_heads(qkv: Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """(B, S, (Nq + 2·Nkv)·D) fused projection → q (B, Nq, S, D), k and v (B, Nkv, S, D)."""
    b, s, _ = qkv.shape
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = ops.split(qkv, (q_size, kv_size, kv_size), axis=-1)
    q = q.reshape(b, s, num_heads, head_dim).swapaxes(1, 2)
    k = k.reshape(b, s, num_kv_heads, head_dim).swapaxes(1, 2)
    v = v.reshape(b, s, num_kv_heads, head_dim).swapaxes(1, 2)
    return q, k, v


def make_keep_mask(key_keep: Tensor, q_slots: Optional[Tensor] = None) -> Tensor:
    """Boolean keep mask for `attention`.

    key_keep: (B, Sk) bool, False for padded keys. q_slots: (Sq,) int32 — the key index each query sits at, for
    causal attention (query i may see keys 0..q_slots[i]); None for bidirectional attention (vision).
    Returns (B, 1, Sq, Sk) when causal, else (B, 1, 1, Sk).
    """
    keep = key_keep.astype(ms.bool_)[:, None, None, :]
    if q_slots is None:
        return keep
    k_slots = ops.arange(key_keep.shape[1], dtype=ms.int32)
    causal = k_slots[None, :] <= q_slots.astype(ms.int32)[:, None]
    return ops.logical_and(keep, causal[None, None])


def attention(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], scale: float) -> Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: (B, Nq, Sq, D); k, v: (B, Nkv, Sk, D) with Nq a multiple of Nkv (head h reads KV head h // (Nq/Nkv), as
    transformers' `repeat_kv`); keep: bool, broadcastable to (B, 1, Sq, Sk), or None when every key is
    visible to every query.
    Returns (B, Sq, Nq·D), ready for the output projection. Softmax runs in fp32 whatever the input dtype.
    """
    b, nq, sq, d = q.shape
    nkv, sk = k.shape[1], k.shape[2]
    rep = nq // nkv
    # Group the query heads that share a KV head instead of repeating K and V in memory.
    scores = _matmul_qk(q.reshape(b, nkv, rep * sq, d), k)
    if scores.dtype != ms.float32:
        scores = scores.astype(ms.float32)
    scores = (scores * scale).reshape(b, nkv, rep, sq, sk)
    if keep is not None:
        scores = ops.where(keep[:, :, None], scores, _FP32_MIN)
    probs = ops.softmax(scores, axis=-1).astype(q.dtype).reshape(b, nkv, rep * sq, sk)
    out = ops.matmul(probs, v).reshape(b, nq, sq, d)
    return out.swapaxes(1, 2).reshape(b, sq, nq * d)


_matmul_qk = ops.BatchMatMul(transpose_b=True)
