"""A batch of prepared rows through `generate`, back to one output record per row.

Greedy answers do not depend on the batch: each row is left-padded, its padding masked, its positions counted from
its own first token, so a row gives the same tokens in any batch as alone. (Sampled answers do depend on it: the
random draws of a step are shared out over the batch's rows.)
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from ..errors import Idefics3Error
from ..generation import stop_token_ids
from ..processing.collate import collate
from .prepare import PreparedRow
from .records import Record
from .rows import row_error


def run_batch(model, processor, batch: Sequence[PreparedRow], options: Dict[str, Any]) -> List[Record]:
    """Records for the rows of `batch`. A batch that `generate` refuses is retried row by row, so only the row at
    fault gets an error record."""
    try:
        return _generate(model, processor, batch, options)
    except Idefics3Error as e:
        if len(batch) == 1:
            return [row_error(batch[0].row, str(e))]
    records = []
    for prepared in batch:
        records += run_batch(model, processor, [prepared], options)
    return records


def _generate(model, processor, batch: Sequence[PreparedRow], options: Dict[str, Any]) -> List[Record]:
    inputs = collate([p.inputs for p in batch], processor.tokenizer.pad_token_id)
    prompt_len = inputs["input_ids"].shape[1]
    new_ids = model.generate(**inputs, **options)[:, prompt_len:]
    stops = np.array(stop_token_ids(model), np.int64)
    return [answer_record(p, new_ids[b], stops, processor) for b, p in enumerate(batch)]


def answer_record(prepared: PreparedRow, new_ids: np.ndarray, stops: np.ndarray, processor) -> Record:
    """The record of one row from its new tokens (padded after its stop token): the answer is the text before
    the stop token, special tokens skipped, surrounding whitespace stripped; completion_tokens counts the stop
    token (it was generated)."""
    stopped = np.flatnonzero(np.isin(new_ids, stops))
    if stopped.size:
        end, completion, reason = int(stopped[0]), int(stopped[0]) + 1, "stop"
    else:
        end = completion = int(new_ids.size)
        reason = "length"
    answer = processor.decode(new_ids[:end], skip_special_tokens=True).strip()
    return {"id": prepared.row.id, "answer": answer, "prompt_tokens": prepared.prompt_tokens,
            "completion_tokens": completion, "finish_reason": reason}
