"""Independent requests generated as one batch: the loop batch inference and the server share.

Each request is prepared alone (processor output of a batch of one) and brings its own row object that takes its
tokens as they come (`add(token, finish_reason)`) and its failure (`fail(error)`). The rows are collated into one
left-padded batch and run through `generate_steps`; each row is fed only its own new tokens, and the batch ends
when every row is done (finished, or given up by its owner — a server's client that went away). A batch that
fails before its first token is run again request by request, so that only the request at fault fails.

Greedy answers do not depend on the batch: each row is left-padded, its padding masked, its positions counted from
its own first token, so a row gives the same tokens in any batch as alone.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Optional, Protocol, Sequence, Tuple, Type, Union

import numpy as np

from .generation import SamplingParams, generate_steps
from .processing.collate import collate
from .processing.processor import ProcessorOutput


class Row(Protocol):
    inputs: Mapping[str, np.ndarray]  # the request's model inputs, a batch of one (processor output)
    params: SamplingParams
    done: bool  # finished, failed, or given up: the row takes no more tokens

    def add(self, token: int, finish_reason: Optional[str]) -> None:
        """The row's next token; finish_reason ("stop" / "length") when it is its last."""

    def fail(self, error: Exception) -> None:
        """Generation failed for this row."""


class _Filler:
    """A one-token row without an image that fills a batch up to a power of two; its output is not read."""

    done = False

    def __init__(self, pad_token_id: Optional[int]):
        self.inputs = ProcessorOutput(input_ids=np.full((1, 1), pad_token_id or 0, np.int64),
                                      attention_mask=np.ones((1, 1), np.int64))
        self.params = SamplingParams(max_new_tokens=1)

    def add(self, token: int, finish_reason: Optional[str]) -> None:
        self.done = finish_reason is not None

    def fail(self, error: Exception) -> None:
        self.done = True


def run_batch(model, rows: Sequence[Row], pad_token_id: Optional[int], *,
              sampling: Optional[SamplingParams] = None, recoverable: Tuple[Type[BaseException], ...] = (Exception,),
              pad_to_power_of_two: bool = False, on_start: Optional[Callable[[int], None]] = None,
              on_step: Optional[Callable[[], None]] = None, log: Optional[logging.Logger] = None) -> None:
    """Generate for `rows` as one batch; every row gets its tokens and its end, or `fail`.

    sampling: one SamplingParams for the whole batch (its rows draw from one generator, as `generate` does);
        None: each row's own `params`.
    recoverable: the errors after which a batch that has not produced a token is retried request by request;
        a single request that fails with one of them gets `fail(error)`; other errors propagate.
    pad_to_power_of_two: add filler rows up to the next power of two (fewer distinct shapes to compile).
    on_start(batch rows, fillers included) before each attempt; on_step() after each step's tokens were handed out.
    """
    started = [False]
    try:
        _generate(model, rows, pad_token_id, sampling, pad_to_power_of_two, on_start, on_step, started)
    except recoverable as e:
        if len(rows) > 1 and not started[0]:
            if log is not None:
                log.warning("batch of %d failed before its first token (%s: %s); retrying its requests one by one",
                            len(rows), type(e).__name__, e)
            for row in rows:
                run_batch(model, [row], pad_token_id, sampling=sampling, recoverable=recoverable,
                          pad_to_power_of_two=pad_to_power_of_two, on_start=on_start, on_step=on_step, log=log)
            return
        if log is not None:
            log.error("batch of %d failed", len(rows), exc_info=True)
        for row in rows:
            if not row.done:
                row.fail(e)


def _generate(model, rows: Sequence[Row], pad_token_id: Optional[int], sampling: Optional[SamplingParams],
              pad_to_power_of_two: bool, on_start, on_step, started: list) -> None:
    batch = list(rows)
    if pad_to_power_of_two:
        batch += [_Filler(pad_token_id) for _ in range((1 << (len(rows) - 1).bit_length()) - len(rows))]
    inputs = collate([row.inputs for row in batch], pad_token_id)
    params: Union[SamplingParams, list] = sampling if sampling is not None else [row.params for row in batch]
    if on_start is not None:
        on_start(len(batch))
    steps = generate_steps(model, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                           inputs.get("pixel_attention_mask"), params, use_jit=True)
    try:
        for step in steps:
            started[0] = True
            for r, row in enumerate(batch):
                if not row.done and step.live[r]:
                    row.add(int(step.tokens[r]), step.finished[r])
            if on_step is not None:
                on_step()
            if all(row.done for row in rows):
                break
    finally:
        steps.close()
