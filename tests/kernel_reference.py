"""Numpy references of the Ascend kernels the model calls, written from their documented contracts (test code only).

Sources (MindSpore 2.10.0): the docstrings shipped in the package (`help(mindspore.ops.flash_attention_score)`,
`help(mindspore.ops.fused_infer_attention_score)`, `rms_norm`, `add_rms_norm`, `rotary_position_embedding`,
`swiglu`) and the same pages on mindspore.cn (docs/en/r2.10.0/api_python/ops/...; the zh-CN page of
rotary_position_embedding states the BNSD restriction as "not allowed to call"). Where the docs leave a case
open, the reference refuses it instead of guessing, so the seam cannot come to depend on it:
- a query row whose every key is discarded (the kernels do not define its output; FIA's docs warn of it);
- sparse_mode 0 with a pre/next_tokens band when S1 != S2 (the band's alignment is not stated);
- sparse_mode 4-8, TND/prefix/varlen inputs, dropout, pse, quantisation, page attention (not used by the model).

Every check a kernel documents (dtypes, layouts, head_dim % 16, GQA divisibility, mask dtype/shape per
sparse_mode, the compressed 2048×2048 mask) raises here like the kernel would, so a wrong call fails on the CPU.
The math runs in float64 and is rounded once to the query's dtype. `allow_fp32=True` additionally accepts fp32
q/k/v (the real attention kernels do not) so the seam can be checked to fp32 precision on the CPU.

`as_mindspore(fn)` wraps a reference so it can replace the MindSpore function it mirrors (Tensor in, Tensor out,
PyNative only: numpy cannot run inside a `mindspore.jit` graph).
"""
from __future__ import annotations

import functools

import numpy as np

INT_MAX = 2147483647
COMPRESSED = 2048


def _bf16():
    from mindspore.common import np_dtype

    return np.dtype(np_dtype.bfloat16)


def _check_float(x, name, allow_fp32, extra=()):
    allowed = [np.dtype(np.float16), _bf16(), *map(np.dtype, extra)] + ([np.dtype(np.float32)] if allow_fp32 else [])
    if x.dtype not in allowed:
        raise TypeError(f"{name} must be float16 or bfloat16, got {x.dtype}")


def _as_discard(mask, name):
    mask = np.asarray(mask)
    if mask.dtype not in (np.bool_, np.uint8, np.int8):
        raise TypeError(f"{name} must be bool/uint8/int8 (1 = discard), got {mask.dtype}")
    return mask.astype(bool)


def _is_compressed_causal(mask) -> bool:
    m = mask.reshape(mask.shape[-2:]) if mask.ndim > 2 and all(s == 1 for s in mask.shape[:-2]) else mask
    return m.shape == (COMPRESSED, COMPRESSED) and np.array_equal(m, np.triu(np.ones(m.shape, bool), 1))


