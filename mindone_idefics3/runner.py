"""Independent requests generated as one batch: the loop batch inference and the server share.

Each request is prepared alone (the processor's output for a batch of one) and comes as a row object: `inputs`,
`params` (its SamplingParams), `done`, `add(token, finish_reason)` for each of its new tokens, `fail(error)`. The
rows are collated into one left-padded batch; each row is fed only its own tokens, and the batch ends when every
row is done (finished, or given up by its owner: a server's client that went away). Greedy answers do not depend
on the batch: padding is masked and each row's positions count from its own first token.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence, Tuple, Type

import numpy as np

from .generation import SamplingParams, generate_steps
from .image_cache import ImageFeatureCache
from .processing.collate import collate
from .processing.processor import ProcessorOutput


def run_batch(model, rows: Sequence, pad_token_id: Optional[int], *, sampling: Optional[SamplingParams] = None,
              recoverable: Tuple[Type[BaseException], ...] = (Exception,), pad_to_power_of_two: bool = False,
              image_cache: Optional[ImageFeatureCache] = None, on_start: Optional[Callable[[int], None]] = None,
              on_step: Optional[Callable[[], None]] = None, log: Optional[logging.Logger] = None) -> None:
    """Generate for `rows` as one batch; every row gets its tokens up to its end, or `fail`.

    sampling: one SamplingParams for the whole batch (its rows draw from one generator, as `generate` does); None:
        each row's own `params`.
    recoverable: errors after which a batch that has not produced a token yet runs again request by request, so
        that only the request at fault fails (its row gets `fail(error)`); other errors propagate.
    pad_to_power_of_two: filler rows (one token, no image, output unread) up to the next power of two, so fewer
        batch shapes are compiled.
    image_cache: where the rows' image features are looked up (and kept) instead of running every image through
        the vision tower; None: the vision tower runs on every image of the batch.
    on_start(rows in the batch, fillers included) before each attempt; on_step() after each step's tokens.
    """
    inputs = [row.inputs for row in rows]
    params = [row.params for row in rows] if sampling is None else sampling
    if pad_to_power_of_two:
        fillers = (1 << (len(rows) - 1).bit_length()) - len(rows)
        inputs += [ProcessorOutput(input_ids=np.full((1, 1), pad_token_id or 0, np.int64),
                                   attention_mask=np.ones((1, 1), np.int64))] * fillers
        params = params if sampling is not None else params + [SamplingParams(max_new_tokens=1)] * fillers
    started = False
    try:
        batch = collate(inputs, pad_token_id)
        if on_start is not None:
            on_start(len(inputs))
        features = None if image_cache is None else image_cache.features(model, batch)[0]
        steps = generate_steps(model, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                               batch.get("pixel_attention_mask"), params, use_jit=True, image_hidden_states=features)
        try:
            for step in steps:
                started = True
                for r, row in enumerate(rows):
                    if not row.done and step.live[r]:
                        row.add(int(step.tokens[r]), step.finished[r])
                if on_step is not None:
                    on_step()
                if all(row.done for row in rows):
                    break
        finally:
            steps.close()
    except recoverable as e:
        if len(rows) > 1 and not started:
            if log is not None:
                log.warning("batch of %d failed before its first token (%s: %s); retrying its requests one by one",
                            len(rows), type(e).__name__, e)
            for row in rows:
                run_batch(model, [row], pad_token_id, sampling=sampling, recoverable=recoverable,
                          pad_to_power_of_two=pad_to_power_of_two, image_cache=image_cache, on_start=on_start,
                          on_step=on_step, log=log)
            return
        if log is not None:
            log.error("batch of %d failed", len(rows), exc_info=True)
        for row in rows:
            if not row.done:
                row.fail(e)
