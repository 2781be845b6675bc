"""Generation: prefill once (vision + prompt into a static KV cache), then one compiled decode step per token.

Reads like gpt-fast: `setup_caches` → `prefill` → a plain loop over `decode_step` that only reads back the
sampled ids. Greedy decoding takes the argmax inside the compiled step; sampling (temperature / top-k / top-p /
repetition penalty) reads the step's fp32 logits back and samples on the host with a seeded numpy generator.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .errors import Idefics3Error
from .model.idefics3 import key_keep_or_none, position_ids_from_mask
from .runtime import jit_cell, synchronize

END_OF_UTTERANCE = "<end_of_utterance>"
CACHE_BUCKET = 64  # cache lengths are CACHE_BUCKET x a power of two, so compiled steps are reused
PREFILL_BUCKET = 64  # compiled prefills see prompt lengths rounded up to a multiple of this
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
    eou = end_of_utterance_id(model.model_dir)
    if eou is not None and eou not in ids:
        ids.append(eou)
    return ids


@functools.lru_cache(maxsize=16)
def end_of_utterance_id(model_dir: Optional[str]) -> Optional[int]:
    """The id of `<end_of_utterance>` from the checkpoint's tokenizer files, if any (read once per directory: a
    Llama 3 tokenizer.json is ~9 MB of JSON)."""
    if not model_dir:
        return None
    for name in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if name == "tokenizer.json":
            for tok in data.get("added_tokens", []):
                if tok.get("content") == END_OF_UTTERANCE:
                    return int(tok["id"])
        elif name == "added_tokens.json" and END_OF_UTTERANCE in data:
            return int(data[END_OF_UTTERANCE])
        elif name == "tokenizer_config.json":
            for tid, tok in data.get("added_tokens_decoder", {}).items():
                if tok.get("content") == END_OF_UTTERANCE:
                    return int(tid)
    return None


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

    @property
    def decode_tokens_per_second(self) -> float:
        """Steady-state decode speed (tokens per row per second), the first (compiling) step left out."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def decode_step_fn(model, greedy: bool, use_jit: bool) -> Callable:
    """The decode step for the model's current caches: compiled once per (cache shape, greedy) and kept with them."""
    steps = model.model.text_model.compiled_steps
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
            use_jit: bool = False, stats: Optional[GenerationStats] = None):
    """Set up a (B, cache_len) static cache; run vision + the whole prompt into its first `prompt_slots` slots.

    Returns the last position's logits (B, V) fp32 and the key mask (B, cache_len) bool the decode steps use:
    the (left-padded) prompt's mask, then every generated slot (causality keeps future slots out).
    """
    b, s = ids.shape
    text = model.model.text_model
    text.setup_caches(b, cache_len)
    t0 = time.perf_counter()
    embeds, _ = model.embed_prompt(ids, pixel_values, pixel_attention_mask, use_jit)
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
    return logits, Tensor(key_keep)


