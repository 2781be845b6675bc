"""Shared by the real-NPU suite (tests/ascend): when it runs, its tolerances, and float64 truths.

The suite runs only where `ms.device_context.ascend.is_available()`; elsewhere every test is skipped with the
reason below. It selects the Ascend device for the whole process, so run it on its own:
`python -m pytest -m ascend tests/ascend -rs -v` (the default suite selects the CPU).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from mindone_idefics3.device import ascend_available

NPU = ascend_available()
SKIP_REASON = ("no Ascend NPU usable here (ms.device_context.ascend.is_available() is False: no NPU, or MindSpore's "
               "Ascend package / CANN missing); run `python -m pytest -m ascend tests/ascend -rs` on an Atlas A2/A3 "
               "(910B/910C) machine")
npu_only = [pytest.mark.ascend, pytest.mark.skipif(not NPU, reason=SKIP_REASON)]

DTYPES = {"fp16": ms.float16, "bf16": ms.bfloat16}
# Relative L2 error against a float64 truth computed from the same (already rounded) inputs.
# One attention / fused-op output: a few times the output's own rounding (fp16 2^-11, bf16 2^-8).
SITE_TOL = {"fp16": 2e-3, "bf16": 1.5e-2}
# Whole-model logits against transformers in fp32 (tiny random models, 2-3 layers).
MODEL_TOL = {"fp16": 1e-2, "bf16": 6e-2}


@pytest.fixture(scope="session")
def npu():
    from mindone_idefics3.device import select_device

    return select_device("Ascend")


def relative_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def host(x) -> np.ndarray:
    """A MindSpore tensor (any float dtype) as float64 numpy."""
    return x.astype(ms.float32).asnumpy().astype(np.float64)


def attention_truth(q, k, v, keep, scale):
    """float64 attention: q (B, Nq, Sq, D), k/v (B, Nkv, Sk, D), keep bool broadcastable to (B, 1, Sq, Sk) or None
    → (B, Sq, Nq·D), the seam's output layout."""
    b, nq, sq, d = q.shape
    rep = nq // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scores = np.einsum("bnqd,bnkd->bnqk", q, k) * scale
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    with np.errstate(invalid="ignore"):  # rows of padded queries see no key: NaN, and never compared
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnqk,bnkd->bnqd", probs, v).transpose(0, 2, 1, 3).reshape(b, sq, nq * d)
