"""The batch loop: rows → prepared one by one → sorted within a window → generated in batches → records out."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

from .prepare import PreparedRow, prepare
from .records import Record
from .rows import InputRow
from .runner import run_batch
from .schedule import length_batches, windows


def answer_rows(rows: Sequence[InputRow], processor, model, options: Dict[str, Any], batch_size: int, window: int,
                write: Callable[[List[Record]], None]) -> None:
    """Hand `write` the records of `rows`: the error records of a window's broken rows, then each batch's records
    as soon as it is generated. options: `generate`'s keyword arguments (max_new_tokens, sampling)."""
    context = model.config.text_config.max_position_embeddings
    for part in windows(rows, window):
        prepared = [prepare(row, processor, options["max_new_tokens"], context) for row in part]
        write([p for p in prepared if not isinstance(p, PreparedRow)])
        for batch in length_batches([p for p in prepared if isinstance(p, PreparedRow)], batch_size):
            write(run_batch(model, processor, batch, options))
