"""The batch loop: rows → prepared one by one → sorted by prompt length within a window → generated in batches
(the loop the server shares, `mindone_idefics3.runner`) → one record per row.

A window bounds what is prepared ahead (each prepared row holds its pixel tensors) and keeps the output roughly in
input order; sorting inside it gives a batch prompts of similar lengths, so left padding wastes little compute.
Sampled answers depend on the batch: its rows draw from one generator seeded by --seed, as `generate` does.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TypeVar

import numpy as np

from .. import runner
from ..errors import Idefics3Error
from ..generation import sampling_params
from ..image_cache import ImageFeatureCache
from .prepare import PreparedRow, prepare
from .records import Record
from .rows import InputRow, row_error

T = TypeVar("T")


def answer_rows(rows: Sequence[InputRow], processor, model, options: Dict[str, Any], batch_size: int, window: int,
                write: Callable[[List[Record]], None], image_cache: Optional[ImageFeatureCache] = None) -> None:
    """Hand `write` the records of `rows`: the error records of a window's broken rows, then each batch's records
    as soon as it is generated. options: `generate`'s keyword arguments (max_new_tokens, sampling). image_cache:
    where rows that share an image (in a batch or across batches) find its features."""
    context = model.config.text_config.max_position_embeddings
    for part in windows(rows, window):
        prepared = [prepare(row, processor, options["max_new_tokens"], context) for row in part]
        write([p for p in prepared if not isinstance(p, PreparedRow)])
        for batch in length_batches([p for p in prepared if isinstance(p, PreparedRow)], batch_size):
            write(run_batch(model, processor, batch, options, image_cache))


def windows(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def length_batches(prepared: Sequence[PreparedRow], batch_size: int) -> List[List[PreparedRow]]:
    """Batches of at most batch_size rows, longest prompts first (a batch that does not fit in memory fails at
    once, not after the short ones ran); ties keep input order."""
    ordered = sorted(prepared, key=lambda p: (-p.prompt_tokens, p.row.index))
    return [list(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]


class _Answer:
    """One row of a batch: its tokens as they come, then its record."""

    def __init__(self, prepared: PreparedRow, processor):
        self.prepared, self.processor, self.inputs = prepared, processor, prepared.inputs
        self.tokens: List[int] = []
        self.record: Optional[Record] = None

    @property
    def done(self) -> bool:
        return self.record is not None

    def add(self, token: int, finish_reason: Optional[str]) -> None:
        self.tokens.append(token)
        if finish_reason is not None:
            self.record = answer_record(self.prepared, np.array(self.tokens), finish_reason, self.processor)

    def fail(self, error: Exception) -> None:
        self.record = row_error(self.prepared.row, str(error))


def run_batch(model, processor, batch: Sequence[PreparedRow], options: Dict[str, Any],
              image_cache: Optional[ImageFeatureCache] = None) -> List[Record]:
    """Records for the rows of `batch`. A batch that generation refuses is retried row by row, so only the row at
    fault gets an error record."""
    answers = [_Answer(prepared, processor) for prepared in batch]
    params = sampling_params(len(batch), **{**model.generation_defaults(), **options})
    runner.run_batch(model, answers, processor.tokenizer.pad_token_id, sampling=params, recoverable=(Idefics3Error,),
                     image_cache=image_cache)
    return [answer.record for answer in answers]


def answer_record(prepared: PreparedRow, new_ids: np.ndarray, finish_reason: str, processor) -> Record:
    """The record of one row from its new tokens and why they ended: the answer is the text before the stop
    token, special tokens skipped, surrounding whitespace stripped; completion_tokens counts the stop token (it was
    generated)."""
    end = len(new_ids) - 1 if finish_reason == "stop" else len(new_ids)
    answer = processor.decode(new_ids[:end], skip_special_tokens=True).strip()
    return {"id": prepared.row.id, "answer": answer, "prompt_tokens": prepared.prompt_tokens,
            "completion_tokens": int(len(new_ids)), "finish_reason": finish_reason}
