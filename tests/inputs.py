"""Random model inputs shaped like the processor's output, and the reference's logits for them."""
from __future__ import annotations

import numpy as np

from conftest import IMAGE_TOKEN


def make_batch(ckpt, images_per_row, text_lens, rng, *, partial=None, image_size=None):
    """Left-padded prompts with `images_per_row[b]` image tiles each, zero padding images, random pixels.

    partial: {(row, image): (valid_h, valid_w)} — pixels outside the top-left valid block are zeroed and masked,
    as the processor pads smaller images.
    Returns input_ids (B, S) int64, attention_mask (B, S), pixel_values (B, I, 3, H, W) or None, pixel mask.
    """
    size = image_size or ckpt.image_size
    n_img = max(images_per_row)
    rows = []
    for b, (k, n_text) in enumerate(zip(images_per_row, text_lens)):
        text = list(rng.integers(3, IMAGE_TOKEN - 1, size=n_text))
        ids = text[: n_text // 2]
        for _ in range(k):
            ids += [IMAGE_TOKEN] * ckpt.image_seq_len + list(rng.integers(3, IMAGE_TOKEN - 1, size=2))
        rows.append(ids + text[n_text // 2:])
    s = max(map(len, rows))
    input_ids = np.zeros((len(rows), s), np.int64)
    mask = np.zeros((len(rows), s), np.int64)
    for b, ids in enumerate(rows):
        input_ids[b, s - len(ids):] = ids
        mask[b, s - len(ids):] = 1
    if n_img == 0:
        return input_ids, mask, None, None
    pv = np.zeros((len(rows), n_img, 3, size, size), np.float32)
    pam = np.zeros((len(rows), n_img, size, size), np.int64)
    for b, k in enumerate(images_per_row):
        for i in range(k):
            vh, vw = (partial or {}).get((b, i), (size, size))
            pv[b, i, :, :vh, :vw] = rng.standard_normal((3, vh, vw))
            pam[b, i, :vh, :vw] = 1
    return input_ids, mask, pv, pam


def reference_logits(ckpt, input_ids, mask, pv=None, pam=None):
    """transformers' logits with the corrected vision position ids and mask-derived rotary positions."""
    import torch

    from reference import corrected_position_ids

    position_ids = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)
    kwargs = dict(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(position_ids))
    if pv is not None:
        kwargs.update(pixel_values=torch.tensor(pv), pixel_attention_mask=torch.tensor(pam).bool())
    with torch.no_grad(), corrected_position_ids():
        return ckpt.reference(**kwargs).logits.float().numpy()
