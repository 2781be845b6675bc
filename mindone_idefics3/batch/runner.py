"""A batch of prepared rows through the shared batch loop (`mindone_idefics3.runner`), back to one output record
per row. (Sampled answers depend on the batch: the rows draw from one generator seeded by --seed, as `generate`
does for a batch.)"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import runner
from ..errors import Idefics3Error
from ..generation import sampling_params
from .prepare import PreparedRow
from .records import Record
from .rows import row_error


class _Answer:
    """One row of a batch: its tokens as they come, then its record."""

    def __init__(self, prepared: PreparedRow, processor):
        self.prepared, self.processor = prepared, processor
        self.inputs = prepared.inputs
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


def run_batch(model, processor, batch: Sequence[PreparedRow], options: Dict[str, Any]) -> List[Record]:
    """Records for the rows of `batch`. A batch that generation refuses is retried row by row, so only the row at
    fault gets an error record. options: `generate`'s keyword options (max_new_tokens, sampling)."""
    answers = [_Answer(prepared, processor) for prepared in batch]
    params = sampling_params(len(batch), **{**model.generation_defaults(), **options})
    runner.run_batch(model, answers, processor.tokenizer.pad_token_id, sampling=params, recoverable=(Idefics3Error,))
    return [answer.record for answer in answers]


def answer_record(prepared: PreparedRow, new_ids: np.ndarray, finish_reason: str, processor) -> Record:
    """The record of one row from its new tokens and why they ended: the answer is the text before the stop
    token, special tokens skipped, surrounding whitespace stripped; completion_tokens counts the stop token (it was
    generated)."""
    end = len(new_ids) - 1 if finish_reason == "stop" else len(new_ids)
    answer = processor.decode(new_ids[:end], skip_special_tokens=True).strip()
    return {"id": prepared.row.id, "answer": answer, "prompt_tokens": prepared.prompt_tokens,
            "completion_tokens": int(len(new_ids)), "finish_reason": finish_reason}
