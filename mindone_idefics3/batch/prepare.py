"""One row → model inputs of its own (a batch of one), or the reason it cannot run.

Everything a row can get wrong by itself surfaces here, before it shares a batch with others: an image that is
missing or does not decode, a template that refuses the conversation, `<image>` tags that do not match the
images, a prompt that leaves no room for --max-new-tokens in the model's context. Such a row becomes an error
record; the others go on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..errors import Idefics3Error
from ..processing import load_image
from ..processing.processor import Idefics3Processor, ProcessorOutput
from .records import Record
from .rows import InputRow, row_error


@dataclass
class PreparedRow:
    row: InputRow
    inputs: ProcessorOutput  # the processor's output for this row alone (numpy, batch of one)

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


def prepare(row: InputRow, processor: Idefics3Processor, max_new_tokens: int,
            context: int) -> Union[PreparedRow, Record]:
    """The row's inputs, or its error record."""
    try:
        images = [load_image(src) for src in row.images]
        videos = [processor.load_video(src) for src in row.videos]
        inputs = processor.chat_inputs(row.messages, images, videos)
    except Idefics3Error as e:
        return row_error(row, str(e))
    prepared = PreparedRow(row, inputs)
    if prepared.prompt_tokens + max_new_tokens > context:
        return row_error(row, f"the prompt has {prepared.prompt_tokens} tokens; with --max-new-tokens "
                              f"{max_new_tokens} that is beyond the model's context of {context} tokens (use fewer "
                              "or smaller images: --longest-edge, --no-image-splitting; fewer video frames; or a shorter "
                              "prompt)")
    return prepared
