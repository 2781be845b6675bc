"""Which rows share a batch: rows are taken in windows, sorted by prompt length inside a window and cut into
batches, so a batch's prompts have similar lengths and left padding wastes little compute.

A window bounds what is prepared ahead (each prepared row holds its pixel tensors) and keeps the output roughly in
input order; the final file is in input order anyway.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, TypeVar

from .prepare import PreparedRow

T = TypeVar("T")


def windows(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def length_batches(prepared: Sequence[PreparedRow], batch_size: int) -> List[List[PreparedRow]]:
    """Batches of at most batch_size rows, longest prompts first (a batch that does not fit in memory fails at
    once, not after the short ones ran); ties keep input order."""
    ordered = sorted(prepared, key=lambda p: (-p.prompt_tokens, p.row.index))
    return [list(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]
