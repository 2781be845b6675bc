"""The attention seam and the fused-op seams: backend choice, and the Ascend branch run on the CPU.

The Ascend branch cannot run here for real; instead the Ascend functions are replaced, at their one import point
(`mindone_idefics3.ops.kernels`), by the numpy references of their documented contracts (kernel_reference.py),
and the branch must then equal the eager path: per call site, for the whole model's logits (fp32, 1e-5 relative
L2 at real tokens) and for 32 greedy tokens. The references are numpy, so this runs in PyNative only
(`use_jit=False`); that the branch also builds a `mindspore.jit` graph is checked with shape-only stand-ins.
"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

import kernel_reference
from conftest import relative_l2
from inputs import make_batch
from kernel_reference import as_mindspore
from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.generation import decode_step_fn, prefill
from mindone_idefics3.ops import kernels
from mindone_idefics3.ops.attention import AscendAttention, EagerAttention, make_attention

KERNELS = ("flash_attention_score", "fused_infer_attention_score", "rms_norm", "add_rms_norm",
           "rotary_position_embedding", "swiglu")
RNG = np.random.default_rng(0)


class KernelLog:
    """What the Ascend branch handed to each kernel."""

    def __init__(self):
        self.calls = []

    def wrap(self, name, fn):
        def recorded(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return fn(*args, **kwargs)

        return recorded

    def of(self, name):
        return [(a, k) for n, a, k in self.calls if n == name]

    def attention_calls(self):
        """(kernel, sparse_mode, mask shape or None, head dim, has kv lengths) of every attention call."""
        seen = []
        for name, args, kw in self.calls:
            if name == "flash_attention_score":
                mask = kw.get("attn_mask")
                seen.append((name, kw["sparse_mode"], None if mask is None else mask.shape, args[0].shape[-1], False))
            elif name == "fused_infer_attention_score":
                seen.append((name, 0, kw["atten_mask"].shape, args[0].shape[-1],
                             kw.get("actual_seq_lengths_kv") is not None))
        return seen


def install_references(monkeypatch) -> KernelLog:
    """Turn the Ascend branch on (for models built from now on) with the reference kernels substituted."""
    log = KernelLog()
    monkeypatch.setattr(kernels, "attention_kernels", lambda dtype: True)
    monkeypatch.setattr(kernels, "fused_ops", lambda: True)
    for name in KERNELS:
        fixed = {"allow_fp32": True} if name.endswith("attention_score") else {}
        monkeypatch.setattr(kernels, name, log.wrap(name, as_mindspore(getattr(kernel_reference, name), **fixed)))
    return log


@pytest.fixture
def ascend_log(monkeypatch, ms_cpu):
    return install_references(monkeypatch)


def t(x, dtype=ms.float32):
    return Tensor(np.asarray(x), dtype)


# ---------------------------------------------------------------------------------------------- choice
def test_cpu_builds_the_eager_backend_shared_by_all_layers(ckpt_a, ms_cpu):
    assert isinstance(make_attention(16, ms.float32), EagerAttention)
    assert isinstance(make_attention(16, ms.float16), EagerAttention)
    assert not kernels.fused_ops() and not kernels.attention_kernels(ms.bfloat16)
    model = Model.from_pretrained(ckpt_a.path, progress=False)
    text, vision = model.model.text_model, model.model.vision_model
    assert text.layer_math.attention is text.attention and vision.layer_math.attention is vision.attention
    assert not text.layer_math.fused and not text.norm.fused and not text.fused_rope


def test_the_kernel_switch_is_validated(monkeypatch, ms_cpu):
    monkeypatch.setenv(kernels.ENV, "maybe")
    with pytest.raises(Idefics3Error, match="MINDONE_ASCEND_KERNELS must be 1"):
        kernels.fused_ops()
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.attention_kernels(ms.float16)


# ---------------------------------------------------------------------------------------------- call sites
@pytest.mark.parametrize("head_dim", [72, 12])
@pytest.mark.parametrize("padded_patches", [True, False])
def test_vision_site(ascend_log, head_dim, padded_patches):
    """Bidirectional, padded patches masked; head dim padded to a multiple of 16 with the real scale."""
    tiles, patches, heads = 3, 16, 2
    q, k, v = (t(RNG.standard_normal((tiles, heads, patches, head_dim))) for _ in range(3))
    patch_keep = None
    if padded_patches:
        keep = np.ones((tiles, patches), bool)
        keep[1, 10:] = False
        keep[2, 3:] = False
        patch_keep = Tensor(keep)
    eager, ascend = EagerAttention(head_dim), AscendAttention(head_dim)
    expected = eager(q, k, v, eager.mask(patch_keep)).asnumpy()
    got = ascend(q, k, v, ascend.mask(patch_keep)).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    (args, kw), = ascend_log.of("flash_attention_score")
    assert args[0].shape == (tiles, heads, patches, -(-head_dim // 16) * 16) and args[3] == heads
    assert kw["input_layout"] == "BNSD" and kw["sparse_mode"] == 0 and kw["scalar_value"] == head_dim**-0.5
    assert (kw["attn_mask"] is None) == (not padded_patches)
    if padded_patches:  # (T, 1, P, P), True = discard the padded keys
        assert kw["attn_mask"].shape == (tiles, 1, patches, patches)
        assert kw["attn_mask"].asnumpy()[2, 0, 0, 3:].all() and not kw["attn_mask"].asnumpy()[2, 0, 0, :3].any()


def text_inputs(b=2, s=7, nq=4, nkv=2, d=16, pad=3):
    q = t(RNG.standard_normal((b, nq, s, d)))
    k, v = (t(RNG.standard_normal((b, nkv, s, d))) for _ in range(2))
    key_keep = np.ones((b, s), bool)
    key_keep[0, :pad] = False
    return q, k, v, key_keep


@pytest.mark.parametrize("padding", ["left_padded", "no_padding", "no_padding_in_graph"])
def test_text_prefill_site(ascend_log, padding):
    """Causal: compressed mask + sparse_mode 3 without padding, a full discard mask + sparse_mode 0 with it."""
    q, k, v, key_keep = text_inputs(pad=3 if padding == "left_padded" else 0)
    slots = Tensor(np.arange(7, dtype=np.int32))
    eager, ascend = EagerAttention(16), AscendAttention(16)
    in_graph = padding == "no_padding_in_graph"  # a key_keep tensor cannot be inspected inside a graph
    expected = eager(q, k, v, eager.mask(Tensor(key_keep), slots)).asnumpy()
    got = ascend(q, k, v, ascend.mask(Tensor(key_keep), slots, in_graph)).asnumpy()
    real = key_keep  # rows of padded queries are not defined (the kernels' masks let them see themselves)
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-5, atol=1e-6)
    (_, kw), = ascend_log.of("flash_attention_score")
    if padding == "no_padding":
        assert kw["sparse_mode"] == 3 and kw["attn_mask"].shape == (2048, 2048)
    else:
        assert kw["sparse_mode"] == 0 and kw["attn_mask"].shape == (2, 1, 7, 7)


@pytest.mark.parametrize("head_dim,nkv", [(16, 2), (12, 1)])
def test_decode_site(ascend_log, head_dim, nkv):
    """One token against a static cache: left padding masked, the unused tail skipped by kv lengths, GQA."""
    b, nq, cache_len, slot = 2, 4, 12, 9
    q = t(RNG.standard_normal((b, nq, 1, head_dim)))
    k, v = (t(RNG.standard_normal((b, nkv, cache_len, head_dim))) for _ in range(2))  # slots > 9: stale junk
    key_keep = np.ones((b, cache_len), bool)
    key_keep[1, :4] = False
    slots = Tensor([slot], ms.int32)
    eager, ascend = EagerAttention(head_dim), AscendAttention(head_dim)
    expected = eager(q, k, v, eager.mask(Tensor(key_keep), slots)).asnumpy()
    got = ascend(q, k, v, ascend.mask(Tensor(key_keep), slots)).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    (args, kw), = ascend_log.of("fused_infer_attention_score")
    assert kw["input_layout"] == "BNSD" and kw["num_heads"] == nq and kw["num_key_value_heads"] == nkv
    assert kw["atten_mask"].shape == (b, 1, 1, cache_len) and args[1].shape == (b, nkv, cache_len, 16)
    np.testing.assert_array_equal(kw["actual_seq_lengths_kv"].asnumpy(), [slot + 1] * b)
    assert kw["actual_seq_lengths_kv"].dtype == ms.int64 and kw["scale"] == head_dim**-0.5


def test_fused_ops_equal_their_eager_fallbacks(ascend_log):
    from mindone_idefics3.ops.norms import RMSNorm, rms_norm
    from mindone_idefics3.ops.rope import apply_rotary

    x, delta = t(RNG.standard_normal((2, 5, 8))), t(RNG.standard_normal((2, 5, 8)))
    norm = RMSNorm(8, 1e-5)
    norm.weight.set_data(t(RNG.standard_normal(8)))
    total, normed = norm.add_and_norm(x, delta)
    np.testing.assert_array_equal(total.asnumpy(), (x + delta).asnumpy())
    np.testing.assert_allclose(normed.asnumpy(), rms_norm(x + delta, norm.weight, 1e-5).asnumpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(norm(x).asnumpy(), rms_norm(x, norm.weight, 1e-5).asnumpy(), rtol=1e-5, atol=1e-6)
    heads = t(RNG.standard_normal((2, 5, 6, 8)))  # (B, S, N, D)
    angles = RNG.standard_normal((2, 5, 1, 4))
    cos, sin = (t(f(np.concatenate([angles, angles], -1))) for f in (np.cos, np.sin))
    np.testing.assert_allclose(apply_rotary(heads, cos, sin, fused=True).asnumpy(),
                               apply_rotary(heads, cos, sin).asnumpy(), rtol=1e-5, atol=1e-6)
    assert [n for n, _, _ in ascend_log.calls] == ["add_rms_norm", "rms_norm", "rotary_position_embedding"]


# ---------------------------------------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def eager_models(ckpt_a, ckpt_b, ms_cpu):
    return {c.shape: (c, Model.from_pretrained(c.path, progress=False)) for c in (ckpt_a, ckpt_b)}


BATCHES = {
    "left_padding_images": dict(images_per_row=[1, 2], text_lens=[5, 12], partial={(1, 1): (18, 11)}),
    "one_full_image": dict(images_per_row=[1], text_lens=[9]),
}


@pytest.mark.parametrize("shape", ["a", "b"])
def test_model_logits_through_the_references_equal_eager(eager_models, ascend_log, shape):
    ckpt, eager = eager_models[shape]
    model = Model.from_pretrained(ckpt.path, progress=False)
    assert isinstance(model.model.text_model.attention, AscendAttention)
    for name, batch in BATCHES.items():
        ids, mask, pv, pam = make_batch(ckpt, rng=np.random.default_rng(len(name)), **batch)
        expected = eager(ids, mask, pv, pam).logits.asnumpy()
        got = model(ids, mask, pv, pam).logits.asnumpy()
        real = mask.astype(bool)
        assert np.isfinite(got[real]).all()
        assert relative_l2(got[real], expected[real]) < 1e-5, name
    calls = set(ascend_log.attention_calls())
    text_dim = -(-ckpt.config["text_config"]["hidden_size"] // ckpt.config["text_config"]["num_attention_heads"]
                 // 16) * 16
    assert ("flash_attention_score", 3, (2048, 2048), text_dim, False) in calls  # unpadded prompt
    assert any(c[1] == 0 and c[2] is not None and c[2][2] == c[2][3] and c[3] == text_dim for c in calls)
    assert {n for n, _, _ in ascend_log.calls} == set(KERNELS) - {"fused_infer_attention_score"}


@pytest.mark.parametrize("shape", ["a", "b"])
def test_greedy_tokens_through_the_references_equal_eager(eager_models, ascend_log, shape):
    """32 new tokens, batch with left padding and images: PyNative through the references = eager (compiled)."""
    ckpt, eager = eager_models[shape]
    ids, mask, pv, pam = make_batch(ckpt, rng=np.random.default_rng(5), **BATCHES["left_padding_images"])
    expected = eager.generate(ids, mask, pv, pam, max_new_tokens=32, eos_token_id=[])
    model = Model.from_pretrained(ckpt.path, progress=False)
    got = model.generate(ids, mask, pv, pam, max_new_tokens=32, eos_token_id=[], use_jit=False)
    np.testing.assert_array_equal(got, expected)
    cache_len = model.model.text_model.cache_shape[1]
    decode = [c for c in ascend_log.attention_calls() if c[0] == "fused_infer_attention_score"]
    layers = ckpt.config["text_config"]["num_hidden_layers"]
    assert len(decode) == 31 * layers and all(c[4] and c[2] == (2, 1, 1, cache_len) for c in decode)


# ---------------------------------------------------------------------------------------------- under jit
def _flash_stub(query, key, value, head_num, attn_mask=None, scalar_value=1.0, input_layout="BSH", sparse_mode=0):
    return query * scalar_value


def _fused_infer_stub(query, key, value, atten_mask=None, actual_seq_lengths_kv=None, num_heads=1, scale=1.0,
                      input_layout="BSH", num_key_value_heads=0, inner_precise=1):
    return query * scale, ops.zeros((1,), ms.float32)


def _rms_norm_stub(x, gamma, epsilon=1e-6):
    return x * gamma, x


def _add_rms_norm_stub(x1, x2, gamma, epsilon=1e-6):
    return (x1 + x2) * gamma, x1, x1 + x2


def _rope_stub(x, cos, sin, mode=0):
    return x * cos + x * sin


def _swiglu_stub(x, dim=-1):
    half = x.shape[-1] // 2
    return x[..., :half] * x[..., half:]


def install_stubs(monkeypatch) -> None:
    for name, stub in zip(KERNELS, (_flash_stub, _fused_infer_stub, _rms_norm_stub, _add_rms_norm_stub, _rope_stub,
                                    _swiglu_stub)):
        monkeypatch.setattr(kernels, name, stub)


def test_the_ascend_decode_step_compiles_under_jit(ckpt_a, monkeypatch, ms_cpu):
    """The backend choice and sparse_mode are graph constants: the Ascend branch of the decode
    step builds one `mindspore.jit` graph (kernels replaced by shape-only stand-ins; numbers are checked above)."""
    install_references(monkeypatch)
    model = Model.from_pretrained(ckpt_a.path, progress=False)
    ids, mask, pv, pam = make_batch(ckpt_a, rng=np.random.default_rng(1), **BATCHES["left_padding_images"])
    _, key_keep = prefill(model, ids.astype(np.int32), mask, pv, pam, cache_len=64)  # PyNative, references
    install_stubs(monkeypatch)
    step = decode_step_fn(model, greedy=True, use_jit=True)
    token = Tensor(np.array([[5], [7]], np.int32))
    out = step(token, Tensor(mask.sum(-1, keepdims=True).astype(np.int32)), Tensor([ids.shape[1]], ms.int32), key_keep)
    assert out.shape == (2,) and out.dtype == ms.int32


def test_the_ascend_vision_and_prefill_layer_graphs_compile_under_jit(ckpt_a, monkeypatch, ms_cpu):
    """The compiled per-layer graphs of vision and prefill take the Ascend mask tuples (sparse_mode, discard or
    None, kv_lengths or None) as inputs: they build too, padded prompt and partial tiles included."""
    install_references(monkeypatch)
    install_stubs(monkeypatch)
    model = Model.from_pretrained(ckpt_a.path, progress=False)
    ids, mask, pv, pam = make_batch(ckpt_a, rng=np.random.default_rng(2), **BATCHES["left_padding_images"])
    logits, _ = prefill(model, ids.astype(np.int32), mask, pv, pam, cache_len=128, use_jit=True)
    assert logits.shape == (2, ckpt_a.config["text_config"]["vocab_size"]) and logits.dtype == ms.float32
