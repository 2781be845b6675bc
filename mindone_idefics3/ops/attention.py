"""The attention seam: every attention call of the model (vision and text) goes through an attention backend.

A model builds its backend once, `make_attention(head_dim, dtype)`, and shares it with its attention layers; the
choice (ops/kernels.py: eager math on the CPU and for fp32, Ascend kernels on an Ascend device for fp16/bf16) is
a Python constant from then on, so a `mindspore.jit` graph compiles one backend only. Callers never look inside:

    mask = backend.mask(key_keep, q_slots, in_graph)   # once per forward, shared by the layers
    out = backend(q, k, v, mask)                        # per layer: q (B, Nq, Sq, D), k/v (B, Nkv, Sk, D)
                                                        #   → (B, Sq, Nq·D), ready for the output projection

What the mask describes, whatever the backend:
- key_keep: (B, Sk) bool, False for padded keys; None when every key is real.
- q_slots: (Sq,) int32, the key index each query sits at, for causal attention (query i sees keys ≤ q_slots[i]);
  None for bidirectional attention (vision).
- Sk = Sq: the queries attend to their own tokens (vision, a forward, a prefill). Sk > Sq: they attend to a KV
  cache of Sk slots (decode).

What each backend receives:
- `EagerAttention`: an additive fp32 bias, 0 where a query may attend and fp32's minimum where not (transformers'
  eager masks), (B, 1, Sq, Sk) or (B, 1, 1, Sk), or None; matmul → + bias → fp32 softmax → matmul, grouped KV
  heads without repeating them in memory. The bias is made once per forward: per layer it costs one add (a select
  per layer was slower on the CPU; docs/performance.md).
- `AscendAttention`: tensors only (None, `discard`, or `(discard, kv_lengths)` against a KV cache), so a
  compiled graph can take the mask as an input without recompiling when its values change; discard is a bool
  mask, 1/True = do NOT attend (the kernels' polarity), and a 2-D discard is the compressed causal template
  (sparse_mode 3), a 4-D one the full mask (sparse_mode 0). Then
  - own tokens → `flash_attention_score`, layout BNSD, native GQA:
    vision, no padded patch: no mask;  vision with padded patches: discard (B, 1, S, S), sparse_mode 0;
    text without padding: the compressed causal mask triu(ones(2048, 2048), 1) with sparse_mode 3
    (rightDownCausal; equal to leftUpCausal here since Sq = Sk); text with left padding: discard (B, 1, S, S) =
    not (causal and real key), sparse_mode 0 — the compressed mask cannot express padding, and the kernels take
    no (B, Sk) key mask. A padded query row would then see no key at all, whose output the kernels do not define
    (the fused-infer docs warn of precision loss for all-masked rows): padded rows attend to themselves instead.
    Their outputs are never read (padded keys stay masked, padded logits are not compared).
  - a KV cache → `fused_infer_attention_score` (one query token: its incremental path), layout BNSD,
    num_key_value_heads = Nkv (native GQA), atten_mask = discard (B, 1, Sq, Sk) = not (causal and real key),
    actual_seq_lengths_kv = last query slot + 1 per row, so the kernel skips the unused tail of the cache.
  Head dims that are not a multiple of 16 (SigLIP's 72; the tiny test models) are zero-padded to the next one and
  the output sliced back; zeros add nothing to q·k, and the scale stays the real head_dim^-0.5. Text head dims of
  the released checkpoints (64, 128) need no padding, so the decode path never copies the cache for it.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from . import kernels

_FP32_MIN = -3.4028234663852886e38  # torch.finfo(float32).min, what transformers fills masked scores with
COMPRESSED_MASK_SIZE = 2048  # the kernels' compressed causal mask is always 2048 × 2048
HEAD_DIM_MULTIPLE = 16  # flash / fused-infer attention take head dims that are multiples of 16


def make_attention(head_dim: int, dtype, query_blocks: bool = True) -> nn.Cell:
    """The attention backend of a model whose heads are `head_dim` wide, in `dtype` (decided in ops/kernels.py).

    query_blocks: the eager path splits long queries into blocks of SCORE_BLOCK_ELEMENTS scores (text, whose
    prompts have any length). False for callers whose calls are bounded already (the vision tower: one chunk of
    tiles per call), where the blocks cost time for no memory they need: see `attention`."""
    if kernels.attention_kernels(dtype):
        return AscendAttention(head_dim)
    return EagerAttention(head_dim, query_blocks)


def split_heads(qkv: Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """(B, S, (Nq + 2·Nkv)·D) fused projection → q (B, Nq, S, D), k and v (B, Nkv, S, D)."""
    b, s, _ = qkv.shape
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = ops.split(qkv, (q_size, kv_size, kv_size), axis=-1)
    q = q.reshape(b, s, num_heads, head_dim).swapaxes(1, 2)
    k = k.reshape(b, s, num_kv_heads, head_dim).swapaxes(1, 2)
    v = v.reshape(b, s, num_kv_heads, head_dim).swapaxes(1, 2)
    return q, k, v


def key_keep_or_none(mask: np.ndarray) -> Optional[Tensor]:
    """The key mask of a prompt from its attention mask (B, S): None when nothing is padded (lets Ascend use its
    compressed causal mask)."""
    return None if mask.all() else Tensor(mask.astype(bool))


def make_keep_mask(key_keep: Optional[Tensor], q_slots: Optional[Tensor] = None) -> Optional[Tensor]:
    """Boolean keep mask (True = attend) from the seam's mask description (see the module docstring).

    Returns (B, 1, Sq, Sk) when causal ((1, 1, Sq, Sq) when key_keep is None), (B, 1, 1, Sk) when not, or None
    when neither causal nor padded.
    """
    if q_slots is None:
        return None if key_keep is None else key_keep.astype(ms.bool_)[:, None, None, :]
    sk = q_slots.shape[0] if key_keep is None else key_keep.shape[1]
    k_slots = ops.arange(sk, dtype=ms.int32)
    causal = (k_slots[None, :] <= q_slots.astype(ms.int32)[:, None])[None, None]
    if key_keep is None:
        return causal
    return ops.logical_and(key_keep.astype(ms.bool_)[:, None, None, :], causal)


def attention_bias(keep: Optional[Tensor]) -> Optional[Tensor]:
    """The additive fp32 mask of a bool keep mask: 0 where True, fp32's minimum where False (None stays None)."""
    if keep is None:
        return None
    return (1 - keep.astype(ms.float32)) * _FP32_MIN


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
              query_blocks: bool = True) -> Tensor:
    """Eager scaled dot-product attention with grouped KV heads.

    q: (B, Nq, Sq, D); k, v: (B, Nkv, Sk, D) with Nq a multiple of Nkv (head h reads KV head h // (Nq/Nkv), as
    transformers' `repeat_kv`); bias: `attention_bias`, fp32, broadcastable to (B, 1, Sq, Sk), or that bias laid
    out for the KV groups by `grouped_bias` (B, Nkv, (Nq/Nkv)·Sq, Sk), added to the scaled scores; or None when
    every key is visible to every query.
    Returns (B, Sq, Nq·D), ready for the output projection. Softmax runs in fp32 whatever the input dtype.

    Long prompts are computed in blocks of queries so that at most SCORE_BLOCK_ELEMENTS fp32 scores exist at a
    time: a 4k-token prompt of SmolVLM would otherwise hold 9 × 4096² scores (604 MB) several times over. Each
    query's scores, softmax and sum are computed as in one block (equal to rounding). query_blocks=False computes
    all queries at once: the blocks are not free in MindSpore 2.10's CPU graphs (a SigLIP layer of one 512-px
    SmolVLM tile is much slower in blocks; docs/performance.md), and a vision call is bounded by its chunk of
    tiles already.
    """
    b, nq, sq, _ = q.shape
    block = max(1, SCORE_BLOCK_ELEMENTS // (b * nq * k.shape[2]))
    if sq <= block or not query_blocks:
        return _attention_block(q, k, v, bias, scale)
    rep = nq // k.shape[1]
    per_query = bias is not None and bias.shape[2] != 1
    grouped = per_query and rep > 1 and bias.shape[2] == rep * sq
    if grouped:  # rows (group, query): blocks of queries are taken within each group
        bias = bias.reshape(b, k.shape[1], rep, sq, bias.shape[-1])
    outs = []
    for i in range(0, sq, block):
        part = bias
        if grouped:
            part = bias[:, :, :, i:i + block]
            part = part.reshape(b, k.shape[1], rep * part.shape[3], part.shape[4])
        elif per_query:
            part = bias[:, :, i:i + block]
        outs.append(_attention_block(q[:, :, i:i + block], k, v, part, scale))
    return ops.cat(outs, axis=1)


def attention_with_new_key(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, k_new: Tensor, v_new: Tensor,
                           scale: float) -> Tensor:
    """`attention` of one query per row over keys k, v (B, Nkv, Sk, D) and one more key k_new, v_new (B, Nkv, 1, D),
    as if it were appended, without making the (B, Nkv, Sk + 1, D) copy (a decode step over a whole KV cache read
    in place; MindSpore's CPU kernels copy slices and concatenations slowly). The softmax is taken over both parts
    by hand: exp(s - max) / sum, fp32. q (B, Nq, 1, D); bias: `attention_bias` (B, 1, 1, Sk) for k. Returns
    (B, 1, Nq·D)."""
    b, nq, _, d = q.shape
    nkv = k.shape[1]
    q = q.reshape(b, nkv, nq // nkv, d)
    scores = _matmul_qk(q, k).astype(ms.float32) * scale + bias  # (B, Nkv, rep, Sk)
    new = _matmul_qk(q, k_new).astype(ms.float32) * scale  # (B, Nkv, rep, 1)
    top = ops.maximum(scores.max(axis=-1, keepdims=True), new)
    e, e_new = ops.exp(scores - top), ops.exp(new - top)
    total = e.sum(axis=-1, keepdims=True) + e_new
    out = (ops.matmul((e / total).astype(q.dtype), v) + (e_new / total).astype(q.dtype) * v_new)  # (B, Nkv, rep, D)
    return out.reshape(b, 1, nq * d)


SCORE_BLOCK_ELEMENTS = 1 << 22  # fp32 attention scores computed at once by the eager path (16 MB)


def _attention_block(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> Tensor:
    """`attention` over all of q at once."""
    b, nq, sq, d = q.shape
    nkv, sk = k.shape[1], k.shape[2]
    rep = nq // nkv
    # A power-of-two scale (head dim 64, 256, ...) commutes exactly with rounding: (q·s)·k = (q·k)·s bit for bit,
    # so it goes on q when q is the smaller tensor (d values per query against Sk scores).
    scale_q = math.frexp(scale)[0] == 0.5 and d < sk
    if scale_q:
        q = q * scale
    # Group the query heads that share a KV head instead of repeating K and V in memory.
    scores = _matmul_qk(q.reshape(b, nkv, rep * sq, d), k)
    if scores.dtype != ms.float32:
        scores = scores.astype(ms.float32)
    if not scale_q:
        scores = scores * scale
    scores = add_bias(scores, bias, rep)
    probs = ops.softmax(scores, axis=-1).astype(q.dtype)
    out = ops.matmul(probs, v)  # (B, Nkv, rep·Sq, D)
    if sq == 1:  # one query per row (a decode step): heads are already in output order
        return out.reshape(b, 1, nq * d)
    return out.reshape(b, nq, sq, d).swapaxes(1, 2).reshape(b, sq, nq * d)


_matmul_qk = ops.BatchMatMul(transpose_b=True)


def add_bias(scores: Tensor, bias: Optional[Tensor], rep: int) -> Tensor:
    """Grouped scores (B, Nkv, rep·Sq, Sk) + an `attention` bias (None: unchanged)."""
    if bias is None:
        return scores
    b, nkv, rows, sk = scores.shape
    if bias.shape[2] == 1 or bias.shape[2] == rows:  # one bias row for every query, or laid out for the groups
        return scores + bias
    return (scores.reshape(b, nkv, rep, rows // rep, sk) + bias[:, :, None]).reshape(b, nkv, rows, sk)


def grouped_bias(bias: Optional[Tensor], num_heads: int, num_kv_heads: int) -> Optional[Tensor]:
    """A per-query `attention_bias` (B, 1, Sq, Sk) laid out as `attention`'s grouped scores are, (B, Nkv,
    (Nq/Nkv)·Sq, Sk), so that adding it is one plain elementwise kernel: MindSpore 2.10's CPU kernel broadcasting
    (B, 1, Sq, Sk) over the KV groups and their query heads took several times the softmax after it
    (docs/performance.md). Costs Nq× the bias's memory: as much as the scores of the call (the prefill calls
    its per chunk, outside the layer loop). A bias of one row per key (B, 1, 1, Sk) and None stay as they are."""
    if bias is None or bias.shape[2] == 1:
        return bias
    b, _, sq, sk = bias.shape
    rep = num_heads // num_kv_heads
    expanded = ops.broadcast_to(bias.reshape(b, 1, 1, sq, sk), (b, num_kv_heads, rep, sq, sk))
    return expanded.reshape(b, num_kv_heads, rep * sq, sk)


class EagerAttention(nn.Cell):
    """matmul → fp32 softmax → matmul; runs on every device and dtype."""

    def __init__(self, head_dim: int, query_blocks: bool = True):
        super().__init__()
        self.scale = head_dim**-0.5
        self.query_blocks = query_blocks  # see `attention`

    def mask(self, key_keep: Optional[Tensor], q_slots: Optional[Tensor] = None, in_graph: bool = False):
        """The additive mask for `construct`; in_graph is unused here (see AscendAttention.mask)."""
        return attention_bias(make_keep_mask(key_keep, q_slots))

    def construct(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        return attention(q, k, v, mask, self.scale, self.query_blocks)


@functools.lru_cache(maxsize=1)
def compressed_causal_mask() -> Tensor:
    """triu(ones(2048, 2048), 1) as bool: the template sparse_mode 2/3 expect (True = discard)."""
    return Tensor(np.triu(np.ones((COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE), np.bool_), 1))


class AscendAttention(nn.Cell):
    """Ascend's flash_attention_score (queries over their own tokens) and fused_infer_attention_score (over a KV
    cache), fp16/bf16, in their documented contracts (tests/kernel_reference.py encodes them)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.scale = head_dim**-0.5  # of the real head dim, also when q/k are zero-padded
        self.pad = -head_dim % HEAD_DIM_MULTIPLE
        self.causal_template = compressed_causal_mask()

    def mask(self, key_keep: Optional[Tensor], q_slots: Optional[Tensor] = None, in_graph: bool = False):
        """None, discard, or (discard, kv_lengths) — see the module docstring.

        in_graph: True inside a `mindspore.jit` graph. Outside one (a PyNative prefill), an all-real key_keep is
        recognised with one host read of the (B, S) mask, so unpadded prompts take the compressed causal mask;
        inside, a key_keep tensor always takes the full mask (correct, only slower). Callers that know there is
        no padding pass key_keep=None and skip the read.
        """
        if q_slots is None:  # bidirectional (vision)
            if key_keep is None:
                return None
            s = key_keep.shape[1]
            discard = ops.logical_not(key_keep.astype(ms.bool_))[:, None, None, :]
            return ops.broadcast_to(discard, (key_keep.shape[0], 1, s, s))
        sq = q_slots.shape[0]
        if key_keep is not None and key_keep.shape[1] != sq:  # decode against a KV cache
            discard = ops.logical_not(make_keep_mask(key_keep, q_slots))  # (B, 1, Sq, Sk)
            kv_lengths = ops.broadcast_to((q_slots[-1:] + 1).astype(ms.int64), (key_keep.shape[0],))
            return discard, kv_lengths
        if not in_graph:
            if key_keep is not None and bool(key_keep.all()):
                key_keep = None
        if key_keep is None:  # causal, no padding
            return self.causal_template
        k_slots = ops.arange(sq, dtype=ms.int32)
        diagonal = (k_slots[None, :] == q_slots.astype(ms.int32)[:, None])[None, None]
        keep = ops.logical_or(make_keep_mask(key_keep, q_slots), diagonal)  # padded rows see themselves
        return ops.logical_not(keep)

    def construct(self, q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
        b, nq, sq, d = q.shape
        if self.pad:
            q, k, v = ops.pad(q, (0, self.pad)), ops.pad(k, (0, self.pad)), ops.pad(v, (0, self.pad))
        if isinstance(mask, tuple):  # a KV cache
            discard, kv_lengths = mask
            out, _ = kernels.fused_infer_attention_score(
                q, k, v, atten_mask=discard, actual_seq_lengths_kv=kv_lengths, num_heads=nq, scale=self.scale,
                input_layout="BNSD", num_key_value_heads=k.shape[1], inner_precise=0)
        else:  # own tokens; the compressed causal template is the only 2-D mask
            sparse_mode = 3 if mask is not None and mask.ndim == 2 else 0
            out = kernels.flash_attention_score(q, k, v, nq, attn_mask=mask, scalar_value=self.scale,
                                                input_layout="BNSD", sparse_mode=sparse_mode)
        if self.pad:
            out = out[..., :d]
        return out.swapaxes(1, 2).reshape(b, sq, nq * d)
