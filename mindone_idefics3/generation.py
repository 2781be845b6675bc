"""Generation: prefill once (vision + prompt into a static KV cache), then one compiled decode step per token.

Reads like gpt-fast: `setup_caches` → `prefill` → a plain loop over `decode_step` that only reads back the
sampled ids. Greedy decoding takes the argmax inside the compiled step; sampling (temperature / top-k / top-p /
repetition penalty) reads the step's fp32 logits back and samples on the host with a seeded numpy generator.

Decoding lives here whole: compiled steps, cache and prompt buckets, stop ids, per-row `SamplingParams`, and
`generate_steps`, the loop of the command line, batch inference and the server. The model class inherits
`generate` from `GenerationMixin` (as transformers' models do), so this module never imports the model: it uses
the one it is handed (`embed_prompt`, `logits`, `model.text_model`'s caches and forward, its configs).
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .errors import Idefics3Error
from .ops.attention import key_keep_or_none
from .ops.rope import position_ids_from_mask
from .processing.tokenizer import added_token_id
from .runtime import jit_cell, synchronize

END_OF_UTTERANCE = "<end_of_utterance>"
CACHE_BUCKET = 64  # cache lengths are CACHE_BUCKET x a power of two, so compiled steps are reused
# Compiled prefills see prompt lengths rounded up to a multiple of this; the model's chunked prefill cuts prompts
# into multiples of it (model/llama.py), so every bucketed prompt can be chunked.
PREFILL_BUCKET = 64
RowOption = Union[float, int, bool, None, Sequence]  # one value for the batch, or one per row


# ----------------------------------------------------------------------------------------------- sampling
def apply_repetition_penalty(logits: np.ndarray, sequences: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' rule: scores of tokens already in the sequence are divided (if > 0) or multiplied by it."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, seq in zip(logits, sequences):
        seen = np.unique(seq)
        scores = row[seen]
        row[seen] = np.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def top_k_top_p_filter(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Set to -inf every logit outside the top-k, then outside the smallest set whose probability exceeds top_p
    (the most likely token is always kept). logits: (B, V) fp32."""
    logits = logits.astype(np.float32, copy=True)
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, -1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        # drop a token when the tokens before it already cover top_p
        drop_sorted = (np.cumsum(probs, -1) - probs) >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits[drop] = -np.inf
    return logits


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """One token per row from (B, V) logits."""
    logits = top_k_top_p_filter(logits / max(temperature, 1e-5), top_k, top_p)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    u = rng.random((logits.shape[0], 1))
    return np.minimum((np.cumsum(probs, -1) < u).sum(-1), logits.shape[-1] - 1)


# ----------------------------------------------------------------------------------------------- stop ids
def stop_token_ids(model, eos_token_id: Union[int, Sequence[int], None] = None) -> List[int]:
    """`eos_token_id` (or generation_config.json's, else config's) plus `<end_of_utterance>` when the tokenizer
    has it: Idefics3-8B ends its turns with it but does not list it as eos."""
    eos = eos_token_id
    if eos is None:
        eos = model.generation_config.get("eos_token_id", model.config.text_config.eos_token_id)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    eou = added_token_id(model.model_dir, END_OF_UTTERANCE)
    if eou is not None and eou not in ids:
        ids.append(eou)
    return ids


