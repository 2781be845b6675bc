"""`model(..., labels=...).loss` against transformers' `Idefics3ForConditionalGeneration(..., labels=...)`."""
import numpy as np
import pytest

from conftest import relative_l2
from inputs import make_batch


def _labels(input_ids, mask, rng, image_token):
    """Random -100 holes, -100 on padding and image tokens (what the finetune collator makes)."""
    labels = np.where(rng.random(input_ids.shape) < 0.3, -100, input_ids)
    return np.where((mask == 0) | (input_ids == image_token), -100, labels)


def _reference_loss(ckpt, ids, mask, pv, pam, labels, num_items=None):
    import torch

    from reference import corrected_position_ids

    position_ids = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(position_ids), labels=torch.tensor(labels))
    if pv is not None:
        kwargs.update(pixel_values=torch.tensor(pv), pixel_attention_mask=torch.tensor(pam).bool())
    if num_items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(num_items)
    with torch.no_grad(), corrected_position_ids():
        return float(ckpt.reference(**kwargs).loss)


@pytest.mark.parametrize("images,text_lens", [((2, 1, 0), (5, 9, 12)), ((0, 0), (7, 11))],
                         ids=["left-padded-several-images", "text-only"])
def test_loss_equals_transformers(ckpt_a, ms_cpu, images, text_lens):
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from conftest import IMAGE_TOKEN

    rng = np.random.default_rng(7)
    ids, mask, pv, pam = make_batch(ckpt_a, images, text_lens, rng, partial={(0, 1): (16, 20)})
    labels = _labels(ids, mask, rng, IMAGE_TOKEN)
    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt_a.path, progress=False)
    out = model(ids, mask, pv, pam, labels=labels, return_logits=True)
    ref = _reference_loss(ckpt_a, ids, mask, pv, pam, labels)
    assert abs(float(out.loss) - ref) / abs(ref) < 1e-5
    # the same loss from the full logits (the scored-rows shortcut changes nothing)
    logits = out.logits.asnumpy()[:, :-1].astype(np.float64)
    target = labels[:, 1:]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, np.where(target < 0, 0, target)[..., None], -1)[..., 0]
    assert abs(-(picked * (target >= 0)).sum() / (target >= 0).sum() - ref) / abs(ref) < 1e-5
    # a global token count divides the sum (accumulation / workers), as transformers' num_items_in_batch
    n = int((target >= 0).sum()) * 3
    out = model(ids, mask, pv, pam, labels=labels, num_items_in_batch=n)
    ref_n = _reference_loss(ckpt_a, ids, mask, pv, pam, labels, n)
    assert abs(float(out.loss) - ref_n) / abs(ref_n) < 1e-5
    assert out.logits is None


def test_logits_unchanged_without_labels(ckpt_b, ms_cpu):
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from inputs import reference_logits

    rng = np.random.default_rng(3)
    ids, mask, pv, pam = make_batch(ckpt_b, (1, 2), (6, 3), rng)
    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt_b.path, progress=False)
    assert relative_l2(model(ids, mask, pv, pam).logits.asnumpy(), reference_logits(ckpt_b, ids, mask, pv, pam)) \
        < 1e-5
