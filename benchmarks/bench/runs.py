"""One timed generate() call, on our side or transformers': greedy, exactly `new_tokens` tokens (no stop ids on
either side), a clock on every new token, the peak memory of the call.

    run = measure(lambda clock: ours_generate(model, inputs, new_tokens, clock), new_tokens, device)
    run = measure(lambda clock: reference_generate(ref, torch_inputs, new_tokens, pad_id, clock), new_tokens)

TTFT = call start → first new token on the host; tokens/s = (new tokens − 2) / (2nd → last token): the first
token comes from the prefill, the first decode step (which may compile) is left out.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

from mindone_idefics3.process import peak_rss_bytes

from .memory import device_peak_mb, reset_peak, rss_mb


class TokenClock:
    """A streamer for both sides' generate(): when each new token (a (B,) vector) reached the host. transformers
    also puts the prompt, (B, S), first: ignored."""

    def __init__(self):
        self.times: List[float] = []

    def put(self, value) -> None:
        if len(getattr(value, "shape", (0,))) == 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class Run:
    ttft: float
    tokens_per_second: float  # per sequence
    new_ids: np.ndarray  # (B, new_tokens)
    peak_rss_mb: float  # the process's peak during the call
    peak_above_baseline_mb: float  # that peak minus the RSS just before the call
    details: dict = field(default_factory=dict)  # what the call reported besides its ids
    device_peak_mb: Optional[float] = None


def measure(call: Callable[[TokenClock], Tuple[np.ndarray, dict]], new_tokens: int, device: str = "CPU") -> Run:
    """Run `call(clock)` → (new ids, details) once, timing its tokens and its peak memory."""
    clock = TokenClock()
    baseline = rss_mb()
    reset_peak(device)
    t0 = time.perf_counter()
    new_ids, details = call(clock)
    if len(clock.times) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} new tokens, got {len(clock.times)}")
    peak = peak_rss_bytes() / 2**20
    return Run(ttft=clock.times[0] - t0, tokens_per_second=(new_tokens - 2) / (clock.times[-1] - clock.times[1]),
               new_ids=new_ids, peak_rss_mb=peak, peak_above_baseline_mb=peak - baseline, details=details,
               device_peak_mb=device_peak_mb(device))


def exact_length(model):
    """Our model with no stop ids at all: eos_token_id=[] still stops on `<end_of_utterance>` when the checkpoint's
    tokenizer has it (read from model_dir), so the model forgets its directory."""
    model.model_dir = None
    return model


def ours_generate(model, inputs: dict, new_tokens: int, clock: TokenClock, use_jit: bool = True):
    """Our greedy generate() on processor-style inputs (numpy); call on an `exact_length` model."""
    from mindone_idefics3.generation import GenerationStats

    stats = GenerationStats()
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0,
                         eos_token_id=[], use_jit=use_jit, stats=stats, streamer=clock)
    return out[:, inputs["input_ids"].shape[1]:], dict(first_decode_step_s=stats.first_step_seconds)


def load_models(checkpoint, dtype: str, device: str, threads: int, reference: bool,
                attn_implementation: Optional[str] = None):
    """Our model (`exact_length`) and, with `reference`, transformers' (eval mode, `attn_implementation` or its
    default) from the same files, each timed with the RSS it added. Selects our device first (on the CPU with
    $MINDONE_CPU_THREADS kernel threads) and gives torch `threads`. Returns (ours, theirs or None, facts)."""
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.device import select_device

    select_device(device)
    rss0, t = rss_mb(), time.perf_counter()
    model = exact_length(Idefics3ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype, progress=False))
    facts = dict(load_s=round(time.perf_counter() - t, 2), load_rss_mb=round(rss_mb() - rss0))
    if not reference:
        return model, None, facts
    import torch
    from transformers import Idefics3ForConditionalGeneration as Reference

    torch.set_num_threads(threads)
    options = {} if attn_implementation is None else dict(attn_implementation=attn_implementation)
    rss0, t = rss_mb(), time.perf_counter()
    ref = Reference.from_pretrained(str(checkpoint), **options, dtype={
        "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]).eval()
    facts.update(ref_load_s=round(time.perf_counter() - t, 2), ref_load_rss_mb=round(rss_mb() - rss0),
                 torch_threads=torch.get_num_threads(), ref_attention=ref.config._attn_implementation)
    return model, ref, facts


def reference_generate(ref, inputs: dict, new_tokens: int, pad_id: int, clock: TokenClock):
    """transformers' greedy generate() on torch inputs, no stop ids, its vision position ids corrected as in
    tests/reference.py so the ids can be compared."""
    import torch

    from tests.reference import corrected_position_ids

    with torch.inference_mode(), corrected_position_ids():
        out = ref.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                           eos_token_id=None, pad_token_id=pad_id, streamer=clock)
    return out[:, inputs["input_ids"].shape[1]:].numpy(), {}


def summary(runs: List[Run], prefix: str = "") -> dict:
    """Medians of TTFT and tokens/s (with min/max), the largest peaks."""
    tps = [r.tokens_per_second for r in runs]
    out = {f"{prefix}tokens_per_s": round(statistics.median(tps), 3), f"{prefix}tokens_per_s_min": round(min(tps), 3),
           f"{prefix}tokens_per_s_max": round(max(tps), 3),
           f"{prefix}ttft_s": round(statistics.median(r.ttft for r in runs), 4),
           f"{prefix}peak_rss_mb": round(max(r.peak_rss_mb for r in runs)),
           f"{prefix}peak_above_baseline_mb": round(max(r.peak_above_baseline_mb for r in runs))}
    if runs[0].device_peak_mb is not None:
        out[f"{prefix}peak_device_memory_mb"] = round(max(r.device_peak_mb for r in runs))
    for key in runs[0].details:
        out[f"{prefix}{key}"] = round(statistics.median(r.details[key] for r in runs), 4)
    return out


def leading_equal(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading new tokens agree in every row."""
    differ = (a != b).any(axis=0)
    return int(differ.argmax()) if differ.any() else int(a.shape[1])