# ----------------------------------------------------------------------------------------------- the step
class DecodeStep(nn.Cell):
    """One token per row through the decoder against the static cache → argmax ids (greedy) or fp32 logits."""

    def __init__(self, model, greedy: bool, compiled: bool):
        super().__init__()
        self.lm = model
        self.greedy, self.in_graph = greedy, compiled

    def construct(self, token: Tensor, position: Tensor, slot: Tensor, key_keep: Tensor):
        text = self.lm.model.text_model
        hidden = text(text.embed_tokens(token), position, key_keep, slot, "decode", self.in_graph)
        logits = self.lm.logits(hidden)[:, -1]
        if self.greedy:
            return ops.argmax(logits, -1).astype(ms.int32)
        return logits


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds: vision + prefill + the first token
    vision_seconds: float = 0.0  # the image tiles through the vision tower and connector (compiling included)
    prefill_seconds: float = 0.0  # the prompt through the decoder into the cache (compiling included)
    first_step_seconds: float = 0.0  # the first decode step (includes compiling it, when not cached yet)
    decode_seconds: float = 0.0  # the decode steps after the first
    decode_steps: int = 0
    new_ids: List[np.ndarray] = field(default_factory=list)  # each step's new tokens, (B,) int64
    vision_tiles: int = 0  # image tiles run through the vision tower (not those found in an image-feature cache)
    reused_tokens: int = 0  # prompt tokens whose keys and values were in the cache already (a conversation)

    @property
    def decode_tokens_per_second(self) -> float:
        """Steady-state decode speed (tokens per row per second), the first (compiling) step left out."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


# The compiled steps of each set of caches (`LayerCaches`), as long as the model keeps those caches.
_compiled_steps: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_steps(model) -> dict:
    """The decode steps made against the model's current caches: {(greedy, use_jit): step}."""
    return _compiled_steps.setdefault(model.model.text_model.caches, {})


def decode_step_fn(model, greedy: bool, use_jit: bool) -> Callable:
    """The decode step for the model's current caches: compiled once per (cache shape, greedy) and kept with them."""
    steps = compiled_steps(model)
    key = (greedy, use_jit)
    if key not in steps:
        cell = DecodeStep(model, greedy, compiled=use_jit)
        steps[key] = jit_cell(cell) if use_jit else cell
    return steps[key]


