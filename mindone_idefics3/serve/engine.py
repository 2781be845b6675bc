"""The engine: one worker thread owns the model; requests wait in a queue and run on it.

Scheduling, continuous (the default): the rows of one static KV cache are slots (`mindone_idefics3.continuous`). A
request joins the running batch between two decode steps — its vision and prefill run in bounded pieces, one piece
per step, so the running rows keep streaming — and leaves when it ends; its row then stays parked, and a request
whose prompt begins the same way (a conversation's next turn, another question about the same picture) takes that
row and prefills only the rest. Everything this compiles is compiled at start-up (`warm_up`; `/health` reports
ready after it), so requests joining and leaving compile nothing.

Scheduling, static (`--scheduler static`, for comparison): when the worker is free it takes up to
`max_batch_size` waiting requests and runs them as one left-padded batch to the end (`mindone_idefics3.runner`);
requests that arrive meanwhile wait for the whole batch.

Either way rows stop independently — at a stop token, a `stop` string, their own `max_tokens`, or when their
client went away —, a greedy answer is the answer the request gets alone, and sampled rows draw from their own
seeded generator. Images are looked up in the engine's image-feature cache (by their pixels).

The HTTP layer talks to the engine through `submit` (a thread-safe queue of jobs) and each job's asyncio queue of
events (`Delta`, `Finished`, `Failed`), which the worker fills with `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Deque, List, Optional

from .. import runner
from ..continuous import ContinuousBatch
from ..generation import SamplingParams, cache_length, stop_token_ids
from ..processing.tokenizer import IncrementalDetokenizer
from .errors import APIError
from .metrics import Metrics
from .prepare import PreparedRequest

log = logging.getLogger("mindone_idefics3.serve")

# events a job may have waiting for its client (a token's text each): a client that stops reading its stream
# makes the HTTP side stop taking them; past this the row is cancelled rather than the buffer growing (room
# for a healthy client whose event loop stalls for a moment while its row runs fast)
MAX_BUFFERED_EVENTS = 1024
MAX_GATHER_SECONDS = 2.0  # how long a new batch waits at most for requests on their way (see Engine._gather)
GATHER_QUIET_SECONDS = 0.05  # ... and how long after the last arrival when none is being prepared


# ----------------------------------------------------------------------------------------------- events
@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


class Job:
    """One request on its way through the engine. Its events wait in a bounded queue (`max_events`): when the
    client does not take them (it stopped reading its stream), the job is cancelled — its row is freed at the next
    step — and the queue is replaced by one Failed event, so neither the engine nor memory waits on a client."""

    def __init__(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop,
                 max_events: int = MAX_BUFFERED_EVENTS):
        self.prepared = prepared
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue(maxsize=max_events + 1)  # + the Failed that ends an overflow
        self.max_events = max_events
        self.cancelled = threading.Event()
        self.overflowed = False
        self.submitted = time.perf_counter()

    def post(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self._put, event)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody listens
            pass

    def _put(self, event) -> None:
        """On the event loop's thread (where the queue's size is exact)."""
        if self.overflowed:
            return
        if self.events.qsize() < self.max_events:
            self.events.put_nowait(event)
            return
        self.overflowed = True
        self.cancel()
        while not self.events.empty():
            self.events.get_nowait()
        self.events.put_nowait(Failed(f"the client did not read its answer: more than {self.max_events} events "
                                      "were waiting for it, so the request was cancelled"))
        log.warning("a client stopped reading its stream: %d events waiting; request cancelled", self.max_events)

    def cancel(self) -> None:
        """The client went away: the worker frees the row at its next step."""
        self.cancelled.set()


# ----------------------------------------------------------------------------------------------- a row
class Row:
    """A job's row in the running batch (a row of `runner.run_batch`): detokenizes its tokens, applies its stop
    strings, posts the text as it becomes final."""

    def __init__(self, job: Job, tokenizer, metrics: Metrics):
        self.job, self.metrics = job, metrics
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.stops = job.prepared.stop
        self.text = ""
        self.sent = 0  # characters of self.text already posted
        self.count = 0  # tokens generated
        self.done = False

    @property
    def inputs(self):
        return self.job.prepared.inputs

    @property
    def params(self) -> SamplingParams:
        return replace(self.job.prepared.sampling, max_new_tokens=self.job.prepared.max_tokens)

    def add(self, token: int, finish_reason: Optional[str]) -> None:
        """The row's next token (generation says when it is its last: a stop id, or max_tokens); a row whose client
        went away is freed instead."""
        if self.job.cancelled.is_set():
            return self.cancel()
        if self.count == 0:
            self.metrics.ttft.observe(time.perf_counter() - self.job.submitted)
        self.count += 1
        if finish_reason == "stop":  # a stop id: not part of the text
            self.text += self.detok.flush()
            return self._finish("stop")
        self.text += self.detok.add(token)
        if finish_reason == "length":
            self.text += self.detok.flush()
        if self._cut_at_stop_string():
            return self._finish("stop")
        if finish_reason == "length":
            return self._finish("length")
        self._post(len(self.text) - self._held_back())

    def cancel(self) -> None:
        self.done = True
        self.metrics.finished.labels("cancelled").inc()
        self.metrics.completion_tokens.inc(self.count)

    def fail(self, error: Exception) -> None:
        self.done = True
        self.metrics.finished.labels("error").inc()
        self.job.post(Failed(f"generation failed: {type(error).__name__}: {error}"))

    def _cut_at_stop_string(self) -> bool:
        if not self.stops:
            return False
        start = max(0, self.sent - max(map(len, self.stops)))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def _held_back(self) -> int:
        """Characters at the end of the text that may be the start of a stop string: not posted yet."""
        held = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _post(self, end: int) -> None:
        if end > self.sent:
            self.job.post(Delta(self.text[self.sent:end]))
            self.sent = end

    def _finish(self, reason: str) -> None:
        self._post(len(self.text))
        self.done = True
        now = time.perf_counter()
        self.metrics.finished.labels(reason).inc()
        self.metrics.completion_tokens.inc(self.count)
        self.metrics.latency.observe(now - self.job.submitted)
        self.job.post(Finished(reason, self.job.prepared.prompt_tokens, self.count))


# ----------------------------------------------------------------------------------------------- the engine
class Engine:
    """Owns the model on one worker thread. `load` runs on that thread; `ready` is set once the model answers."""

    def __init__(self, load: Callable[[], tuple], *, max_batch_size: int = 8, max_queue: int = 64,
                 pad_batch_to_power_of_two: bool = True, metrics: Optional[Metrics] = None,
                 scheduler: str = "continuous", max_model_len: Optional[int] = None, warmup: bool = True):
        """load: () -> (model, processor, image cache) on the worker thread (MindSpore is set up there, and the
        device the model landed on sizes the cache). The processor decodes the answers; requests are prepared
        elsewhere (see prepare.py). The image cache (an ImageFeatureCache, or None: none) lets a request whose
        image was seen before skip the vision tower. scheduler: "continuous" or "static" (see the module);
        max_model_len: the prompt + answer tokens a row holds (continuous; default the model's context);
        warmup: compile before reporting ready (continuous)."""
        if scheduler not in ("continuous", "static"):
            raise ValueError(f"scheduler must be 'continuous' or 'static', got {scheduler!r}")
        self._load = load
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.scheduler, self.max_model_len, self.warmup = scheduler, max_model_len, warmup
        self.batch: Optional[ContinuousBatch] = None
        self.pad_batch = pad_batch_to_power_of_two
        self.metrics = metrics or Metrics()
        self.model = self.processor = self.image_cache = None
        self.ready = threading.Event()
        self.load_error: Optional[str] = None
        self._waiting: Deque[Job] = deque()
        self._preparing = 0  # requests being prepared on the HTTP side, soon to be submitted
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="idefics3-engine", daemon=True)

    # ------------------------------------------------------------------------------------------- HTTP side
    def start(self) -> None:
        self._thread.start()

    def check_accepting(self) -> None:
        """Raise the 503 a request gets now: still loading, stopping, or the queue is full."""
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if not self.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly", code="loading",
                           headers={"Retry-After": "5"})
        if self._stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if len(self._waiting) + self._preparing >= self.max_queue:
            raise APIError(503, f"the server is busy: {self.max_queue} requests are already waiting (--max-queue); "
                                "retry later", code="queue_full", headers={"Retry-After": "1"})

    def begin_preparing(self) -> None:
        with self._cond:
            self.check_accepting()
            self._preparing += 1
            self._cond.notify_all()

    def submit(self, prepared: Optional[PreparedRequest], loop: asyncio.AbstractEventLoop) -> Optional[Job]:
        """Queue a prepared request (None: its preparation failed) and end its 'preparing' state."""
        with self._cond:
            self._preparing -= 1
            if prepared is None:
                self._cond.notify_all()
                return None
            if self._stopping:
                self._cond.notify_all()
                raise APIError(503, "the server is shutting down", code="shutting_down",
                               headers={"Retry-After": "5"})
            job = Job(prepared, loop)
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify_all()
            return job

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running batch, fail what still waits, end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------------------------------- worker
    def _main(self) -> None:
        try:
            self.model, self.processor, self.image_cache = self._load()
        except Exception as e:  # noqa: BLE001 - reported through /health and every request
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("model load failed:\n%s", traceback.format_exc())
            return
        if self.scheduler == "continuous":
            try:
                self._start_continuous()
            except Exception as e:  # noqa: BLE001 - reported through /health and every request
                self.load_error = f"warm-up failed: {type(e).__name__}: {e}"
                log.error("warm-up failed:\n%s", traceback.format_exc())
                return
            self.ready.set()
            self._run_continuous()
        else:
            self.ready.set()
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                self.run_batch(batch)
        with self._cond:
            for job in self._waiting:
                job.post(Failed("the server shut down before this request ran"))
            self._waiting.clear()

    # ------------------------------------------------------------------------------------------- continuous
    def _start_continuous(self) -> None:
        """The rows (`max_batch_size` of `max_model_len` slots, a cache bucket) and, unless told not to, the
        compilation of everything they use."""
        model = self.model
        context = model.config.text_config.max_position_embeddings
        length = cache_length(min(self.max_model_len or context, context))
        self.batch = ContinuousBatch(model, self.max_batch_size, length, stop_token_ids(model),
                                     image_cache=self.image_cache, log=log)
        if self.warmup:
            from tqdm import tqdm

            started = time.perf_counter()
            plan = self.batch.warm_up_plan()
            for kind, n in tqdm(plan, desc="warming up (compiling)", unit="graph", file=sys.stderr,
                                disable=None):
                self.batch.warm_up_one(kind, n)
            self.metrics.warmup_seconds.set(time.perf_counter() - started)
            log.info("warm-up: %d graphs compiled in %.1f s", len(plan), time.perf_counter() - started)

    def _run_continuous(self) -> None:
        """Until stopped with nothing left: let waiting requests start joining while there is room, run one piece
        of a joining request, one decode step of the running rows."""
        batch, metrics = self.batch, self.metrics
        while True:
            jobs = []
            with self._cond:
                while not self._waiting and batch.idle() and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting and batch.idle():
                    return
                while self._waiting and len(jobs) < batch.max_joining - len(batch.joins):
                    job = self._waiting.popleft()
                    if job.cancelled.is_set():
                        self.metrics.finished.labels("cancelled").inc()
                    else:
                        jobs.append(job)
                metrics.queue_depth.set(len(self._waiting))
            for n, job in enumerate(jobs):
                if not batch.has_room():  # no row for it (and those after it) yet: back to the front, in order
                    with self._cond:
                        self._waiting.extendleft(reversed(jobs[n:]))
                        metrics.queue_depth.set(len(self._waiting))
                    break
                metrics.prompt_tokens.inc(job.prepared.prompt_tokens)
                batch.join(Row(job, self.processor.tokenizer, metrics))
            for joining in batch.joins:
                if joining.row.job.cancelled.is_set() and not joining.row.done:
                    joining.row.cancel()
            reused = batch.reused_tokens
            batch.advance()
            metrics.prefix_reused_tokens.inc(batch.reused_tokens - reused)
            batch.step()
            metrics.running.set(len(batch.running) + len(batch.joins))
            metrics.batch_size.set(len(batch.running))
            if self.image_cache is not None:
                metrics.count_image_cache(self.image_cache)

    def _next_batch(self) -> Optional[List[Job]]:
        """The next batch to run, or None when stopping with nothing left to run."""
        with self._cond:
            while True:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if not self._waiting:
                    return None
                self._gather()
                batch = self._take_batch()
                self.metrics.queue_depth.set(len(self._waiting))
                if batch:
                    return batch

    def _gather(self) -> None:
        """Before a batch starts, let the requests that are on their way join it: wait while requests are being
        prepared, or until no new one arrived for GATHER_QUIET_SECONDS, at most MAX_GATHER_SECONDS (a batch runs
        for seconds to minutes; a request that just misses it waits for all of it)."""
        now = time.monotonic()
        deadline, quiet_until, seen = now + MAX_GATHER_SECONDS, now + GATHER_QUIET_SECONDS, len(self._waiting)
        while len(self._waiting) < self.max_batch_size and not self._stopping:
            now = time.monotonic()
            if now >= deadline or (self._preparing == 0 and now >= quiet_until):
                return
            self._cond.wait((deadline if self._preparing else min(deadline, quiet_until)) - now)
            if len(self._waiting) != seen:
                seen, quiet_until = len(self._waiting), time.monotonic() + GATHER_QUIET_SECONDS

    def _take_batch(self) -> List[Job]:
        """Up to max_batch_size waiting jobs, oldest first, whose padded batch fits the context (the batch is
        padded to its longest prompt and runs to its largest max_tokens); cancelled jobs are dropped."""
        context = self.model.config.text_config.max_position_embeddings
        batch: List[Job] = []
        kept: List[Job] = []
        while self._waiting and len(batch) < self.max_batch_size:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                self.metrics.finished.labels("cancelled").inc()
                continue
            longest = max([j.prepared.prompt_tokens for j in batch] + [job.prepared.prompt_tokens])
            most = max([j.prepared.max_tokens for j in batch] + [job.prepared.max_tokens])
            if batch and longest + most > context:
                kept.append(job)
                continue
            batch.append(job)
        self._waiting.extendleft(reversed(kept))
        return batch

    def run_batch(self, jobs: List[Job]) -> None:
        """Generate for `jobs` as one batch; every job gets its Delta events and one Finished (or Failed). A batch
        that fails before its first token is retried request by request, so only the request at fault fails."""
        rows = [Row(job, self.processor.tokenizer, self.metrics) for job in jobs]
        metrics = self.metrics

        def on_start(batch_rows: int) -> None:
            metrics.batches.inc()
            metrics.batch_size.set(batch_rows)
            metrics.running.set(len(jobs))
            metrics.prompt_tokens.inc(sum(job.prepared.prompt_tokens for job in jobs))

        def on_step() -> None:
            metrics.running.set(sum(not row.done for row in rows))

        try:
            # one failed batch must not stop the server: every error is this batch's rows' failure
            runner.run_batch(self.model, rows, self.processor.tokenizer.pad_token_id, recoverable=(Exception,),
                             pad_to_power_of_two=self.pad_batch, image_cache=self.image_cache, on_start=on_start,
                             on_step=on_step, log=log)
        finally:
            if self.image_cache is not None:
                metrics.count_image_cache(self.image_cache)
            metrics.running.set(0)
            metrics.batch_size.set(0)
