"""The rewrites that make the CPU path launch fewer or cheaper kernels compute what the plain formulas compute.

Each is checked against the straightforward form (bit for bit where the rewrite claims exactness) and, for the
activation, against torch — the model-level parity tests then cover them in context.
"""
import math

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor, ops

from mindone_idefics3.config import TextConfig
from mindone_idefics3.ops.activations import gelu_tanh
from mindone_idefics3.ops.attention import attention, attention_bias
from mindone_idefics3.ops.rope import RotaryEmbedding, apply_rotary, rotate_qkv

RNG = np.random.default_rng(7)


def test_gelu_tanh_equals_torch_gelu_pytorch_tanh(ms_cpu):
    x = np.concatenate([RNG.standard_normal(20000) * 3, np.linspace(-30, 30, 2001), [0.0, -0.0, 1e-30, -1e-30]])
    x = x.astype(np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    got = gelu_tanh(Tensor(x)).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)
    half = gelu_tanh(Tensor(x[:2000], ms.float16))
    assert half.dtype == ms.float16
    expected16 = torch.nn.functional.gelu(torch.from_numpy(x[:2000]).half().float(), approximate="tanh").numpy()
    np.testing.assert_allclose(half.asnumpy().astype(np.float32), expected16, rtol=2e-3, atol=2e-3)


def plain_attention(q, k, v, keep, scale):
    """matmul → · scale → mask → fp32 softmax → matmul, heads repeated as transformers' repeat_kv."""
    rep = q.shape[1] // k.shape[1]
    k, v = ops.repeat_interleave(k, rep, 1), ops.repeat_interleave(v, rep, 1)
    scores = ops.matmul(q, k.swapaxes(-1, -2)) * scale
    if keep is not None:
        scores = ops.where(keep, scores, -3.4028234663852886e38)
    out = ops.matmul(ops.softmax(scores, -1), v)
    b, n, s, d = out.shape
    return out.swapaxes(1, 2).reshape(b, s, n * d)


@pytest.mark.parametrize("head_dim, sq, sk, masked", [(64, 1, 192, True), (64, 70, 70, False), (16, 3, 40, True),
                                                      (72, 50, 50, True), (64, 9, 20, False)])
def test_eager_attention_equals_the_plain_formula(head_dim, sq, sk, masked, ms_cpu):
    """A power-of-two scale moves onto q (when q is smaller) without changing a bit; others stay on the scores."""
    b, nq, nkv = 2, 6, 2
    q = Tensor(RNG.standard_normal((b, nq, sq, head_dim)), ms.float32)
    k = Tensor(RNG.standard_normal((b, nkv, sk, head_dim)), ms.float32)
    v = Tensor(RNG.standard_normal((b, nkv, sk, head_dim)), ms.float32)
    keep = None
    if masked:
        keep_np = RNG.random((b, 1, sq, sk)) > 0.3
        keep_np[..., 0] = True
        if sq == 1:
            keep_np = keep_np[:, :, :1]
        keep = Tensor(keep_np)
    scale = head_dim**-0.5
    got = attention(q, k, v, attention_bias(keep), scale).asnumpy()
    np.testing.assert_allclose(got, plain_attention(q, k, v, keep, scale).asnumpy(), rtol=1e-6, atol=1e-6)
    # bit for bit the grouped form with the scale on the scores, also where attention() scales q instead
    np.testing.assert_array_equal(got, scale_on_scores(q, k, v, keep, scale).asnumpy())
    assert (math.frexp(scale)[0] == 0.5) == (head_dim in (16, 64))


def scale_on_scores(q, k, v, keep, scale):
    """attention()'s grouped-heads computation with the scale always applied to the scores (and a select for the
    mask: adding 0 changes no score, and masked ones end as exp(≈ fp32 min − max) = 0 either way)."""
    b, nq, sq, d = q.shape
    nkv, sk = k.shape[1], k.shape[2]
    rep = nq // nkv
    scores = ops.BatchMatMul(transpose_b=True)(q.reshape(b, nkv, rep * sq, d), k) * scale
    if keep is not None:
        grouped = scores.reshape(b, nkv, rep, sq, sk)
        scores = ops.where(keep[:, :, None], grouped, -3.4028234663852886e38).reshape(b, nkv, rep * sq, sk)
    out = ops.matmul(ops.softmax(scores, -1), v)
    return out.reshape(b, nq, sq, d).swapaxes(1, 2).reshape(b, sq, nq * d)


def test_rotating_the_fused_qkv_row_equals_rotate_half_on_split_heads(ms_cpu):
    """One gather + two products + a sum on the q‖k‖v row: q and k exactly as rotate-half, v untouched."""
    cfg = TextConfig.from_dict(dict(
        vocab_size=10, hidden_size=48, intermediate_size=8, num_hidden_layers=1, num_attention_heads=6,
        num_key_value_heads=2, rope_theta=10000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32)))
    rope = RotaryEmbedding(cfg)
    b, s, d, nq, nkv = 2, 5, 8, 6, 2
    positions = Tensor(RNG.integers(0, 4000, (b, s)), ms.int32)
    row = Tensor(RNG.standard_normal((b * s, (nq + 2 * nkv) * d)), ms.float32)
    got = rotate_qkv(row, rope.row_tables(positions)).asnumpy()
    cos, sin = rope(positions)
    heads = row.reshape(b, s, nq + 2 * nkv, d)
    expected_qk = apply_rotary(heads[:, :, : nq + nkv], cos, sin).asnumpy().reshape(b * s, -1)
    np.testing.assert_array_equal(got[:, : (nq + nkv) * d], expected_qk)
    np.testing.assert_array_equal(got[:, (nq + nkv) * d:], row.asnumpy()[:, (nq + nkv) * d:])