def cache_length(slots: int) -> int:
    """Cache slots for `slots` tokens: CACHE_BUCKET × the next power of two. Prompts of varying lengths (a batch
    run) then share a few cache shapes, each compiled once (the model keeps the last few, see
    LlamaModel.setup_caches); decode reads at most twice the slots it needs (Ascend's kernel skips the unused
    tail)."""
    buckets = -(-slots // CACHE_BUCKET)
    return CACHE_BUCKET * (1 << (buckets - 1).bit_length())


def prompt_slots(prompt_len: int, use_jit: bool) -> int:
    """Cache slots a prompt takes: compiled prefills see lengths rounded up to PREFILL_BUCKET (extra left padding,
    masked), so one graph serves every prompt length of a bucket."""
    return -(-prompt_len // PREFILL_BUCKET) * PREFILL_BUCKET if use_jit else prompt_len


def prefill(model, ids: np.ndarray, mask: np.ndarray, pixel_values, pixel_attention_mask, cache_len: int,
            use_jit: bool = False, stats: Optional[GenerationStats] = None, image_hidden_states=None):
    """Set up a (B, cache_len) static cache; run vision + the whole prompt into its first `prompt_slots` slots.

    Returns the last position's logits (B, V) fp32 and the key mask (B, cache_len) bool the decode steps use:
    the (left-padded) prompt's mask, then every generated slot (causality keeps future slots out).
    image_hidden_states: the image features, computed already (the vision tower does not run).
    """
    b, s = ids.shape
    text = model.model.text_model
    text.setup_caches(b, cache_len)
    text.caches.owner = None  # what a conversation kept in these caches is overwritten (see chat.py)
    t0 = time.perf_counter()
    embeds, features = model.embed_prompt(ids, pixel_values, pixel_attention_mask, use_jit, image_hidden_states)
    if stats is not None:
        synchronize(embeds)  # wait for the vision tower, so the two phases are timed apart
    t1 = time.perf_counter()
    slots = prompt_slots(s, use_jit)
    if slots > s:  # more left padding: masked keys, and their rows' outputs are never read
        embeds = ops.cat((ops.zeros((b, slots - s, embeds.shape[-1]), embeds.dtype), embeds), axis=1)
        mask = np.concatenate([np.zeros((b, slots - s), mask.dtype), mask], axis=1)
    key_keep = np.ones((b, cache_len), bool)
    key_keep[:, :slots] = mask.astype(bool)
    args = (embeds, Tensor(position_ids_from_mask(mask)), key_keep_or_none(mask),
            Tensor(np.arange(slots, dtype=np.int32)))
    hidden = text.prefill(*args) if use_jit else text(*args, "fill", False)
    logits = model.logits(hidden[:, -1:])[:, -1]
    if stats is not None:
        synchronize(logits)
        stats.vision_seconds, stats.prefill_seconds = t1 - t0, time.perf_counter() - t1
        stats.vision_tiles = 0 if features is None or image_hidden_states is not None else features.shape[0]
    return logits, Tensor(key_keep)


# ----------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded (vLLM's `SamplingParams`, transformers' names): greedy unless do_sample."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        """Whether the row's token is the argmax of its plain logits (taken inside the compiled step)."""
        return not self.do_sample and self.repetition_penalty == 1.0

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 0:
            raise Idefics3Error(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if self.temperature <= 0:
            raise Idefics3Error(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.top_k < 0:
            raise Idefics3Error(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise Idefics3Error(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise Idefics3Error(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def sampling_params(rows: int, *, max_new_tokens: int = 20, repetition_penalty: float = 1.0,
                    **row_options: RowOption) -> Union[SamplingParams, List[SamplingParams]]:
    """`generate`'s keyword options as SamplingParams: one for the batch when every option is one value, else one
    per row (do_sample, temperature, top_k, top_p and seed may each be one value or a list of one per row)."""
    common = SamplingParams(max_new_tokens, repetition_penalty=repetition_penalty)
    lists = {name: value for name, value in row_options.items() if isinstance(value, (list, tuple, np.ndarray))}
    if not lists:
        return replace(common, **row_options)
    for name, value in lists.items():
        if len(value) != rows:
            raise Idefics3Error(f"{name} has {len(value)} values for a batch of {rows} rows; give one value per row "
                                "or a single value")
    return [replace(common, **{name: value[r] if name in lists else value for name, value in row_options.items()})
            for r in range(rows)]


class Sampler:
    """Each row's next token from its logits, as its SamplingParams say. One SamplingParams for the batch: the rows
    draw from one generator seeded by it, in row order (as one batched draw would); one per row (a server's
    requests): each row from its own generator, so a seeded row draws the same numbers whatever shares its batch."""

    def __init__(self, params: Union[SamplingParams, Sequence[SamplingParams]], rows: int):
        shared = isinstance(params, SamplingParams)
        self.rows = [params] * rows if shared else list(params)
        if len(self.rows) != rows:
            raise Idefics3Error(f"{len(self.rows)} SamplingParams for a batch of {rows} rows; give one per row")
        for row in self.rows:
            row.check()
        generator = np.random.default_rng(params.seed) if shared else None
        self.generators = [generator or np.random.default_rng(row.seed) for row in self.rows]
        self.greedy = all(row.greedy for row in self.rows)

    def __call__(self, logits: np.ndarray, sequences: np.ndarray) -> np.ndarray:
        """(B, V) fp32 logits and the (B, S) ids so far → (B,) int64."""
        out = np.empty(len(self.rows), np.int64)
        for r, (row, rng) in enumerate(zip(self.rows, self.generators)):
            scores = apply_repetition_penalty(logits[r:r + 1], sequences[r:r + 1], row.repetition_penalty)
            if row.do_sample:
                out[r] = sample(scores, rng, row.temperature, row.top_k, row.top_p)[0]
            else:
                out[r] = scores[0].argmax()
        return out


# ----------------------------------------------------------------------------------------------- the loop
@dataclass
class Step:
    """One decode step of a batch, each row's view of it.

    tokens (B,) int64: each row's new token (the pad id for rows that had finished before this step); live (B,)
    bool: the rows whose token is new; finished: per row, why it ended at this step — "stop" (a stop token, which
    is its last token) or "length" (its max_new_tokens) — or None."""

    tokens: np.ndarray
    live: np.ndarray
    finished: List[Optional[str]]


def generate_steps(model, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                   params: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams(), *,
                   eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
                   use_jit: bool = True, stats: Optional[GenerationStats] = None,
                   image_hidden_states=None) -> Iterator[Step]:
    """Yield each decode step of the batch until every row finished: a row ends at any stop id (eos +
    `<end_of_utterance>`) or after its own max_new_tokens. This is the loop under `generate`, `stream_generate`,
    batch inference and the server.

    params: one SamplingParams for the batch, or one per row (see `Sampler`). image_hidden_states: the features
    of the images' real tiles, computed already (an image-feature cache): the vision tower does not run.
    """
    ids = model.check_input_ids(input_ids)
    b, s = ids.shape
    sampler = Sampler(params, b)
    limits = np.array([row.max_new_tokens for row in sampler.rows], np.int64)
    longest = int(limits.max())
    mask = model.check_attention_mask(attention_mask, ids.shape)
    if (mask[:, -1] == 0).any():
        raise Idefics3Error("attention_mask has padding at the end of a row; generation needs left padding "
                            "(the processor pads on the left)")
    context = model.config.text_config.max_position_embeddings
    if s + longest > context:
        raise Idefics3Error(f"the prompt has {s} tokens; with max_new_tokens={longest} that is "
                            f"{s + longest}, beyond the model's context of {context} tokens: shorten the "
                            "prompt, use fewer/smaller images (a smaller longest_edge), fewer video frames (max_frames, fps) or "
                            "lower max_new_tokens")
    stop = np.array(stop_token_ids(model, eos_token_id), np.int64)
    pad = pad_token_id if pad_token_id is not None else model.generation_config.get(
        "pad_token_id", model.config.text_config.pad_token_id)
    pad = int(pad if pad is not None else (stop[0] if stop.size else 0))
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = s

    t0 = time.perf_counter()
    first_slot = prompt_slots(s, use_jit)  # decode writes from here on
    cache_len = cache_length(first_slot + longest)
    logits, key_keep = prefill(model, ids, mask, pixel_values, pixel_attention_mask, cache_len, use_jit, stats,
                               image_hidden_states)
    yield from decode_steps(model, logits, key_keep, ids.astype(np.int64), mask.sum(-1).astype(np.int32)[:, None],
                            first_slot, sampler, stop, pad, use_jit, stats, t0)


def decode_steps(model, logits: Tensor, key_keep: Tensor, sequences: np.ndarray, next_pos: np.ndarray,
                 first_slot: int, sampler: Sampler, stop: np.ndarray, pad: int, use_jit: bool,
                 stats: GenerationStats, t0: float) -> Iterator[Step]:
    """The decode loop after a prefill: the first token from the prefill's last logits (B, V), then one compiled
    step per token, writing slot first_slot + t; yields every Step until each row ended (see generate_steps).
    sequences (B, S): the ids so far (repetition penalty); next_pos (B, 1): the next token's rotary position."""
    limits = np.array([row.max_new_tokens for row in sampler.rows], np.int64)
    ended = limits == 0
    step = decode_step_fn(model, sampler.greedy, use_jit)
    token = sampler(logits.asnumpy(), sequences)
    for t in range(int(limits.max())):
        token = np.where(ended, pad, token)
        if t == 0:
            stats.time_to_first_token = time.perf_counter() - t0
        stopped = ~ended & np.isin(token, stop)
        out_of_room = ~ended & ~stopped & (t + 1 >= limits)
        finished = ["stop" if a else "length" if o else None for a, o in zip(stopped, out_of_room)]
        sequences = np.concatenate([sequences, token[:, None]], axis=1)
        stats.new_tokens = t + 1
        stats.new_ids.append(token)
        yield Step(token, ~ended, finished)
        ended = ended | stopped | out_of_room
        if ended.all():
            break
        t_step = time.perf_counter()
        out = step(Tensor(token[:, None].astype(np.int32)), Tensor(next_pos), Tensor([first_slot + t], ms.int32),
                   key_keep)
        token = out.asnumpy().astype(np.int64) if sampler.greedy else sampler(out.asnumpy(), sequences)
        elapsed = time.perf_counter() - t_step
        if t == 0:
            stats.first_step_seconds = elapsed
        else:
            stats.decode_seconds += elapsed
            stats.decode_steps += 1
        next_pos = next_pos + 1


def generate(model, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
             streamer=None, stats: Optional[GenerationStats] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             use_jit: bool = True, image_hidden_states=None, **options) -> np.ndarray:
    """The prompt followed by the new tokens, (B, S + new) int64, like transformers' generate.

    options: max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed (see `sampling_params`:
    one value, or one per row for the sampling ones). Each row stops at any stop id (eos + `<end_of_utterance>`)
    and is padded after it; generation ends when every row stopped or after max_new_tokens. `streamer` (optional)
    gets `put(tokens (B,))` per step and `end()`. image_hidden_states: the image features, computed already.
    """
    ids = model.check_input_ids(input_ids)
    params = sampling_params(ids.shape[0], **options)
    new = []
    for step in generate_steps(model, ids, attention_mask, pixel_values, pixel_attention_mask, params,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_jit=use_jit, stats=stats,
                               image_hidden_states=image_hidden_states):
        new.append(step.tokens)
        if streamer is not None:
            streamer.put(step.tokens)
    if streamer is not None:
        streamer.end()
    new_ids = np.stack(new, axis=1) if new else np.zeros((ids.shape[0], 0), np.int64)
    return np.concatenate([ids.astype(np.int64), new_ids], axis=1)


def stream_generate(model, processor, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                    *, skip_special_tokens: bool = True, stats: Optional[GenerationStats] = None,
                    eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
                    use_jit: bool = True, image_hidden_states=None, **options) -> Iterator[str]:
    """Yield the answer to one prompt as text pieces while tokens arrive.

    Pieces never split a multi-byte character and concatenate to `processor.batch_decode(new_ids,
    skip_special_tokens=...)`. Options as in `generate` (and the checkpoint's generation_config.json defaults).
    """
    from .processing.tokenizer import IncrementalDetokenizer

    ids = model.check_input_ids(input_ids)
    if ids.shape[0] != 1:
        raise Idefics3Error(f"stream_generate streams one prompt, got a batch of {ids.shape[0]}; use "
                            "generate(..., streamer=...) for batches")
    detok = IncrementalDetokenizer(processor.tokenizer, skip_special_tokens=skip_special_tokens)
    params = sampling_params(1, **{**model.generation_defaults(), **options})
    for step in generate_steps(model, ids, attention_mask, pixel_values, pixel_attention_mask, params,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_jit=use_jit, stats=stats,
                               image_hidden_states=image_hidden_states):
        piece = detok.add(int(step.tokens[0]))
        if piece:
            yield piece
    tail = detok.flush()
    if tail:
        yield tail


class GenerationMixin:
    """`generate` as a method of the model class (transformers' layout: the model class inherits it)."""

    GENERATION_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty")

    def generate(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, **kwargs):
        """Prompt + new tokens, (B, S + new) int64; see `mindone_idefics3.generation.generate` for the options
        (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, seed, streamer).
        Options not given come from the checkpoint's generation_config.json."""
        return generate(self, input_ids, attention_mask, pixel_values, pixel_attention_mask,
                        **{**self.generation_defaults(), **kwargs})

    def generation_defaults(self) -> dict:
        """The checkpoint's generation_config.json values of GENERATION_OPTIONS that are set."""
        return {k: self.generation_config[k] for k in self.GENERATION_OPTIONS
                if self.generation_config.get(k) is not None}
