"""The kernel-contract references (kernel_reference.py) against plain attention and the plain formulas.

`plain_attention` is deliberately naive (a loop over rows, an explicit list of visible keys per row), so the
references' layouts, mask polarity, sparse modes, GQA mapping and kv lengths are checked against an independent
statement of what they should compute.
"""
import numpy as np
import pytest

import kernel_reference as ref

RNG = np.random.default_rng(0)


def plain_attention(q, k, v, visible, scale):
    """q (B, Nq, Sq, D), k/v (B, Nkv, Sk, D); visible(b, h, i) → key indices row i of head h may see."""
    b, nq, sq, d = q.shape
    group = nq // k.shape[1]
    out = np.zeros((b, nq, sq, d))
    for bi in range(b):
        for h in range(nq):
            for i in range(sq):
                keys = list(visible(bi, h, i))
                kk, vv = k[bi, h // group, keys].astype(np.float64), v[bi, h // group, keys].astype(np.float64)
                s = kk @ q[bi, h, i].astype(np.float64) * scale
                p = np.exp(s - s.max())
                out[bi, h, i] = (p / p.sum()) @ vv
    return out


def qkv(b=2, nq=4, nkv=2, sq=5, sk=7, d=16, dtype=np.float32):
    return (RNG.standard_normal((b, nq, sq, d)).astype(dtype), RNG.standard_normal((b, nkv, sk, d)).astype(dtype),
            RNG.standard_normal((b, nkv, sk, d)).astype(dtype))


def bnsd_to(x, layout):
    b, n, s, d = x.shape
    return {"BNSD": x, "BSND": x.transpose(0, 2, 1, 3), "BSH": x.transpose(0, 2, 1, 3).reshape(b, s, n * d),
            "SBH": x.transpose(2, 0, 1, 3).reshape(s, b, n * d)}[layout]


def fa(*args, **kwargs):
    return ref.flash_attention_score(*args, allow_fp32=True, **kwargs)


def fia(*args, **kwargs):
    return ref.fused_infer_attention_score(*args, allow_fp32=True, **kwargs)


def random_discard(shape, sk):
    """A random 1 = discard mask whose every row keeps at least one key."""
    discard = RNG.random(shape) < 0.4
    discard[..., RNG.integers(sk)] = False
    return discard


# ------------------------------------------------------------------------------------ flash_attention_score
@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH", "SBH"])
def test_flash_layouts_and_gqa_equal_plain_attention(layout):
    q, k, v = qkv(sq=6, sk=6, d=32)
    scale = 0.37
    out = fa(bnsd_to(q, layout), bnsd_to(k, layout), bnsd_to(v, layout), 4, scalar_value=scale,
             input_layout=layout)
    expected = plain_attention(q, k, v, lambda b, h, i: range(6), scale)
    np.testing.assert_allclose(out, bnsd_to(expected, layout), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_shape", ["B1SS", "BNSS", "SS"])
def test_flash_mask_true_means_discard(mask_shape):
    q, k, v = qkv(sq=5, sk=7)
    shape = {"B1SS": (2, 1, 5, 7), "BNSS": (2, 4, 5, 7), "SS": (5, 7)}[mask_shape]
    discard = random_discard(shape, 7)
    full = np.broadcast_to(discard, (2, 4, 5, 7))
    out = fa(q, k, v, 4, attn_mask=discard.astype(np.uint8), scalar_value=0.25, input_layout="BNSD")
    expected = plain_attention(q, k, v, lambda b, h, i: np.flatnonzero(~full[b, h, i]), 0.25)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sq,sk", [(6, 6), (3, 8)])
@pytest.mark.parametrize("sparse_mode", [2, 3])
def test_flash_compressed_causal_modes(sparse_mode, sq, sk):
    """2 = leftUpCausal (key j ≤ i), 3 = rightDownCausal (j ≤ i + Sk − Sq), from the compressed 2048² mask."""
    q, k, v = qkv(sq=sq, sk=sk)
    compressed = np.triu(np.ones((2048, 2048), bool), 1)
    out = fa(q, k, v, 4, attn_mask=compressed, scalar_value=0.5, input_layout="BNSD", sparse_mode=sparse_mode)
    last = (lambda i: i) if sparse_mode == 2 else (lambda i: i + sk - sq)
    expected = plain_attention(q, k, v, lambda b, h, i: range(last(i) + 1), 0.5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_flash_band_next_tokens_zero_is_causal():
    q, k, v = qkv(sq=6, sk=6)
    out = fa(q, k, v, 4, scalar_value=0.5, input_layout="BNSD", next_tokens=0,
             attn_mask=np.zeros((6, 6), bool))
    np.testing.assert_allclose(out, plain_attention(q, k, v, lambda b, h, i: range(i + 1), 0.5), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flash_half_precision_rounds_once(dtype):
    np_dtype = ref._bf16() if dtype == "bfloat16" else np.dtype(np.float16)
    q, k, v = (x.astype(np_dtype) for x in qkv(sq=4, sk=4))
    out = ref.flash_attention_score(q, k, v, 4, scalar_value=0.25, input_layout="BNSD")
    assert out.dtype == np_dtype
    expected = plain_attention(q, k, v, lambda b, h, i: range(4), 0.25)
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=0, atol=1e-2 if dtype == "bfloat16" else 2e-3)


def test_flash_refuses_what_the_kernel_refuses():
    q, k, v = qkv(sq=4, sk=4)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ref.flash_attention_score(q, k, v, 4, input_layout="BNSD")  # fp32 without allow_fp32
    q72, k72, v72 = qkv(sq=4, sk=4, d=72)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        fa(q72, k72, v72, 4, input_layout="BNSD")
    with pytest.raises(RuntimeError, match="attn_mask shape"):
        fa(q, k, v, 4, attn_mask=np.zeros((2, 1, 1, 4), bool), input_layout="BNSD")
    with pytest.raises(TypeError, match="bool/uint8"):
        fa(q, k, v, 4, attn_mask=np.zeros((4, 4), np.float32), input_layout="BNSD")
    with pytest.raises(RuntimeError, match="compressed mask"):
        fa(q, k, v, 4, attn_mask=np.triu(np.ones((4, 4), bool), 1), input_layout="BNSD", sparse_mode=3)
    with pytest.raises(RuntimeError, match="compressed mask"):
        fa(q, k, v, 4, attn_mask=~np.triu(np.ones((2048, 2048), bool), 1), input_layout="BNSD", sparse_mode=2)
    with pytest.raises(RuntimeError, match="not divisible"):
        fa(*qkv(nq=4, nkv=3, sq=4, sk=4), 4, input_layout="BNSD")
    with pytest.raises(RuntimeError, match="head_num"):
        fa(q, k, v, 2, input_layout="BNSD")
    dead_row = np.zeros((4, 4), bool)
    dead_row[2] = True
    with pytest.raises(ValueError, match="every key discarded"):
        fa(q, k, v, 4, attn_mask=dead_row, input_layout="BNSD")


# ------------------------------------------------------------------------------------ fused_infer_attention_score
@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH"])
@pytest.mark.parametrize("mask_shape", ["B_S", "B1S", "B11S"])
def test_fused_infer_one_token_kv_lengths_mask_and_gqa(layout, mask_shape):
    """Incremental branch: keys at or past actual_seq_lengths_kv are ignored even where the mask keeps them."""
    q, k, v = qkv(b=3, nq=6, nkv=2, sq=1, sk=9)
    lengths = np.array([9, 5, 1], np.int64)
    discard = random_discard((3, 9), 9)
    discard[:, 0] = False  # row 2 sees key 0 only
    mask = discard.reshape({"B_S": (3, 9), "B1S": (3, 1, 9), "B11S": (3, 1, 1, 9)}[mask_shape])
    out, lse = fia(bnsd_to(q, layout), bnsd_to(k, layout), bnsd_to(v, layout), atten_mask=mask,
                   actual_seq_lengths_kv=lengths, num_heads=6, num_key_value_heads=2, scale=0.3,
                   input_layout=layout)
    assert lse.shape == (1,) and not lse.any()  # softmax_lse_flag off: zeros (1,)
    expected = plain_attention(q, k, v, lambda b, h, i: [j for j in range(lengths[b]) if not discard[b, j]], 0.3)
    np.testing.assert_allclose(out, bnsd_to(expected, layout), rtol=1e-5, atol=1e-6)


def test_fused_infer_key_value_lists_and_softmax_lse():
    q, k, v = qkv(b=1, nq=2, nkv=1, sq=1, sk=5)
    out, lse = fia(q, [k], [v], num_heads=2, num_key_value_heads=1, scale=0.5, input_layout="BNSD",
                   softmax_lse_flag=True)
    np.testing.assert_allclose(out, plain_attention(q, k, v, lambda b, h, i: range(5), 0.5), rtol=1e-5, atol=1e-6)
    scores = np.einsum("bnqd,bkd->bnqk", q.astype(np.float64), k[:, 0].astype(np.float64)) * 0.5
    np.testing.assert_allclose(lse, np.log(np.exp(scores).sum(-1, keepdims=True)), rtol=1e-5)


@pytest.mark.parametrize("sparse_mode", [0, 3])
def test_fused_infer_prompt_branch(sparse_mode):
    q, k, v = qkv(b=2, nq=4, nkv=2, sq=3, sk=8)
    if sparse_mode == 3:
        out, _ = fia(q, k, v, atten_mask=np.triu(np.ones((2048, 2048), bool), 1), num_heads=4, num_key_value_heads=2,
                     scale=0.5, input_layout="BNSD", sparse_mode=3)
        visible = lambda b, h, i: range(i + 8 - 3 + 1)  # noqa: E731
    else:
        discard = random_discard((2, 1, 3, 8), 8)
        out, _ = fia(q, k, v, atten_mask=discard, num_heads=4, num_key_value_heads=2, scale=0.5, input_layout="BNSD")
        visible = lambda b, h, i: np.flatnonzero(~discard[b, 0, i])  # noqa: E731
    np.testing.assert_allclose(out, plain_attention(q, k, v, visible, 0.5), rtol=1e-5, atol=1e-6)


def test_fused_infer_refuses_what_the_kernel_refuses():
    q, k, v = qkv(b=2, nq=4, nkv=2, sq=1, sk=6)
    with pytest.raises(RuntimeError, match="do not match"):  # BNSD: num_key_value_heads must be key's N
        fia(q, k, v, num_heads=4, num_key_value_heads=1, input_layout="BNSD")
    with pytest.raises(RuntimeError, match="at most 64"):
        fia(*qkv(b=1, nq=65, nkv=1, sq=1, sk=3), num_heads=65, num_key_value_heads=1, input_layout="BNSD")
    with pytest.raises(ValueError, match="inner_precise"):
        fia(q, k, v, num_heads=4, num_key_value_heads=2, input_layout="BNSD", inner_precise=2)
    with pytest.raises(RuntimeError, match="atten_mask shape"):
        fia(q, k, v, atten_mask=np.zeros((6,), bool), num_heads=4, num_key_value_heads=2, input_layout="BNSD")
    with pytest.raises(ValueError, match="actual_seq_lengths_kv"):
        fia(q, k, v, actual_seq_lengths_kv=np.array([7, 2]), num_heads=4, num_key_value_heads=2, input_layout="BNSD")
    with pytest.raises(ValueError, match="every key discarded"):
        fia(q, k, v, actual_seq_lengths_kv=np.array([0, 2]), num_heads=4, num_key_value_heads=2, input_layout="BNSD")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ref.fused_infer_attention_score(q, k, v, num_heads=4, num_key_value_heads=2, input_layout="BNSD")


# ------------------------------------------------------------------------------------ fused ops
def test_rms_norm_and_add_rms_norm_follow_the_formula():
    x1, x2 = RNG.standard_normal((2, 3, 8)).astype(np.float32), RNG.standard_normal((2, 3, 8)).astype(np.float32)
    gamma = RNG.standard_normal(8).astype(np.float32)
    y, rstd = ref.rms_norm(x1, gamma, 1e-5)
    expected = x1 / np.sqrt((x1 * x1).mean(-1, keepdims=True) + 1e-5) * gamma
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    assert rstd.shape == (2, 3, 1) and rstd.dtype == np.float32
    y2, _, total = ref.add_rms_norm(x1, x2, gamma, 1e-5)
    np.testing.assert_array_equal(total, x1 + x2)
    np.testing.assert_allclose(y2, ref.rms_norm(x1 + x2, gamma, 1e-5)[0], rtol=1e-6)
    with pytest.raises(TypeError, match="same dtype"):
        ref.rms_norm(x1, gamma.astype(np.float16))


def test_rotary_mode_0_is_rotate_half_and_mode_1_interleaved():
    x = RNG.standard_normal((2, 5, 3, 8)).astype(np.float32)  # BSND
    angles = RNG.standard_normal((2, 5, 1, 4))
    cos0 = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
    sin0 = np.sin(np.concatenate([angles, angles], -1)).astype(np.float32)
    y = ref.rotary_position_embedding(x, cos0, sin0, 0)
    c = x[..., :4] + 1j * x[..., 4:]  # rotate-half: (x_i, x_{i+D/2}) rotates as one complex number
    rotated = c * np.exp(1j * angles)
    np.testing.assert_allclose(y, np.concatenate([rotated.real, rotated.imag], -1), rtol=1e-5, atol=1e-6)
    cos1 = np.repeat(np.cos(angles), 2, -1)[:1].astype(np.float32)  # mode 1: 1S1D, pairs (x_2i, x_2i+1)
    sin1 = np.repeat(np.sin(angles), 2, -1)[:1].astype(np.float32)
    y1 = ref.rotary_position_embedding(x, cos1, sin1, 1)
    c1 = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles[:1])
    np.testing.assert_allclose(y1, np.stack([c1.real, c1.imag], -1).reshape(x.shape), rtol=1e-5, atol=1e-6)


def test_rotary_refuses_bnsd_when_heads_outnumber_eight_tokens():
    """Documented: layout BNSD with B·N > 8·S (and 32-byte aligned D) is not allowed — a decode step; BSND is."""
    heads_first = RNG.standard_normal((1, 9, 1, 64)).astype(np.float16)  # (B, N, S=1, D)
    cos = np.ones((1, 1, 1, 64), np.float16)
    with pytest.raises(ValueError, match="not allowed"):
        ref.rotary_position_embedding(heads_first, cos, cos, 0)
    seq_first = heads_first.reshape(1, 1, 9, 64)  # the same memory read as (B, S=1, N, D), cos (B, S, 1, D)
    np.testing.assert_allclose(ref.rotary_position_embedding(seq_first, cos, 0 * cos, 0), seq_first)


def test_swiglu_is_silu_of_the_first_half_times_the_second():
    x = RNG.standard_normal((3, 10)).astype(np.float32)
    gate, up = x[:, :5], x[:, 5:]
    np.testing.assert_allclose(ref.swiglu(x, -1), gate / (1 + np.exp(-gate)) * up, rtol=1e-6)
    with pytest.raises(RuntimeError, match="even"):
        ref.swiglu(x[:, :9])