def generate_steps(model, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
                   max_new_tokens: int = 20, do_sample: RowOption = False, temperature: RowOption = 1.0,
                   top_k: RowOption = 0, top_p: RowOption = 1.0, repetition_penalty: float = 1.0,
                   eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
                   seed: RowOption = None, use_jit: bool = True,
                   stats: Optional[GenerationStats] = None) -> Iterator[np.ndarray]:
    """Yield the next token of every row, (B,) int64, until all rows stopped or max_new_tokens were made.

    Rows that already stopped yield the pad id. This is the loop under `generate` and `stream_generate`.
    do_sample, temperature, top_k, top_p and seed are one value for the batch, or a list with one value per row
    (a server's requests): each row is then sampled with its own options and its own seeded generator, so a
    sampled row draws the same numbers whatever else shares its batch; greedy rows take the argmax.
    """
    ids = model.check_input_ids(input_ids)
    per_row = any(isinstance(v, (list, tuple, np.ndarray)) for v in (do_sample, temperature, top_k, top_p, seed))
    if per_row:
        do_sample, temperature, top_k, top_p, seed = (
            _per_row(name, value, ids.shape[0]) for name, value in
            (("do_sample", do_sample), ("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
             ("seed", seed)))
        for t, k, p in zip(temperature, top_k, top_p):
            _check_sampling_args(max_new_tokens, t, k, p, repetition_penalty)
    else:
        _check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    mask = model.check_attention_mask(attention_mask, ids.shape)
    if (mask[:, -1] == 0).any():
        raise Idefics3Error("attention_mask has padding at the end of a row; generation needs left padding "
                            "(the processor pads on the left)")
    b, s = ids.shape
    context = model.config.text_config.max_position_embeddings
    if s + max_new_tokens > context:
        raise Idefics3Error(f"the prompt has {s} tokens; with max_new_tokens={max_new_tokens} that is "
                            f"{s + max_new_tokens}, beyond the model's context of {context} tokens: shorten the "
                            "prompt, use fewer/smaller images (a smaller longest_edge) or lower max_new_tokens")
    stop = np.array(stop_token_ids(model, eos_token_id), np.int64)
    pad = pad_token_id if pad_token_id is not None else model.generation_config.get(
        "pad_token_id", model.config.text_config.pad_token_id)
    pad = int(pad if pad is not None else (stop[0] if stop.size else 0))
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = s
    greedy = not any(do_sample if per_row else [do_sample]) and repetition_penalty == 1.0
    rngs = [np.random.default_rng(s) for s in seed] if per_row else None
    rng = None if per_row else np.random.default_rng(seed)

    t0 = time.perf_counter()
    first_slot = prompt_slots(s, use_jit)  # decode writes from here on
    cache_len = cache_length(first_slot + max_new_tokens)
    logits, key_keep = prefill(model, ids, mask, pixel_values, pixel_attention_mask, cache_len, use_jit, stats)
    sequences = ids.astype(np.int64)
    next_pos = mask.sum(-1).astype(np.int32)[:, None]  # (B, 1) rotary position of the next token
    finished = np.zeros(b, bool)
    step = decode_step_fn(model, greedy, use_jit)

    def from_logits(scores: np.ndarray) -> np.ndarray:
        scores = apply_repetition_penalty(scores, sequences, repetition_penalty)
        if per_row:
            out = scores.argmax(-1).astype(np.int64)
            for r in np.flatnonzero(do_sample):
                out[r] = sample(scores[r:r + 1], rngs[r], temperature[r], top_k[r], top_p[r])[0]
            return out
        if do_sample:
            return sample(scores, rng, temperature, top_k, top_p).astype(np.int64)
        return scores.argmax(-1).astype(np.int64)

    token = from_logits(logits.asnumpy())
    for t in range(max_new_tokens):
        token = np.where(finished, pad, token)
        if t == 0:
            stats.time_to_first_token = time.perf_counter() - t0
        finished |= np.isin(token, stop)
        sequences = np.concatenate([sequences, token[:, None]], axis=1)
        stats.new_tokens = t + 1
        stats.new_ids.append(token)
        yield token
        if finished.all() or t == max_new_tokens - 1:
            break
        t_step = time.perf_counter()
        out = step(Tensor(token[:, None].astype(np.int32)), Tensor(next_pos), Tensor([first_slot + t], ms.int32),
                   key_keep)
        token = out.asnumpy().astype(np.int64) if greedy else from_logits(out.asnumpy())
        elapsed = time.perf_counter() - t_step
        if t == 0:
            stats.first_step_seconds = elapsed
        else:
            stats.decode_seconds += elapsed
            stats.decode_steps += 1
        next_pos = next_pos + 1


def generate(model, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
             streamer=None, stats: Optional[GenerationStats] = None, **kwargs) -> np.ndarray:
    """The prompt followed by the new tokens, (B, S + new) int64, like transformers' generate.

    Each row stops at any stop id (eos + `<end_of_utterance>`) and is padded after it; generation ends when every
    row stopped or after max_new_tokens. `streamer` (optional) gets `put(tokens (B,))` per step and `end()`.
    """
    ids = model.check_input_ids(input_ids)
    new = []
    for token in generate_steps(model, ids, attention_mask, pixel_values, pixel_attention_mask, stats=stats,
                                **kwargs):
        new.append(token)
        if streamer is not None:
            streamer.put(token)
    if streamer is not None:
        streamer.end()
    new_ids = np.stack(new, axis=1) if new else np.zeros((ids.shape[0], 0), np.int64)
    return np.concatenate([ids.astype(np.int64), new_ids], axis=1)


def _per_row(name: str, value, rows: int) -> list:
    """A per-row option as a list of `rows` values (a scalar is repeated)."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        return [value] * rows
    if len(value) != rows:
        raise Idefics3Error(f"{name} has {len(value)} values for a batch of {rows} rows; give one value per row "
                            "or a single value")
    return list(value)


def _check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise Idefics3Error(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature <= 0:
        raise Idefics3Error(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    if top_k < 0:
        raise Idefics3Error(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise Idefics3Error(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise Idefics3Error(f"repetition_penalty must be > 0, got {repetition_penalty}")


def stream_generate(model, processor, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                    *, skip_special_tokens: bool = True, **kwargs) -> Iterator[str]:
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
    options = {**model.generation_defaults(), **kwargs}
    for token in generate_steps(model, ids, attention_mask, pixel_values, pixel_attention_mask, **options):
        piece = detok.add(int(token[0]))
        if piece:
            yield piece
    tail = detok.flush()
    if tail:
        yield tail
