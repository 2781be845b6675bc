"""Real Ascend kernels vs eager math at each attention call site and for each fused op (fp16 and bf16).

Both backends of the seam run on the NPU on the same inputs; each must be within SITE_TOL (relative L2) of a
float64 truth computed from those inputs, at the shapes of the released checkpoints (Idefics3-8B: SigLIP head
dim 72, text 32/8 heads × 128; SmolVLM: 12 × 64 vision, 9/3 × 64 text).
"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ascend_support import DTYPES, SITE_TOL, attention_truth, host, npu, npu_only, relative_l2  # noqa: F401

pytestmark = npu_only
RNG = np.random.default_rng(0)


def rand(shape, dtype):
    return Tensor(RNG.standard_normal(shape).astype(np.float32)).astype(DTYPES[dtype])


def both_backends(head_dim):
    from mindone_idefics3.ops.attention import AscendAttention, EagerAttention

    return EagerAttention(head_dim), AscendAttention(head_dim)


def check(q, k, v, key_keep, q_slots, keep, head_dim, dtype, rows=None):
    eager, ascend = both_backends(head_dim)
    kk = None if key_keep is None else Tensor(key_keep)
    truth = attention_truth(host(q), host(k), host(v), keep, head_dim**-0.5)
    for backend in (ascend, eager):
        out = host(backend(q, k, v, backend.mask(kk, q_slots)))
        assert np.isfinite(out if rows is None else out[rows]).all(), type(backend).__name__
        err = relative_l2(out if rows is None else out[rows], truth if rows is None else truth[rows])
        assert err < SITE_TOL[dtype], f"{type(backend).__name__}: {err:.2e}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("heads,head_dim,side", [(16, 72, 26), (12, 64, 32)], ids=["idefics3_8b", "smolvlm"])
@pytest.mark.parametrize("padded", [False, True], ids=["full_tiles", "padded_patches"])
def test_vision_site(npu, dtype, heads, head_dim, side, padded):
    tiles, patches = 2, side * side
    q, k, v = (rand((tiles, heads, patches, head_dim), dtype) for _ in range(3))
    key_keep = None
    if padded:
        grid = np.zeros((tiles, side, side), bool)
        grid[0] = True
        grid[1, : side - 6, : side // 2] = True
        key_keep = grid.reshape(tiles, patches)
    check(q, k, v, key_keep, None, None if key_keep is None else key_keep[:, None, None, :], head_dim, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("nq,nkv,head_dim", [(32, 8, 128), (9, 3, 64)], ids=["idefics3_8b", "smolvlm"])
@pytest.mark.parametrize("batch", ["one_prompt", "left_padded"])
def test_text_prefill_site(npu, dtype, nq, nkv, head_dim, batch):
    b, s = (1, 300) if batch == "one_prompt" else (2, 300)
    q = rand((b, nq, s, head_dim), dtype)
    k, v = (rand((b, nkv, s, head_dim), dtype) for _ in range(2))
    key_keep = np.ones((b, s), bool)
    if batch == "left_padded":
        key_keep[1, :37] = False  # 37 pads on the left of row 1
    slots = np.arange(s)
    keep = key_keep[:, None, None, :] & (slots[None, :] <= slots[:, None])[None, None]
    check(q, k, v, key_keep, Tensor(slots.astype(np.int32)), keep, head_dim, dtype, rows=key_keep)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("nq,nkv,head_dim", [(32, 8, 128), (9, 3, 64)], ids=["idefics3_8b", "smolvlm"])
def test_decode_site(npu, dtype, nq, nkv, head_dim):
    b, cache_len, slot = 2, 512, 400
    q = rand((b, nq, 1, head_dim), dtype)
    k, v = (rand((b, nkv, cache_len, head_dim), dtype) for _ in range(2))  # slots past 400: stale junk
    key_keep = np.ones((b, cache_len), bool)
    key_keep[1, :23] = False
    keep = (key_keep & (np.arange(cache_len) <= slot))[:, None, None, :]
    check(q, k, v, key_keep, Tensor([slot], ms.int32), keep, head_dim, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fused_ops_equal_eager(npu, dtype):
    from mindone_idefics3.ops.norms import RMSNorm
    from mindone_idefics3.ops.rope import apply_rotary

    x, delta = rand((2, 300, 4096), dtype), rand((2, 300, 4096), dtype)
    norm = RMSNorm(4096, 1e-5, DTYPES[dtype])
    norm.weight.set_data(rand((4096,), dtype))
    x64, d64, w64 = host(x), host(delta), host(norm.weight)

    def rms_truth(y):
        return y / np.sqrt((y * y).mean(-1, keepdims=True) + 1e-5) * w64

    for fused in (True, False):
        norm.fused = fused
        assert relative_l2(host(norm(x)), rms_truth(x64)) < SITE_TOL[dtype]
        total, normed = norm.add_and_norm(x, delta)
        assert relative_l2(host(total), x64 + d64) < SITE_TOL[dtype]
        assert relative_l2(host(normed), rms_truth(host(total))) < SITE_TOL[dtype]
    # RoPE on q‖k heads in (B, S, N, D): a decode step (S = 1, 40 heads) and a prefill; cos/sin (B, S, 1, D)
    for shape in ((4, 1, 40, 128), (2, 300, 12, 64)):
        heads = rand(shape, dtype)
        angles = RNG.standard_normal((shape[0], shape[1], 1, shape[3] // 2))
        cos, sin = (Tensor(f(np.concatenate([angles, angles], -1)).astype(np.float32)).astype(DTYPES[dtype])
                    for f in (np.cos, np.sin))
        h64, c64, s64 = host(heads), host(cos), host(sin)
        half = shape[3] // 2
        truth = h64 * c64 + np.concatenate([-h64[..., half:], h64[..., :half]], -1) * s64
        for fused in (True, False):
            assert relative_l2(host(apply_rotary(heads, cos, sin, fused)), truth) < SITE_TOL[dtype]
    # SwiGLU on gate ‖ up
    from mindone_idefics3.ops import kernels

    gate_up = rand((2, 300, 2 * 1536), dtype)
    g, u = np.split(host(gate_up), 2, -1)
    assert relative_l2(host(kernels.swiglu(gate_up, -1)), g / (1 + np.exp(-g)) * u) < SITE_TOL[dtype]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gelu_tanh_fused_and_sigmoid_form(npu, dtype):
    """SigLIP's tanh-GELU: the fused GeLU kernel (used on Ascend) and the sigmoid form (the CPU's) on the NPU."""
    from mindone_idefics3.ops.activations import gelu_tanh

    x = rand((2, 1024, 3072), dtype)
    x64 = host(x)
    truth = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3)))
    for fused in (True, False):
        out = gelu_tanh(x, fused)
        assert out.dtype == DTYPES[dtype]
        assert relative_l2(host(out), truth) < SITE_TOL[dtype]
