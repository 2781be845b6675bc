"""One batch from prompts processed one at a time: the padding the processor applies to a batch, after the fact.

Processing each prompt alone lets a caller measure and sort prompts (and catch a bad one) before it chooses which
prompts share a batch; `collate` then gives exactly what `processor(text=[...], images=[[...], ...])` returns for
those prompts: ids padded on the left (generation needs it), and pixel tensors zero-padded to the batch's most
images and largest tile (pixel mask 0 there), as the image processor pads a batch.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from ..errors import Idefics3Error
from .processor import ProcessorOutput


def collate(samples: Sequence[Mapping[str, np.ndarray]], pad_token_id: Optional[int]) -> ProcessorOutput:
    """samples: processor outputs of one prompt each (return_tensors="np": input_ids (1, S), attention_mask
    (1, S), and pixel_values (1, I, 3, H, W) + pixel_attention_mask (1, I, H, W) when it has images)."""
    if not samples:
        raise Idefics3Error("collate needs at least one sample")
    lengths = [s["input_ids"].shape[1] for s in samples]
    longest = max(lengths)
    if pad_token_id is None and min(lengths) < longest:
        raise Idefics3Error("padding needs a pad token and the tokenizer has none; add \"pad_token\" to "
                            "tokenizer_config.json or pass pad_token=... when loading the processor")
    ids = np.full((len(samples), longest), pad_token_id or 0, np.int64)
    mask = np.zeros((len(samples), longest), np.int64)
    for b, sample in enumerate(samples):
        ids[b, longest - lengths[b]:] = sample["input_ids"][0]
        mask[b, longest - lengths[b]:] = sample["attention_mask"][0]
    out = ProcessorOutput(input_ids=ids, attention_mask=mask)
    with_images = [s for s in samples if s.get("pixel_values") is not None]
    if not with_images:
        return out
    count = max(s["pixel_values"].shape[1] for s in with_images)
    height = max(s["pixel_values"].shape[3] for s in with_images)
    width = max(s["pixel_values"].shape[4] for s in with_images)
    pixel_values = np.zeros((len(samples), count, 3, height, width), np.float32)
    pixel_mask = np.zeros((len(samples), count, height, width), np.int64)
    for b, sample in enumerate(samples):
        if sample.get("pixel_values") is None:
            continue
        _, i, _, h, w = sample["pixel_values"].shape
        pixel_values[b, :i, :, :h, :w] = sample["pixel_values"][0]
        pixel_mask[b, :i, :h, :w] = sample["pixel_attention_mask"][0]
    out["pixel_values"], out["pixel_attention_mask"] = pixel_values, pixel_mask
    known = [getattr(s, "image_tiles", None) for s in samples]  # None: a plain dict that does not tell
    out.image_tiles = [None if tiles is None else list(tiles[0]) for tiles in known]
    return out
