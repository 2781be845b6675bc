"""SmolVLM2 checkpoints (model_type "smolvlm", written by transformers' SmolVLM classes) against transformers'
SmolVLMForConditionalGeneration: fp32 logits within 1e-5 relative L2 and identical greedy ids.

SmolVLM differs from Idefics3 in transformers 4.57.1 only by its `inputs_merger` (image features written block by
block instead of masked_scatter: the same result whenever each row's <image> count is a multiple of the tokens
per tile, which the processor guarantees) and by its processor (videos). Its modeling file has its own copy of the
vision position-id bug; the reference is corrected as for Idefics3 (tests/reference.py).
A video reaches the model as frames on the image axis, one tile each (`video_frames`).
"""
import json

import mindspore as ms
import numpy as np
import pytest

from conftest import relative_l2
from inputs import make_batch, reference_logits
from mindone_idefics3 import Idefics3ForConditionalGeneration
from mindone_idefics3.config import Idefics3Config

TOL = 1e-5

CASES = {
    "text_only": dict(images_per_row=[0], text_lens=[20]),
    "one_image": dict(images_per_row=[1], text_lens=[12]),
    "several_images": dict(images_per_row=[3], text_lens=[10], partial={(0, 2): (20, 12)}),
    "video_frames": dict(images_per_row=[8], text_lens=[9]),
    "padded_batch_mixing_them": dict(images_per_row=[0, 2, 8], text_lens=[15, 6, 4], partial={(1, 1): (17, 9)}),
}


@pytest.fixture(scope="module")
def model(ckpt_smolvlm, ms_cpu):
    return Idefics3ForConditionalGeneration.from_pretrained(ckpt_smolvlm.path, dtype=ms.float32)


def test_the_checkpoint_is_a_smolvlm_one(ckpt_smolvlm, model):
    assert json.loads((ckpt_smolvlm.path / "config.json").read_text())["model_type"] == "smolvlm"
    assert type(ckpt_smolvlm.reference).__name__ == "SmolVLMForConditionalGeneration"
    assert model.config.model_type == "smolvlm"


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_smolvlm_reference(ckpt_smolvlm, model, case):
    rng = np.random.default_rng(sum(map(ord, case)))
    ids, mask, pv, pam = make_batch(ckpt_smolvlm, rng=rng, **CASES[case])
    ours = model(input_ids=ids, attention_mask=mask, pixel_values=pv, pixel_attention_mask=pam).logits.asnumpy()
    ref = reference_logits(ckpt_smolvlm, ids, mask, pv, pam)
    real = mask.astype(bool)
    assert np.isfinite(ours).all()
    assert relative_l2(ours[real], ref[real]) < TOL


@pytest.mark.parametrize("case", ["one_image", "padded_batch_mixing_them"])
def test_greedy_ids_equal_smolvlm_reference(ckpt_smolvlm, model, case):
    import torch

    from reference import corrected_position_ids

    rng = np.random.default_rng(sum(map(ord, case)) + 1)
    ids, mask, pv, pam = make_batch(ckpt_smolvlm, rng=rng, **CASES[case])
    ours = model.generate(ids, mask, pv, pam, max_new_tokens=24, eos_token_id=[])
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if pv is not None:
        kwargs.update(pixel_values=torch.tensor(pv), pixel_attention_mask=torch.tensor(pam).bool())
    with torch.no_grad(), corrected_position_ids():
        ref = ckpt_smolvlm.reference.generate(**kwargs, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                              pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_smolvlm_config_reads_as_idefics3_with_its_model_type(ckpt_smolvlm):
    data = json.loads((ckpt_smolvlm.path / "config.json").read_text())
    smol = Idefics3Config.from_dict(data)
    idefics = Idefics3Config.from_dict({**data, "model_type": "idefics3"})
    assert (smol.model_type, idefics.model_type) == ("smolvlm", "idefics3")
    assert dict(smol.to_dict(), model_type="idefics3") == idefics.to_dict()


def test_converted_smolvlm_checkpoint_gives_the_same_logits(ckpt_smolvlm, model, tmp_path):
    from mindone_idefics3.convert import convert

    convert(str(ckpt_smolvlm.path), tmp_path / "out", dtype="fp32", fused=True, progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "smolvlm"
    converted = Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=ms.float32)
    ids, mask, pv, pam = make_batch(ckpt_smolvlm, [2], [7], np.random.default_rng(7))
    np.testing.assert_array_equal(converted(ids, mask, pv, pam).logits.asnumpy(),
                                  model(ids, mask, pv, pam).logits.asnumpy())


def test_a_long_video_goes_through_the_vision_tower_a_chunk_at_a_time(ckpt_smolvlm, model):
    """48 frames (as many as this checkpoint's 256-token context holds): each vision call sees `vision_chunk`
    tiles (1 on the CPU), and the logits equal the reference's whatever the chunk size."""
    ids, mask, pv, pam = make_batch(ckpt_smolvlm, [48], [6], np.random.default_rng(9))
    assert model.vision_chunks(pv, pam) == [(1, True)] * 48
    ref = reference_logits(ckpt_smolvlm, ids, mask, pv, pam)
    try:
        for chunk in (None, 16):
            model.model.vision_chunk = chunk
            ours = model(ids, mask, pv, pam).logits.asnumpy()
            assert relative_l2(ours, ref) < TOL
        assert len(model.vision_chunks(pv, pam)) == 3
    finally:
        model.model.vision_chunk = None
