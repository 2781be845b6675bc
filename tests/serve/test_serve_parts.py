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
    e = engine_module.Engine(lambda: None, max_batch_size=8)
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
