"""fp32 logits of our model vs transformers' on the same checkpoint files (tolerance: 1e-5 relative L2).

The reference's vision position ids are corrected to the integer rule (see tests/reference.py); rotary positions
follow the attention mask on both sides (as transformers' generate does for left-padded batches). Logits are
compared at real tokens only: positions of left padding are not defined by either model.
"""
import mindspore as ms
import numpy as np
import pytest

from conftest import relative_l2
from inputs import make_batch, reference_logits
from mindone_idefics3 import Idefics3ForConditionalGeneration

TOL = 1e-5

CASES = {
    "one_full_image": dict(images_per_row=[1], text_lens=[12]),
    "two_images_one_prompt": dict(images_per_row=[2], text_lens=[10]),
    "partially_masked_image": dict(images_per_row=[2], text_lens=[8], partial={(0, 1): (13, 22)}),
    "batch_padding_images_and_left_padding": dict(images_per_row=[1, 3], text_lens=[5, 11],
                                                  partial={(1, 2): (17, 9)}),
    "text_only": dict(images_per_row=[0], text_lens=[20]),
    "text_only_batch_left_padded": dict(images_per_row=[0, 0], text_lens=[7, 19]),
}


@pytest.fixture(scope="module")
def models(ckpt_a, ckpt_b, ms_cpu):
    return {c.shape: (c, Idefics3ForConditionalGeneration.from_pretrained(c.path, dtype=ms.float32))
            for c in (ckpt_a, ckpt_b)}


@pytest.mark.parametrize("shape", ["a", "b"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_reference(models, shape, case):
    ckpt, model = models[shape]
    rng = np.random.default_rng(hash((shape, case)) % 2**32)
    ids, mask, pv, pam = make_batch(ckpt, rng=rng, **CASES[case])
    ours = model(input_ids=ids, attention_mask=mask, pixel_values=pv, pixel_attention_mask=pam).logits
    assert isinstance(ours, ms.Tensor) and ours.shape == (*ids.shape, 300)
    ours = ours.asnumpy()
    ref = reference_logits(ckpt, ids, mask, pv, pam)
    real = mask.astype(bool)
    assert np.isfinite(ours).all()
    assert relative_l2(ours[real], ref[real]) < TOL


def test_partial_mask_changes_the_output(models):
    """The pixel mask is not ignored: masking part of an image (pixels kept) changes the logits."""
    ckpt, model = models["a"]
    ids, mask, pv, pam = make_batch(ckpt, [1], [6], np.random.default_rng(3))
    full = model(ids, mask, pv, pam).logits.asnumpy()
    pam2 = pam.copy()
    pam2[..., 16:] = 0
    masked = model(ids, mask, pv, pam2).logits.asnumpy()
    assert relative_l2(masked, full) > 1e-3
    assert relative_l2(masked, reference_logits(ckpt, ids, mask, pv, pam2)) < TOL


def test_int32_and_int64_input_ids_agree(models):
    ckpt, model = models["a"]
    ids, mask, pv, pam = make_batch(ckpt, [1], [9], np.random.default_rng(4))
    a = model(ids.astype(np.int64), mask, pv, pam).logits.asnumpy()
    b = model(ms.Tensor(ids.astype(np.int32)), ms.Tensor(mask), ms.Tensor(pv), ms.Tensor(pam)).logits.asnumpy()
    np.testing.assert_array_equal(a, b)


def test_tied_embeddings_drive_the_lm_head(ckpt_b, models):
    from safetensors import safe_open

    with safe_open(str(ckpt_b.path / "model.safetensors"), "np") as f:
        assert "lm_head.weight" not in f.keys()  # the reference did not store it: the model must tie
    _, model = models["b"]
    assert model.tied and not hasattr(model, "lm_head")


def test_fp16_on_cpu_is_close_to_fp32(ckpt_a, models, ms_cpu):
    _, fp32 = models["a"]
    fp16 = Idefics3ForConditionalGeneration.from_pretrained(ckpt_a.path, dtype="fp16")
    assert fp16.model.text_model.embed_tokens.weight.dtype == ms.float16
    ids, mask, pv, pam = make_batch(ckpt_a, [1, 2], [6, 4], np.random.default_rng(5))
    a = fp32(ids, mask, pv, pam).logits.asnumpy()
    b = fp16(ids, mask, pv, pam).logits.asnumpy()
    real = mask.astype(bool)
    assert np.isfinite(b).all()
    assert relative_l2(b[real], a[real]) < 2e-2


def test_sharded_checkpoint_gives_identical_logits(tmp_path, ckpt_a, models):
    import shutil

    from conftest import write_reference_checkpoint

    write_reference_checkpoint(tmp_path, "a", seed=0, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    sharded = Idefics3ForConditionalGeneration.from_pretrained(tmp_path, dtype=ms.float32)
    _, single = models["a"]
    ids, mask, pv, pam = make_batch(ckpt_a, [2], [5], np.random.default_rng(6))
    np.testing.assert_array_equal(sharded(ids, mask, pv, pam).logits.asnumpy(),
                                  single(ids, mask, pv, pam).logits.asnumpy())
    shutil.rmtree(tmp_path)