def _to_bnsd(x, layout, heads):
    """(B, N, S, D) view of q/k/v given the layout; `heads` is N (for BSH/SBH, where the shape does not say)."""
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)
    if layout == "SBH":
        s, b, h = x.shape
        return x.reshape(s, b, heads, h // heads).transpose(1, 2, 0, 3)
    raise NotImplementedError(f"input_layout {layout!r} is not encoded in this reference")


def _from_bnsd(x, layout):
    b, n, s, d = x.shape
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
    if layout == "SBH":
        return x.transpose(2, 0, 1, 3).reshape(s, b, n * d)
    raise NotImplementedError(layout)


def _causal_keep(s1, s2, sparse_mode):
    """sparse_mode 2 leftUpCausal: key j ≤ i; 3 rightDownCausal: key j ≤ i + (S2 − S1) (aligned to the end)."""
    i = np.arange(s1)[:, None]
    j = np.arange(s2)[None, :]
    return j <= i if sparse_mode == 2 else j <= i + (s2 - s1)


def _band_keep(s1, s2, pre_tokens, next_tokens):
    if pre_tokens >= INT_MAX and next_tokens >= INT_MAX:
        return np.ones((s1, s2), bool)
    if s1 != s2:
        raise NotImplementedError("pre/next_tokens bands with S1 != S2: the docs do not state their alignment")
    i = np.arange(s1)[:, None]
    j = np.arange(s2)[None, :]
    return (j - i <= next_tokens) & (i - j <= pre_tokens)


def _attend(q, k, v, keep, scale):
    """q (B, N1, S1, D), k/v (B, N2, S2, D), keep broadcastable to (B, N1, S1, S2) → (B, N1, S1, D) float64, lse."""
    b, n1, s1, d = q.shape
    n2 = k.shape[1]
    group = n1 // n2
    kk = np.repeat(k.astype(np.float64), group, axis=1)  # query head h reads KV head h // (N1 / N2)
    vv = np.repeat(v.astype(np.float64), group, axis=1)
    keep = np.broadcast_to(keep, (b, n1, s1, k.shape[2]))
    if not keep.any(-1).all():
        raise ValueError("a query row has every key discarded: the kernels do not define its output")
    scores = np.einsum("bnqd,bnkd->bnqk", q.astype(np.float64), kk) * scale
    scores = np.where(keep, scores, -np.inf)
    peak = scores.max(-1, keepdims=True)
    weights = np.exp(scores - peak)
    total = weights.sum(-1, keepdims=True)
    out = np.einsum("bnqk,bnkd->bnqd", weights / total, vv)
    return out, (np.log(total) + peak)


def flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                          attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, keep_prob=1.0,
                          scalar_value=1.0, pre_tokens=INT_MAX, next_tokens=INT_MAX, inner_precise=0,
                          input_layout="BSH", sparse_mode=0, *, allow_fp32=False):
    """`mindspore.ops.flash_attention_score` (2.10): softmax(mask(scale · q·kᵀ)) · v; 1/True in attn_mask = drop.

    Layouts BSH, SBH, BSND, BNSD; GQA (N2 divides N1, KV heads read from key's shape); sparse_mode 0 (attn_mask
    (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2), or None; pre/next_tokens band), 1 (full attn_mask required),
    2/3 (the compressed triu(ones(2048, 2048), 1) mask required). Returns attention_out like query.
    """
    query, key, value = (np.asarray(x) for x in (query, key, value))
    _check_float(query, "query", allow_fp32)
    if not key.dtype == value.dtype == query.dtype:
        raise TypeError("query, key and value must have the same dtype")
    if key.shape != value.shape:
        raise ValueError(f"key {key.shape} and value {value.shape} must have the same shape")
    for name, arg in (("real_shift", real_shift), ("drop_mask", drop_mask), ("padding_mask", padding_mask),
                      ("prefix", prefix), ("actual_seq_qlen", actual_seq_qlen), ("actual_seq_kvlen", actual_seq_kvlen)):
        if arg is not None:
            raise NotImplementedError(f"{name} is not encoded in this reference")
    if keep_prob != 1.0:
        raise NotImplementedError("dropout (keep_prob < 1) is not encoded in this reference")
    if not isinstance(scalar_value, float) or not isinstance(sparse_mode, int):
        raise TypeError("scalar_value must be a float and sparse_mode an int")
    if not isinstance(head_num, int) or head_num <= 0:
        raise RuntimeError(f"head_num must be a positive int, got {head_num!r}")
    q = _to_bnsd(query, input_layout, head_num)
    if q.shape[1] != head_num:
        raise RuntimeError(f"head_num {head_num} does not match the query's {q.shape[1]} heads")
    d = q.shape[3]
    kv_heads = {"BNSD": key.shape[1], "BSND": key.shape[2]}.get(input_layout, key.shape[-1] // d)
    k, v = _to_bnsd(key, input_layout, kv_heads), _to_bnsd(value, input_layout, kv_heads)
    if k.shape[3] != d:
        raise RuntimeError("the D axis of query, key and value must be the same")
    if d % 16 or d > 512:
        raise RuntimeError(f"head dim must be a multiple of 16 and at most 512, got {d}")
    b, n1, s1, _ = q.shape
    n2, s2 = k.shape[1], k.shape[2]
    if n1 % n2:
        raise RuntimeError(f"head_num {n1} is not divisible by the {n2} key/value heads")
    if sparse_mode in (0, 1):
        if attn_mask is None:
            if sparse_mode == 1:
                raise RuntimeError("sparse_mode 1 needs the full attn_mask")
            keep = np.ones((s1, s2), bool)
        else:
            mask = _as_discard(attn_mask, "attn_mask")
            if mask.shape not in ((b, n1, s1, s2), (b, 1, s1, s2), (s1, s2)):
                raise RuntimeError(f"attn_mask shape {mask.shape} is not (B, N1, S1, S2), (B, 1, S1, S2) or (S1, S2) "
                                   f"= {(b, n1, s1, s2)}")
            keep = ~mask
        if sparse_mode == 0:
            keep = keep & _band_keep(s1, s2, pre_tokens, next_tokens)
    elif sparse_mode in (2, 3):
        if attn_mask is None or not _is_compressed_causal(_as_discard(attn_mask, "attn_mask")):
            raise RuntimeError(f"sparse_mode {sparse_mode} needs the compressed mask triu(ones(2048, 2048), 1)")
        keep = _causal_keep(s1, s2, sparse_mode)
    else:
        raise NotImplementedError(f"sparse_mode {sparse_mode} is not encoded in this reference")
    out, _ = _attend(q, k, v, keep, scalar_value)
    return _from_bnsd(out.astype(query.dtype), input_layout)


def fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                actual_seq_lengths_kv=None, block_table=None, num_heads=1, scale=1.0,
                                pre_tokens=INT_MAX, next_tokens=INT_MAX, input_layout="BSH", num_key_value_heads=0,
                                sparse_mode=0, inner_precise=1, block_size=0, softmax_lse_flag=False,
                                allow_fp32=False, **unused):
    """`mindspore.ops.fused_infer_attention_score` (2.10), the float path without quantisation or paging.

    One query token (Q_S = 1) takes the incremental branch (sparse_mode, pre/next_tokens and actual_seq_lengths
    ignored; atten_mask (B, KV_S), (B, 1, KV_S) or (B, 1, 1, KV_S)); more take the prompt branch (atten_mask
    (Q_S, KV_S), (B, Q_S, KV_S), (1, Q_S, KV_S), (B, 1, Q_S, KV_S) or (1, 1, Q_S, KV_S); sparse_mode 0-3 as in
    flash_attention_score). actual_seq_lengths_kv (B,): keys at or beyond a row's length are ignored.
    num_key_value_heads (0 = num_heads) must divide num_heads (ratio ≤ 64) and, in BNSD, equal key's N axis.
    Returns (attention_out like query (BNSD_BSND: BSND), softmax_lse (B, N, Q_S, 1) fp32 or zeros (1,)).
    """
    for name, arg in unused.items():
        if arg is not None and not (name.endswith("_mode") and arg == 0):
            raise NotImplementedError(f"{name} is not encoded in this reference")
    if pse_shift is not None or block_table is not None or block_size:
        raise NotImplementedError("pse_shift and page attention are not encoded in this reference")
    if isinstance(key, (list, tuple)):
        if len(key) != 1 or len(value) != 1:
            raise NotImplementedError("key/value lists of several tensors are not encoded in this reference")
        key, value = key[0], value[0]
    query, key, value = (np.asarray(x) for x in (query, key, value))
    _check_float(query, "query", allow_fp32)
    if not key.dtype == value.dtype == query.dtype:
        raise TypeError("query, key and value must have the same dtype (int8 is not encoded)")
    if not isinstance(scale, float):
        raise TypeError("scale must be a float")
    out_layout = "BSND" if input_layout == "BNSD_BSND" else input_layout
    in_layout = "BNSD" if input_layout == "BNSD_BSND" else input_layout
    if input_layout not in ("BSH", "BNSD", "BSND", "BNSD_BSND"):
        raise ValueError(f"input_layout {input_layout!r} is not one of BSH, BNSD, BSND, BNSD_BSND")
    nkv = num_key_value_heads or num_heads
    if num_heads % nkv or num_heads // nkv > 64:
        raise RuntimeError(f"num_heads {num_heads} must be a multiple of num_key_value_heads {nkv}, at most 64×")
    q = _to_bnsd(query, in_layout, num_heads)
    k, v = _to_bnsd(key, in_layout, nkv), _to_bnsd(value, in_layout, nkv)
    if q.shape[1] != num_heads or k.shape[1] != nkv:
        raise RuntimeError(f"num_heads {num_heads} / num_key_value_heads {nkv} do not match the shapes "
                           f"{query.shape}, {key.shape} in layout {input_layout}")
    b, n1, s1, d = q.shape
    s2 = k.shape[2]
    if k.shape[3] != d or k.shape[0] != b:
        raise RuntimeError("query and key/value disagree on B or D")
    if d > 512:
        raise RuntimeError(f"head dim must be at most 512, got {d}")
    if s1 == 1:
        if input_layout == "BNSD_BSND":
            raise ValueError("BNSD_BSND is only supported when Q_S > 1")
        if inner_precise not in (0, 1):
            raise ValueError("inner_precise must be 0 or 1 when Q_S is 1")
        keep = np.ones((b, 1, 1, s2), bool)
        if atten_mask is not None:
            mask = _as_discard(atten_mask, "atten_mask")
            if mask.shape not in ((b, s2), (b, 1, s2), (b, 1, 1, s2)):
                raise RuntimeError(f"atten_mask shape {mask.shape} is not (B, KV_S), (B, 1, KV_S) or (B, 1, 1, KV_S)")
            keep = ~mask.reshape(b, 1, 1, s2)
    else:
        if d % 16:
            raise RuntimeError(f"head dim must be a multiple of 16 for fp16/bf16 when Q_S > 1, got {d}")
        if actual_seq_lengths is not None:
            raise NotImplementedError("actual_seq_lengths (query) is not encoded in this reference")
        if sparse_mode in (0, 1):
            keep = np.ones((s1, s2), bool)
            if atten_mask is not None:
                mask = _as_discard(atten_mask, "atten_mask")
                if mask.shape not in ((s1, s2), (b, s1, s2), (1, s1, s2), (b, 1, s1, s2), (1, 1, s1, s2)):
                    raise RuntimeError(f"atten_mask shape {mask.shape} is not one of (Q_S, KV_S), (B, Q_S, KV_S), "
                                       "(1, Q_S, KV_S), (B, 1, Q_S, KV_S), (1, 1, Q_S, KV_S)")
                keep = ~(mask.reshape(-1, 1, s1, s2) if mask.ndim == 3 else mask)
            elif sparse_mode == 1:
                raise RuntimeError("sparse_mode 1 needs the full atten_mask")
            if sparse_mode == 0:
                keep = keep & _band_keep(s1, s2, pre_tokens, next_tokens)
        elif sparse_mode in (2, 3):
            if atten_mask is None or not _is_compressed_causal(_as_discard(atten_mask, "atten_mask")):
                raise RuntimeError(f"sparse_mode {sparse_mode} needs the compressed mask triu(ones(2048, 2048), 1)")
            keep = _causal_keep(s1, s2, sparse_mode)
        else:
            raise NotImplementedError(f"sparse_mode {sparse_mode} is not encoded in this reference")
    if actual_seq_lengths_kv is not None:
        lengths = np.asarray(actual_seq_lengths_kv).reshape(-1)
        if lengths.shape != (b,) or (lengths < 0).any() or (lengths > s2).any():
            raise ValueError(f"actual_seq_lengths_kv must be (B,) = ({b},) values in [0, {s2}], got {lengths}")
        keep = keep & (np.arange(s2)[None, :] < lengths[:, None])[:, None, None, :]
    out, lse = _attend(q, k, v, keep, scale)
    lse = lse.astype(np.float32) if softmax_lse_flag else np.zeros((1,), np.float32)
    return _from_bnsd(out.astype(query.dtype), out_layout), lse


