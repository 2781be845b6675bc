"""idefics3-serve's parts without a model: a row's stop strings (also across token boundaries, never streamed
before they are ruled out), max_tokens, stop tokens; the OpenAI request models; the error body."""
import asyncio

import numpy as np
import pytest
from pydantic import ValidationError

from mindone_idefics3.serve.engine import Delta, Finished, Job, Row
from mindone_idefics3.serve.errors import APIError, error_response
from mindone_idefics3.serve.metrics import Metrics
from mindone_idefics3.generation import SamplingParams as Sampling
from mindone_idefics3.serve.prepare import PreparedRequest, to_template_messages
from mindone_idefics3.serve.protocol import ChatCompletionRequest

PIECES = ["Hel", "lo W", "orld", "!", " Bye", "<eos>"]
EOS = 5


class PieceTokenizer:
    """Token i decodes to PIECES[i]; <eos> is special."""
    clean_up_tokenization_spaces = False

    def decode(self, ids, skip_special_tokens=True):
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i == EOS))


def run_row(tokens, stop=(), max_tokens=10):
    loop = asyncio.new_event_loop()
    try:
        job = Job(PreparedRequest({}, prompt_tokens=7, max_tokens=max_tokens, sampling=Sampling(), stop=list(stop)),
                  loop)
        row = Row(job, PieceTokenizer(), Metrics())
        posted = []
        for n, t in enumerate(tokens, start=1):
            if row.done:
                break
            row.add(t, "stop" if t == EOS else "length" if n >= max_tokens else None)  # as generate_steps says
            loop.run_until_complete(asyncio.sleep(0))
            while not job.events.empty():
                posted.append(job.events.get_nowait())
        return posted
    finally:
        loop.close()


def texts(events):
    return [e.text for e in events if isinstance(e, Delta)]


def test_stop_token_ends_the_row_and_counts():
    events = run_row([0, 1, 2, EOS, 3])
    assert "".join(texts(events)) == "Hello World"
    assert events[-1] == Finished("stop", 7, 4)


def test_max_tokens_ends_the_row_with_length():
    events = run_row([0, 1, 2, 3, 4], max_tokens=3)
    assert "".join(texts(events)) == "Hello World" and events[-1] == Finished("length", 7, 3)


def test_a_stop_string_across_tokens_is_cut_and_never_streamed():
    events = run_row([0, 1, 2, 3, 4], stop=["o Wo"])
    assert texts(events) == ["Hel", "l"]  # "lo W" could start "o Wo": held back, then cut
    assert events[-1] == Finished("stop", 7, 3)


def test_held_back_text_is_released_when_it_cannot_be_a_stop():
    events = run_row([0, 1, 2, 3], stop=["lo X"], max_tokens=4)
    assert texts(events) == ["He", "llo W", "orld", "!"]  # the "l" of "Hel" waited: it could start "lo X"
    assert events[-1].reason == "length"


