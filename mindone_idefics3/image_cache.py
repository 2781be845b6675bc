"""The image-feature cache: the vision tower's output for each image seen, so that an image sent again skips it.

Vision is most of the time to first token (a 13-tile photo: seconds on the CPU), and the same image comes back
often: a second question about a photo, several questions about one page, two clients sending the same picture.

An entry is one image's connector features, (tiles, image_seq_len, text hidden). Its key is a hash of what the
vision tower sees — the image's tiles as the processor made them (pixels and pixel mask, which carry every
processor setting: resizing, splitting, tile size) — and of the model (`model.weights_id`: checkpoint, dtype,
adapter); never a file name or URL, so a different picture under the same name is a different entry. Features are
a function of the tiles alone (a tile attends only to itself), so a hit gives the very features a fresh run
computes. Entries are kept least recently used first out, within `max_bytes` (0: nothing kept).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import List, Optional, Tuple

import numpy as np
from mindspore import Tensor, ops

from .errors import Idefics3Error

DEFAULT_MB = {"CPU": 512, "Ascend": 2048}  # host RAM beside the model on the CPU; device memory on Ascend


class ImageFeatureCache:
    """LRU of image features by image content, bounded in bytes. `hits` and `misses` count images."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise Idefics3Error(f"the image cache size must be >= 0 MB (0 = off), got {max_bytes / 2**20:g}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: "OrderedDict[bytes, Tensor]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def features(self, model, inputs, use_jit: bool = True) -> Tuple[Optional[Tensor], int]:
        """(the features of every image of `inputs`, in the order of their tiles — what `embed_prompt` takes as
        image_hidden_states —, the number of tiles run through the vision tower). None without images.

        inputs: processor output (or collated rows): pixel_values (B, I, 3, H, W), pixel_attention_mask and the
        `image_tiles` of each row (without it, each row's tiles count as one image)."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return None, 0
        pixel_values = np.asarray(pixel_values)
        mask = inputs.get("pixel_attention_mask")
        mask = np.ones(pixel_values.shape[:2] + pixel_values.shape[3:], np.int64) if mask is None else np.asarray(mask)
        images = list(_images(pixel_values, mask, getattr(inputs, "image_tiles", None)))
        if not images:
            return None, 0
        # off: every image is encoded (as without a cache); on: an image twice in one call is encoded once
        keys = [self._key(model, tiles, keep) if self.max_bytes else i for i, (tiles, keep) in enumerate(images)]
        found = [self._get(key) for key in keys]
        todo = {}  # key → the first image to encode for it
        for i, key in enumerate(keys):
            if found[i] is None:
                todo.setdefault(key, i)
        self.hits += len(images) - len(todo)
        self.misses += len(todo)
        encoded = 0
        if todo:
            tiles = np.concatenate([images[i][0] for i in todo.values()])[None]
            keep = np.concatenate([images[i][1] for i in todo.values()])[None]
            new = model.get_image_features(tiles, keep, use_jit)
            encoded, start, computed = new.shape[0], 0, {}
            for key, i in todo.items():
                n = len(images[i][0])
                computed[key] = new[start:start + n]
                start += n
                self._put(key, computed[key])
            found = [computed[key] if f is None else f for f, key in zip(found, keys)]
        return (found[0] if len(found) == 1 else ops.cat(found, axis=0)), encoded

    def images(self, model, inputs) -> List[Tuple[bytes, np.ndarray, np.ndarray]]:
        """(key, tiles, pixel mask) of each image of `inputs` (as `features` reads them), in order: for callers that
        run the vision tower themselves, in pieces (continuous batching), with `lookup` and `store`. The key is
        computed even when the cache keeps nothing (it also names the image in a prompt prefix)."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return []
        pixel_values = np.asarray(pixel_values)
        mask = inputs.get("pixel_attention_mask")
        mask = np.ones(pixel_values.shape[:2] + pixel_values.shape[3:], np.int64) if mask is None else np.asarray(mask)
        return [(self._key(model, tiles, keep), tiles, keep)
                for tiles, keep in _images(pixel_values, mask, getattr(inputs, "image_tiles", None))]

    def lookup(self, key: bytes, count_miss: bool = True) -> Optional[Tensor]:
        """An image's features by its key (counted as a hit), or None (a miss; count_miss=False: not counted yet,
        for a caller that looks again before computing the features)."""
        found = self._get(key) if self.max_bytes else None
        if found is None:
            self.misses += count_miss
        else:
            self.hits += 1
        return found

    def store(self, key: bytes, features: Tensor) -> None:
        """Keep an image's features (what `lookup` missed and the caller computed)."""
        if self.max_bytes:
            self._put(key, features)

    def _key(self, model, tiles: np.ndarray, keep: np.ndarray) -> bytes:
        """A hash of the image's tiles and pixel mask, their shapes and the model's weights."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(str(getattr(model, "weights_id", id(model))).encode())
        digest.update(repr((tiles.shape, str(tiles.dtype), keep.shape)).encode())
        digest.update(np.ascontiguousarray(tiles).data)
        digest.update(np.ascontiguousarray(keep, dtype=np.bool_).data)
        return digest.digest()

    def _get(self, key) -> Optional[Tensor]:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def _put(self, key, features: Tensor) -> None:
        size = features.nbytes
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
        self._entries[key] = features
        self.bytes += size


def _images(pixel_values: np.ndarray, mask: np.ndarray, image_tiles: Optional[List[List[int]]]):
    """(tiles (n, 3, H, W), pixel mask (n, H, W)) of each image, row by row; a row's zero padding left out."""
    for b in range(pixel_values.shape[0]):
        counts = image_tiles[b] if image_tiles is not None else None
        if counts is None:  # no tile counts: the row's real tiles as one image
            real = int((~np.all(pixel_values[b] == 0, axis=(1, 2, 3))).sum())
            counts = [real] if real else []
        start = 0
        for n in counts:
            yield pixel_values[b, start:start + n], mask[b, start:start + n]
            start += n