def rms_norm(x, gamma, epsilon=1e-6):
    """`mindspore.ops.rms_norm`: (x / sqrt(mean(x², last gamma.ndim axes) + eps) · gamma, rstd fp32)."""
    x, gamma = np.asarray(x), np.asarray(gamma)
    _check_float(x, "x", True)
    if x.dtype != gamma.dtype:
        raise TypeError(f"x ({x.dtype}) and gamma ({gamma.dtype}) must have the same dtype")
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    if gamma.ndim > x.ndim:
        raise ValueError("the rank of gamma must not exceed the rank of x")
    axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
    x64 = x.astype(np.float64)
    rstd = 1.0 / np.sqrt((x64 * x64).mean(axis=axes, keepdims=True) + epsilon)
    return (x64 * rstd * gamma.astype(np.float64)).astype(x.dtype), rstd.astype(np.float32)


def add_rms_norm(x1, x2, gamma, epsilon=1e-6):
    """`mindspore.ops.add_rms_norm`: x = x1 + x2; (rms_norm(x) · gamma, rstd, x)."""
    x1, x2 = np.asarray(x1), np.asarray(x2)
    if x1.shape != x2.shape:
        raise RuntimeError(f"x1 {x1.shape} and x2 {x2.shape} must have the same shape")
    total = (x1 + x2).astype(x1.dtype)
    y, rstd = rms_norm(total, gamma, epsilon)
    return y, rstd, total