def test_request_models_refuse_wrong_types_and_unknown_parts():
    ok = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:x"}}]}], "stop": "x"})
    messages, urls, video_urls = to_template_messages(ok)
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]
    assert urls == ["data:x"] and video_urls == [] and ok.stop_strings() == ["x"]
    for bad in ({"model": "m", "messages": []}, {"model": "m", "messages": [{"role": "tool", "content": "a"}]},
                {"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": "5"},
                {"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": 3},
                {"model": "m", "messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(bad)


def test_error_response_is_openai_shaped():
    r = error_response(APIError(503, "busy", code="queue_full", headers={"Retry-After": "1"}))
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.body == b'{"error":{"message":"busy","type":"service_unavailable","param":null,"code":"queue_full"}}'


# ----------------------------------------------------------------------------------------------- the engine's batch
class FakeProcessor:
    tokenizer = PieceTokenizer()
    tokenizer.pad_token_id = 0


def make_job(loop, prompt_len, max_tokens, stop=(), seed=None):
    inputs = {"input_ids": np.ones((1, prompt_len), np.int64), "attention_mask": np.ones((1, prompt_len), np.int64)}
    return Job(PreparedRequest(inputs, prompt_len, max_tokens, Sampling(seed=seed), list(stop)), loop)


def drain(loop, job):
    loop.run_until_complete(asyncio.sleep(0))
    out = []
    while not job.events.empty():
        out.append(job.events.get_nowait())
    return out


@pytest.fixture
def engine(monkeypatch):
    from mindone_idefics3 import runner as runner_module
    from mindone_idefics3.generation import Step
    from mindone_idefics3.serve import engine as engine_module

    calls = []

    def fake_generate_steps(model, ids, mask, pv, pam, params, **kw):
        limits = [p.max_new_tokens for p in params]
        max_new_tokens, seed = max(limits), [p.seed for p in params]
        calls.append(dict(rows=ids.shape[0], width=ids.shape[1], max_new_tokens=max_new_tokens, seed=seed))
        if (ids == 9).any() and ids.shape[0] > 1:
            raise RuntimeError("a row this batch cannot take")
        for t in range(max_new_tokens):
            tokens = np.array([(t + r) % 5 for r in range(ids.shape[0])])  # row r: tokens r, r+1, ... (4 = " Bye")
            yield Step(tokens, np.array([t < n for n in limits]), ["length" if t + 1 == n else None for n in limits])

    monkeypatch.setattr(runner_module, "generate_steps", fake_generate_steps)
    e = engine_module.Engine(lambda: None, max_batch_size=8, scheduler="static")  # the fake is the static runner's
    e.processor = FakeProcessor()
    e.calls = calls
    return e


def test_rows_stop_independently_and_the_batch_is_padded_to_a_power_of_two(engine):
    loop = asyncio.new_event_loop()
    jobs = [make_job(loop, 3, 2), make_job(loop, 5, 4, seed=11), make_job(loop, 4, 6, stop=["!"])]
    engine.run_batch(jobs)
    assert engine.calls == [dict(rows=4, width=5, max_new_tokens=6, seed=[None, 11, None, None])]
    events = [drain(loop, j) for j in jobs]
    assert "".join(texts(events[0])) == "Hello W" and events[0][-1] == Finished("length", 3, 2)
    assert "".join(texts(events[1])) == "lo World! Bye" and events[1][-1] == Finished("length", 5, 4)
    assert "".join(texts(events[2])) == "orld" and events[2][-1] == Finished("stop", 4, 2)  # "!" is a stop string
    loop.close()


def test_a_cancelled_row_is_freed_and_the_batch_ends_with_its_last_row(engine):
    loop = asyncio.new_event_loop()
    jobs = [make_job(loop, 3, 50), make_job(loop, 3, 3)]
    jobs[0].cancel()  # its client went away: freed at the first step, nothing posted
    engine.run_batch(jobs)
    assert drain(loop, jobs[0]) == []
    assert drain(loop, jobs[1])[-1] == Finished("length", 3, 3)
    text = Metrics.render(engine.metrics).decode()
    assert 'idefics3_finished_rows_total{reason="cancelled"} 1.0' in text
    loop.close()


def test_a_batch_that_fails_before_its_first_token_is_retried_request_by_request(engine):
    loop = asyncio.new_event_loop()
    good, bad = make_job(loop, 3, 2), make_job(loop, 3, 2)
    bad.prepared.inputs["input_ids"][0, 0] = 9  # the fake generate_steps refuses a batch holding this row
    engine.run_batch([good, bad])
    assert [c["rows"] for c in engine.calls] == [2, 1, 1]
    assert drain(loop, good)[-1] == Finished("length", 3, 2)
    loop.close()


class CountingCache:
    """An image cache that finds nothing to hand over and only counts: each lookup, 2 hits and 1 miss."""
    hits = misses = 0

    def features(self, model, inputs, use_jit=True):
        self.hits, self.misses = self.hits + 2, self.misses + 1
        return None, 0


def test_the_image_cache_counters_follow_the_cache_once_per_lookup(engine):
    loop = asyncio.new_event_loop()
    engine.image_cache = CountingCache()
    engine.run_batch([make_job(loop, 3, 2)])
    good, bad = make_job(loop, 3, 2), make_job(loop, 3, 2)
    bad.prepared.inputs["input_ids"][0, 0] = 9  # a batch of 2 that fails, then each request alone: 3 lookups
    engine.run_batch([good, bad])
    assert (engine.image_cache.hits, engine.image_cache.misses) == (8, 4)
    text = Metrics.render(engine.metrics).decode()
    assert "idefics3_image_cache_hits_total 8.0" in text and "idefics3_image_cache_misses_total 4.0" in text
    loop.close()


# ----------------------------------------------------------------------------------------------- clients
def test_a_job_whose_events_are_not_taken_is_cancelled_and_keeps_one_failed_event():
    """A client that stops reading: past `max_events` waiting events the job is cancelled (its row is freed at the
    next token) and its queue holds a single Failed, so memory stays bounded."""
    from mindone_idefics3.serve.engine import Failed

    loop = asyncio.new_event_loop()
    try:
        job = Job(PreparedRequest({}, prompt_tokens=7, max_tokens=100, sampling=Sampling()), loop, max_events=4)
        metrics = Metrics()
        row = Row(job, PieceTokenizer(), metrics)
        for n in range(5):  # five pieces of text, four fit
            row.add(n, None)
            loop.run_until_complete(asyncio.sleep(0))
        assert job.cancelled.is_set() and job.overflowed and not row.done
        assert job.events.qsize() == 1 and isinstance(job.events.get_nowait(), Failed)
        row.add(0, None)  # the next step frees the row
        loop.run_until_complete(asyncio.sleep(0))
        assert row.done and job.events.empty()
        assert metrics.finished.labels("cancelled")._value.get() == 1
    finally:
        loop.close()


def test_a_job_read_as_it_comes_never_overflows():
    loop = asyncio.new_event_loop()
    try:
        job = Job(PreparedRequest({}, prompt_tokens=7, max_tokens=100, sampling=Sampling()), loop, max_events=4)
        row = Row(job, PieceTokenizer(), Metrics())
        for n in range(50):
            row.add(n % 5, None)
            loop.run_until_complete(asyncio.sleep(0))
            while not job.events.empty():
                job.events.get_nowait()
        assert not job.cancelled.is_set() and not row.done
    finally:
        loop.close()


def test_health_is_alive_and_ready_waits_for_the_engine():
    from fastapi.testclient import TestClient

    from mindone_idefics3.serve.app import Settings, create_app
    from mindone_idefics3.serve.engine import Engine

    engine = Engine(lambda: None)  # never started: the model is "loading"
    client = TestClient(create_app(engine, lambda: None, Settings("m")))  # no `with`: no lifespan, no worker
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "loading"
    for path in ("/ready", "/health?ready"):
        r = client.get(path)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5" and r.json()["status"] == "loading"
    assert client.get("/health").headers["X-Request-Id"].startswith("req-")
    engine.ready.set()
    assert client.get("/ready").json()["status"] == "ready" and client.get("/health?ready").status_code == 200
    assert client.get("/health").json()["status"] == "ok"
    engine.load_error = "OSError: no weights"
    assert client.get("/health").status_code == 503 and client.get("/ready").status_code == 503


def test_access_lines_in_text_and_json():
    import json
    import logging

    from mindone_idefics3.serve.logs import ACCESS_LOGGER, JsonFormatter, log_access

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        fields = {"request_id": "chatcmpl-1", "method": "POST", "path": "/v1/chat/completions", "status": 200,
                  "client": "10.0.0.9", "prompt_tokens": 12, "completion_tokens": 3, "finish_reason": "stop",
                  "ttft_s": 0.25, "total_s": 1.5}
        log_access(fields)
        log_access({"request_id": "req-2", "method": "GET", "path": "/health", "status": 200})  # a probe: DEBUG
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert len(records) == 1
    assert records[0].getMessage() == ('chatcmpl-1 "POST /v1/chat/completions" status=200 client=10.0.0.9 '
                                       'prompt_tokens=12 completion_tokens=3 finish_reason=stop ttft_s=0.250 '
                                       'total_s=1.500')
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["level"] == "info" and line["logger"] == ACCESS_LOGGER
    assert {k: line[k] for k in fields} == fields


def test_a_client_that_never_reads_its_stream_has_its_row_freed_and_the_others_are_served(engine, caplog):
    """The app in-process over the engine (the fake generation of the `engine` fixture): a streamed request whose
    `send` never returns after its first chunks — a client that stopped reading — has its row cancelled once its
    events overflow the job's buffer, a request after it is answered, and after --request-timeout its response is
    ended. (A real socket cannot show this with the demo checkpoint: loopback's kernel buffers hold all of its
    longest answer.)"""
    import json
    import types

    from mindone_idefics3.serve.app import Settings, create_app

    config = types.SimpleNamespace(text_config=types.SimpleNamespace(max_position_embeddings=10**6))
    engine._load = lambda: (types.SimpleNamespace(config=config), FakeProcessor(), None)
    inputs = {"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.ones((1, 3), np.int64)}

    def preparer(body):
        return PreparedRequest(inputs, 3, body.max_tokens, Sampling())

    app = create_app(engine, lambda: preparer, Settings("m", request_timeout=1.0))
    cancelled = engine.metrics.finished.labels("cancelled")

    def call(max_tokens, stream, send):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                           "stream": stream}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "client": ("10.1.2.3", 5555), "server": ("test", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # no disconnect: the client stays connected

        return app(scope, receive, send)

    async def main():
        async with app.router.lifespan_context(app):
            while not engine.ready.is_set():
                await asyncio.sleep(0.01)
            sent = []

            async def stops_reading(message):
                sent.append(message)
                if len(sent) > 2:  # the start and the first chunk went out; then the socket is full
                    await asyncio.Event().wait()

            stuck = asyncio.create_task(call(100_000, True, stops_reading))
            for _ in range(500):
                if cancelled._value.get() == 1:
                    break
                await asyncio.sleep(0.01)
            assert cancelled._value.get() == 1, "the unread row was not cancelled"
            answer = []

            async def reads(message):
                answer.append(message)

            await asyncio.wait_for(call(5, False, reads), 10)  # the engine serves the next client
            assert answer[0]["status"] == 200
            assert json.loads(answer[1]["body"])["usage"]["completion_tokens"] == 5
            await asyncio.wait_for(stuck, 10)  # --request-timeout ends the unread response
            assert engine.metrics.running._value.get() == 0

    with caplog.at_level("WARNING", logger="mindone_idefics3.serve"):
        asyncio.run(main())
    assert "a client stopped reading its stream" in caplog.text
    assert "did not take the answer for 1 s" in caplog.text
    assert engine.metrics.completion_tokens._value.get() < 5_000  # the stuck row was cut off early


def test_a_body_over_the_limit_without_content_length_gets_413():
    """Counted while it arrives (chunked upload): 413 with OpenAI's error body, not FastAPI's generic 400."""
    from fastapi.testclient import TestClient

    from mindone_idefics3.serve.app import Settings, create_app
    from mindone_idefics3.serve.engine import Engine

    client = TestClient(create_app(Engine(lambda: None), lambda: None, Settings("m", max_request_bytes=1000)))

    def chunks():
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}]}'

    r = client.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "--max-request-bytes" in r.json()["error"]["message"]
