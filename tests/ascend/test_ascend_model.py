"""The whole model on the NPU in fp16/bf16: Ascend kernels vs eager math vs transformers (fp32, CPU).

Logits: both paths within MODEL_TOL (relative L2 at real tokens) of transformers' fp32 logits, and the kernel
path no worse than twice the eager path in the same dtype (+1e-3). Decode: the compiled step (fused-infer
attention over the cache) agrees with a full forward (flash attention over the sequence), and the compiled and
PyNative decode loops give the same greedy ids.
"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ascend_support import DTYPES, MODEL_TOL, npu, npu_only, relative_l2  # noqa: F401
from inputs import make_batch, reference_logits

pytestmark = npu_only
BATCH = dict(images_per_row=[1, 2], text_lens=[5, 12], partial={(1, 1): (18, 11)})
ONE_PROMPT = dict(images_per_row=[1], text_lens=[9])


def load(ckpt, dtype, kernels_on, monkeypatch=None):
    from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
    from mindone_idefics3.ops import kernels

    if not kernels_on:
        monkeypatch.setattr(kernels, "attention_kernels", lambda dtype: False)
        monkeypatch.setattr(kernels, "fused_ops", lambda: False)
    model = Model.from_pretrained(ckpt.path, dtype=DTYPES[dtype], progress=False)
    from mindone_idefics3.ops.attention import AscendAttention

    assert isinstance(model.model.text_model.attention, AscendAttention) == kernels_on
    return model


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", ["a", "b"])
def test_logits_kernels_vs_eager_vs_reference(npu, ckpt_a, ckpt_b, monkeypatch, shape, dtype):
    ckpt = {"a": ckpt_a, "b": ckpt_b}[shape]
    with_kernels = load(ckpt, dtype, True)
    with monkeypatch.context() as m:
        eager = load(ckpt, dtype, False, m)
    for batch in (BATCH, ONE_PROMPT):
        ids, mask, pv, pam = make_batch(ckpt, rng=np.random.default_rng(3), **batch)
        ref = reference_logits(ckpt, ids, mask, pv, pam)
        real = mask.astype(bool)
        errors = {}
        for name, model in (("kernels", with_kernels), ("eager", eager)):
            logits = model(ids, mask, pv, pam).logits.asnumpy()
            assert np.isfinite(logits[real]).all(), name
            errors[name] = relative_l2(logits[real], ref[real])
        assert errors["kernels"] < MODEL_TOL[dtype], errors
        assert errors["kernels"] <= 2 * errors["eager"] + 1e-3, errors


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_compiled_decode_agrees_with_full_forward_and_pynative(npu, ckpt_a, dtype):
    from mindone_idefics3.generation import decode_step_fn, prefill

    model = load(ckpt_a, dtype, True)
    ids, mask, pv, pam = make_batch(ckpt_a, rng=np.random.default_rng(7), **BATCH)
    b, s = ids.shape
    logits, key_keep = prefill(model, ids.astype(np.int32), mask, pv, pam, cache_len=64)
    step = decode_step_fn(model, greedy=False, use_jit=True)
    seq, m = ids.copy(), mask.copy()
    rng = np.random.default_rng(0)
    for t in range(8):
        full = model(seq, m, pv, pam, last_only=True).logits.asnumpy()[:, -1]
        assert relative_l2(logits.asnumpy(), full) < MODEL_TOL[dtype], f"step {t}"
        token = rng.integers(3, 280, size=(b, 1))
        seq, m = np.concatenate([seq, token], 1), np.concatenate([m, np.ones((b, 1), m.dtype)], 1)
        logits = step(Tensor(token.astype(np.int32)), Tensor(m.sum(-1, keepdims=True).astype(np.int32) - 1),
                      Tensor([s + t], ms.int32), key_keep)
    compiled = model.generate(ids, mask, pv, pam, max_new_tokens=32, eos_token_id=[], use_jit=True)
    pynative = model.generate(ids, mask, pv, pam, max_new_tokens=32, eos_token_id=[], use_jit=False)
    np.testing.assert_array_equal(compiled, pynative)