def rotary_position_embedding(x, cos, sin, mode=0):
    """`mindspore.ops.rotary_position_embedding`: x · cos + rotate(x) · sin.

    mode 0 rotate-half (GPT-NeoX / HF Llama): rotate(x) = cat(−x[..., D/2:], x[..., :D/2]); mode 1 interleaved
    (GPT-J): pairs (x0, x1) → (−x1, x0). x 4-D, D even and < 896, B and N < 1000; cos/sin 4-D, x's dtype, in a
    layout matching x's: x BNSD with cos 11SD/B1SD/BNSD, BSND with 1S1D/BS1D/BSND, SBND with S11D/SB1D/SBND
    (mode 1: 11SD/1S1D/S11D only). Refused, as documented: BNSD with B·N > 8·S and D·itemsize a multiple of 32.
    """
    x, cos, sin = np.asarray(x), np.asarray(cos), np.asarray(sin)
    _check_float(x, "x", True)
    if x.ndim != 4 or cos.ndim != 4 or sin.shape != cos.shape:
        raise ValueError("x, cos and sin must be 4-D, cos and sin of one shape")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise TypeError("cos and sin must have x's dtype")
    if not isinstance(mode, int) or mode not in (0, 1):
        raise TypeError("mode must be the int 0 or 1")
    x0, x1, x2, d = x.shape
    if d % 2 or d >= 896 or cos.shape[3] != d:
        raise ValueError(f"D must be even, < 896 and match cos, got x {x.shape} cos {cos.shape}")
    # cos shape → x's layout. Some shapes fit two layouts (e.g. S = 1); they are read as BNSD, the strict reading,
    # so a call cannot pass here by an ambiguity the kernel may resolve the other way.
    layouts = {(x0, 1, 1): "SBND", (1, x1, 1): "BSND", (x0, x1, 1): "BSND",
               (1, 1, x2): "BNSD", (x0, 1, x2): "BNSD", (x0, x1, x2): "BNSD"}
    if mode == 1:
        layouts = {(x0, 1, 1): "SBND", (1, x1, 1): "BSND", (1, 1, x2): "BNSD"}
    layout = layouts.get(tuple(cos.shape[:3]))
    if layout is None:
        raise ValueError(f"cos {cos.shape} is not a supported layout for x {x.shape} in mode {mode}")
    b, n, s = {"BNSD": (x0, x1, x2), "BSND": (x0, x2, x1), "SBND": (x1, x2, x0)}[layout]
    if b >= 1000 or n >= 1000:
        raise ValueError("B and N must be < 1000")
    if layout == "BNSD" and b * n > 8 * s and (d * x.dtype.itemsize) % 32 == 0:
        raise ValueError(f"layout BNSD with B·N = {b * n} > 8·S = {8 * s}: not allowed (documented)")
    x64 = x.astype(np.float64)
    if mode == 0:
        rotated = np.concatenate([-x64[..., d // 2:], x64[..., : d // 2]], axis=-1)
    else:
        rotated = np.stack([-x64[..., 1::2], x64[..., 0::2]], axis=-1).reshape(x.shape)
    return (x64 * cos.astype(np.float64) + rotated * sin.astype(np.float64)).astype(x.dtype)


def swiglu(input, dim=-1):  # noqa: A002 - MindSpore's parameter name
    """`mindspore.ops.swiglu`: a, b = the two halves of `input` along `dim`; silu(a) · b."""
    x = np.asarray(input)
    _check_float(x, "input", True)
    if x.shape[dim] % 2:
        raise RuntimeError(f"the size of dim {dim} must be even, got {x.shape[dim]}")
    a, b = np.split(x.astype(np.float64), 2, axis=dim)
    return (a / (1.0 + np.exp(-a)) * b).astype(x.dtype)


# --------------------------------------------------------------------------------------- MindSpore adapters
def as_mindspore(fn, **fixed):
    """`fn` with MindSpore Tensors in and out (Python scalars, tuples and None pass through). PyNative only."""
    from mindspore import Tensor

    def to_np(x):
        if isinstance(x, Tensor):
            return x.asnumpy()
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
            return type(x)(to_np(t) for t in x)
        return x

    def to_ms(x):
        if isinstance(x, tuple):
            return tuple(to_ms(t) for t in x)
        return Tensor(x)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return to_ms(fn(*map(to_np, args), **{k: to_np(v) for k, v in kwargs.items()}, **fixed))

    return wrapped
