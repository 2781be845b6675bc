"""mindone.transformers' loading arguments: `mindspore_dtype=` as another name of `dtype=`, and
`attn_implementation="eager" | "flash_attention_2"` mapped onto the attention seam (ops/kernels.py)."""
import mindspore as ms
import numpy as np
import pytest

from mindone_idefics3 import Idefics3ForConditionalGeneration as Model
from mindone_idefics3.errors import Idefics3Error
from mindone_idefics3.ops import kernels
from mindone_idefics3.ops.attention import AscendAttention, EagerAttention, make_attention


def backends(model):
    return type(model.model.text_model.attention), type(model.model.vision_model.attention)


def test_mindspore_dtype_is_the_dtype(ckpt_a, ms_cpu):
    by_alias = Model.from_pretrained(ckpt_a.path, mindspore_dtype=ms.float16, progress=False)
    assert by_alias.dtype == ms.float16
    assert {p.dtype for p in by_alias.get_parameters()} == {ms.float16}
    by_name = Model.from_pretrained(ckpt_a.path, dtype="fp16", progress=False)
    for a, b in zip(by_alias.get_parameters(), by_name.get_parameters()):
        assert a.name == b.name and np.array_equal(a.asnumpy(), b.asnumpy())
    # Both given and equal (in any spelling) is fine.
    assert Model.from_pretrained(ckpt_a.path, dtype="fp32", mindspore_dtype=ms.float32, progress=False).dtype \
        == ms.float32


def test_dtype_and_mindspore_dtype_that_disagree_are_an_error(ckpt_a, ms_cpu):
    with pytest.raises(Idefics3Error, match="dtype='fp16' and mindspore_dtype=.* disagree"):
        Model.from_pretrained(ckpt_a.path, dtype="fp16", mindspore_dtype=ms.float32, progress=False)


def test_mindspore_dtype_goes_through_the_device_policy(ckpt_a, ms_cpu):
    with pytest.raises(Idefics3Error, match="bf16 is not supported by MindSpore's CPU backend"):
        Model.from_pretrained(ckpt_a.path, mindspore_dtype=ms.bfloat16, progress=False)


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16])
def test_eager_attention_on_the_cpu(ckpt_a, ms_cpu, dtype):
    model = Model.from_pretrained(ckpt_a.path, mindspore_dtype=dtype, attn_implementation="eager", progress=False)
    assert backends(model) == (EagerAttention, EagerAttention)


def test_flash_attention_2_on_the_cpu_is_an_error_not_a_fallback(ckpt_a, ms_cpu):
    with pytest.raises(Idefics3Error, match="'flash_attention_2' needs an Ascend NPU"):
        Model.from_pretrained(ckpt_a.path, mindspore_dtype=ms.float16, attn_implementation="flash_attention_2",
                              progress=False)


@pytest.mark.parametrize("name, match", [("sdpa", "unknown attn_implementation 'sdpa' .MindSpore has no SDPA"),
                                         ("flash_attention_3", "unknown attn_implementation 'flash_attention_3'"),
                                         ("Eager", "unknown attn_implementation 'Eager'")])
def test_unknown_attn_implementations_are_an_error(ckpt_a, ms_cpu, name, match):
    with pytest.raises(Idefics3Error, match=match):
        Model.from_pretrained(ckpt_a.path, attn_implementation=name, progress=False)


@pytest.fixture
def on_ascend(monkeypatch, ms_cpu):
    """The choice as it is made on an Ascend device (only the device answer is replaced: no kernel runs here)."""
    monkeypatch.setattr(kernels, "is_ascend", lambda: True)
    monkeypatch.delenv(kernels.ENV, raising=False)


@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16])
def test_on_ascend_the_names_pick_the_backend(on_ascend, dtype):
    assert isinstance(make_attention(64, dtype), AscendAttention)  # unset: the device and dtype decide
    with kernels.attention_implementation("eager", dtype):
        assert isinstance(make_attention(64, dtype), EagerAttention)
    with kernels.attention_implementation("flash_attention_2", dtype):
        assert isinstance(make_attention(64, dtype), AscendAttention)
    assert isinstance(make_attention(64, dtype), AscendAttention)  # the choice ends with the block


def test_on_ascend_flash_attention_2_refuses_what_the_kernels_cannot_run(on_ascend, monkeypatch):
    with pytest.raises(Idefics3Error, match="takes fp16 or bf16"):
        kernels.check_attn_implementation("flash_attention_2", ms.float32)
    monkeypatch.setenv(kernels.ENV, "0")
    with pytest.raises(Idefics3Error, match="contradicts MINDONE_ASCEND_KERNELS=0"):
        kernels.check_attn_implementation("flash_attention_2", ms.bfloat16)
    assert kernels.check_attn_implementation("eager", ms.float32) == "eager"


def test_from_pretrained_maps_flash_attention_2_onto_the_kernel_backend(ckpt_a, on_ascend):
    """Built (not run) with the Ascend branch for vision and text; the branch's numerics are
    tests/model/test_attention_seam.py's."""
    model = Model.from_pretrained(ckpt_a.path, mindspore_dtype=ms.float16, attn_implementation="flash_attention_2",
                                  progress=False)
    assert backends(model) == (AscendAttention, AscendAttention)
    eager = Model.from_pretrained(ckpt_a.path, mindspore_dtype=ms.float16, attn_implementation="eager",
                                  progress=False)
    assert backends(eager) == (EagerAttention, EagerAttention)
