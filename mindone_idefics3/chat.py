"""Conversations that keep their cache: a new turn prefills only what the KV cache does not hold already.

`ChatSession` keeps the token ids of the conversation so far, and their keys and values in the model's static KV
cache (one row, no padding: slot i holds token i). Each turn renders the whole conversation with the chat template
again, as a fresh run would; the longest common prefix of the new ids and the cached ones is kept — compared as
ids, since the ids generated for an answer and the same answer re-tokenized can differ, and never ending inside an
image — and only the rest is prefilled, with the images that lie in it (through the image-feature cache). So a
turn gives the answer a fresh run of the whole conversation gives, without paying for the conversation again.
"""
from __future__ import annotations

import time
from typing import Iterator, List, Optional, Sequence

import numpy as np
from mindspore import Tensor, ops

from .device import current_device
from .errors import Idefics3Error
from .generation import (PREFILL_BUCKET, GenerationStats, Sampler, cache_length, decode_steps, sampling_params,
                         stop_token_ids)
from .image_cache import DEFAULT_MB, ImageFeatureCache
from .prefix import image_spans, reusable_prefix
from .processing import load_image
from .processing.processor import ProcessorOutput
from .processing.tokenizer import IncrementalDetokenizer


class ChatSession:
    """A conversation with the model: `ask` / `stream` a turn, `messages` so far, `reset`, `last_stats`."""

    def __init__(self, model, processor, *, image_cache: Optional[ImageFeatureCache] = None, use_jit: bool = True,
                 **options):
        """options: `generate`'s (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        over the checkpoint's generation_config.json; greedy unless sampling is asked for. image_cache: where the
        images' features are kept (default: one of the device's default size for this session)."""
        self.model, self.processor, self.use_jit = model, processor, use_jit
        self.params = sampling_params(1, **{**model.generation_defaults(), **options})
        self.params.check()
        self.image_cache = image_cache if image_cache is not None else \
            ImageFeatureCache(DEFAULT_MB[current_device()] * 2**20)
        self.stop = np.array(stop_token_ids(model), np.int64)
        self.last_stats: Optional[GenerationStats] = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (and what the cache holds of it)."""
        self.messages: List[dict] = []  # the conversation in the chat template's message format
        self.images: list = []  # its images, in the order of its image items
        self._ids = np.zeros(0, np.int64)  # the tokens whose keys and values the cache holds (slot i = token i)
        self._spans: list = []  # their images' token spans (prefix.image_spans)
        self._caches = None  # the model's caches that hold them (LayerCaches; valid while their owner is self)

    def ask(self, text: str, images: Optional[Sequence] = None) -> str:
        """The answer to one more user turn (its images before its text), whole."""
        return "".join(self.stream(text, images)).strip()

    def stream(self, text: str, images: Optional[Sequence] = None) -> Iterator[str]:
        """The answer to one more user turn as text pieces while tokens arrive. The turn joins `messages` when the
        answer is complete; a turn that fails (a bad image, a conversation over the context) leaves the session as
        it was."""
        model, text_model = self.model, self.model.model.text_model
        images = [load_image(image) for image in images or ()]
        user = {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}
        messages, all_images = self.messages + [user], self.images + images
        inputs = self.processor.chat_inputs(messages, all_images)
        ids = inputs["input_ids"][0].astype(np.int64)
        n, budget = len(ids), self.params.max_new_tokens
        context = model.config.text_config.max_position_embeddings
        if n + budget > context:
            raise Idefics3Error(f"with this turn the conversation has {n} tokens; with max_new_tokens={budget} that "
                                f"is beyond the model's context of {context} tokens: reset the conversation, send "
                                "fewer or smaller images, or lower max_new_tokens")
        t0 = time.perf_counter()
        spans = image_spans(ids, model.config.image_token_id, model.config.image_seq_len,
                            (inputs.image_tiles or [[]])[0])
        reused = self._reusable(ids, spans)
        first_image = next((k for k, (start, _, _) in enumerate(spans) if start >= reused), len(spans))
        features, encoded = self.image_cache.features(model, _images_from(inputs, first_image), self.use_jit)
        embeds, _ = model.embed_prompt(ids[None, reused:].astype(np.int32), image_hidden_states=features)

        new = n - reused
        padded = -(-new // PREFILL_BUCKET) * PREFILL_BUCKET if self.use_jit else new  # one graph per bucket
        length = cache_length(max(reused + padded, n + budget))
        self._take_caches(length, reused)
        if padded > new:  # right padding: slots after the prompt, overwritten by the answer before it reads them
            embeds = ops.cat((embeds, ops.zeros((1, padded - new, embeds.shape[-1]), embeds.dtype)), axis=1)
        slots = np.arange(reused, reused + padded, dtype=np.int32)
        keep = Tensor(np.ones((1, text_model.cache_shape[1]), np.bool_))
        if self.use_jit:
            hidden = text_model.extend(embeds, Tensor(slots[None]), keep, Tensor(slots))
        else:
            hidden = text_model(embeds, Tensor(slots[None]), keep, Tensor(slots), "decode", False)
        logits = model.logits(hidden[:, new - 1:new])[:, -1]

        stats = GenerationStats(prompt_tokens=n, reused_tokens=reused, vision_tiles=encoded)
        steps = decode_steps(model, logits, keep, ids[None], np.array([[n]], np.int32), n, Sampler(self.params, 1),
                             self.stop, 0, self.use_jit, stats, t0)
        detok = IncrementalDetokenizer(self.processor.tokenizer, skip_special_tokens=True)
        answer_ids, stopped = [], False
        for step in steps:
            token = int(step.tokens[0])
            answer_ids.append(token)
            stopped = step.finished[0] == "stop"
            if not stopped:  # a stop token is not part of the answer
                piece = detok.add(token)
                if piece:
                    yield piece
        tail = detok.flush()
        if tail:
            yield tail
        answer = self.processor.decode(answer_ids[:-1] if stopped else answer_ids, skip_special_tokens=True).strip()
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.images = all_images
        self._ids = np.concatenate([ids, np.array(answer_ids[:-1], np.int64)])  # the last token was never fed
        self._spans = spans
        self.last_stats = stats

    def _reusable(self, ids: np.ndarray, spans) -> int:
        """How many leading tokens of `ids` the cache holds already (`prefix.reusable_prefix`: the session's own
        images, so they need no key)."""
        if self._caches is None or self._caches.owner is not self:
            return 0
        return reusable_prefix(self._ids, self._spans, ids, spans)

    def _take_caches(self, length: int, reused: int) -> None:
        """Make caches of at least `length` slots current for this session, with its first `reused` slots (a
        larger cache gets them copied from the one that held them)."""
        text_model = self.model.model.text_model
        old = self._caches if reused else None
        text_model.setup_caches(1, max(length, old.shape[1] if old is not None else 0))
        caches = text_model.caches
        if old is not None and caches is not old:
            caches.copy_from(old, reused)
        caches.owner = self
        self._caches, self._ids = caches, self._ids[:reused]


def _images_from(inputs: ProcessorOutput, first: int) -> ProcessorOutput:
    """The processor output's images from the `first`-th on (the ones a turn has to prefill)."""
    counts = (inputs.image_tiles or [[]])[0][first:]
    out = ProcessorOutput()
    if counts:
        skip = sum(inputs.image_tiles[0][:first])
        out["pixel_values"] = inputs["pixel_values"][:, skip:skip + sum(counts)]
        out["pixel_attention_mask"] = inputs["pixel_attention_mask"][:, skip:skip + sum(counts)]
        out.image_tiles = [counts]
    return out
