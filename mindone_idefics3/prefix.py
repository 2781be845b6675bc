"""Which leading tokens of a new prompt can be taken from keys and values computed for an earlier one.

One rule for a conversation's next turn (chat.py) and for a server request that meets a parked row
(continuous.py): the longest common prefix of the token ids — compared as ids, since the ids generated for an
answer and the same answer re-tokenized by the chat template can differ — where an image counts as equal only when
it is the same image at the same place (compared by a key, a hash of its pixels: every image's tokens are the same
`<image>` id), and a match never ends inside an image (its features attend to each other: a part is not reusable).
At least one token is left to run: its logits give the first new token.
"""
from __future__ import annotations

from typing import Hashable, List, Optional, Sequence, Tuple

import numpy as np

Span = Tuple[int, int, Optional[Hashable]]  # (first, last + 1) token position of an image's tokens, and its key


def image_spans(ids: np.ndarray, image_token_id: int, image_seq_len: int, tiles_per_image: Sequence[int],
                keys: Optional[Sequence[Hashable]] = None) -> List[Span]:
    """The span of each image's `<image>` tokens in `ids` (1-D), in order, with its key (None: no key, the images
    are known to be the same ones, as in a conversation that only ever appends)."""
    positions = np.flatnonzero(ids == image_token_id)
    spans, start = [], 0
    for i, tiles in enumerate(tiles_per_image):
        count = tiles * image_seq_len
        spans.append((int(positions[start]), int(positions[start + count - 1]) + 1, None if keys is None else keys[i]))
        start += count
    return spans


def reusable_prefix(cached_ids: np.ndarray, cached_spans: Sequence[Span], ids: np.ndarray,
                    spans: Sequence[Span]) -> int:
    """How many leading tokens of `ids` the cached tokens (`cached_ids`, their images `cached_spans`) give."""
    limit = min(len(cached_ids), len(ids) - 1)
    if limit <= 0:
        return 0
    differ = np.flatnonzero(np.asarray(cached_ids[:limit]) != np.asarray(ids[:limit]))
    same = int(differ[0]) if differ.size else limit
    cached = {start: (end, key) for start, end, key in cached_spans}
    for start, end, key in spans:
        if start >= same:
            break
        if same < end or cached.get(start) != (end, key):  # ends inside the image, or another image is cached there
            return start
    return same
