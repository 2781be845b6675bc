"""idefics3-serve, the real server on 127.0.0.1 (a free port) with the tiny demo checkpoint, spoken to with the
`openai` client and httpx: answers equal generate() + batch_decode, streamed and not; usage equals the processor's
counts; 8 concurrent clients get their answers alone; every error case gives its status and OpenAI's error body and
the server answers the next request; a client that goes away mid-stream frees its row."""
import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_helpers import Reference, Server, openai_messages, png_data_uri, random_image

KEY = "sk-test-key"
MODEL = "tiny-idefics3"
LIMITS = dict(images=2, prompt_tokens=1500, tokens=1024, pixels=200 * 200, body=300_000, queue=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mindone_idefics3.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(["--model", str(model_dir), "--served-model-name", MODEL, "--api-key", KEY,
                "--max-images-per-request", str(LIMITS["images"]), "--max-prompt-tokens", str(LIMITS["prompt_tokens"]),
                "--max-tokens-limit", str(LIMITS["tokens"]), "--max-image-pixels", str(LIMITS["pixels"]),
                "--max-request-bytes", str(LIMITS["body"]), "--max-queue", str(LIMITS["queue"])])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(model_dir):
    return Reference(model_dir)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key=KEY, max_retries=0, timeout=120)


def ask(client, question, images=(), max_tokens=12, **kw):
    return client.chat.completions.create(model=MODEL, messages=openai_messages(question, images),
                                          max_tokens=max_tokens, temperature=0, **kw)


def metric(server, name: str) -> float:
    text = httpx.get(server.root + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ----------------------------------------------------------------------------------------------- answers
def test_answer_and_usage_equal_generate_and_the_processor(client, reference):
    images = [random_image(1)]
    out = ask(client, "What do we see in this image?", images, max_tokens=12)
    text, reason, prompt_tokens, completion_tokens = reference.answer("What do we see in this image?", images, 12)
    assert out.object == "chat.completion" and out.model == MODEL
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert out.usage.total_tokens == prompt_tokens + completion_tokens


def test_streamed_deltas_concatenate_to_the_answer(client, reference):
    images = [random_image(2), random_image(3, (50, 130))]
    stream = client.chat.completions.create(model=MODEL, messages=openai_messages("Describe the image.", images),
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text, reason, prompt_tokens, completion_tokens = reference.answer("Describe the image.", images, 10)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices] == [None] * (len(with_choices) - 1) + [reason]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "stream": True}
    r = httpx.post(server.base + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last


def test_text_only_system_turn_and_stop_string(client, reference):
    text, _, _, _ = reference.answer("Hello there", (), 12, system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == text
    stop = text[3:5]  # a stop string inside the answer: the answer ends before its first occurrence
    assert stop and text.find(stop) >= 0
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].message.content == text[:text.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text[:text.find(stop)]


def test_eight_concurrent_clients_each_get_their_answer_alone(server, client, reference):
    # prompts of 8 lengths (so the batch has left padding), with no image, one or two; 8 max_tokens
    images = {1: 1, 4: 1, 6: 2}
    cases = [(f"Question number {i}: what is shown here?" + " and why" * i,
              [random_image(10 + j, (60 + 10 * i, 80)) for j in range(images.get(i, 0))], 4 + i // 2)
             for i in range(8)]
    batches_before = metric(server, "idefics3_batches_total")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: ask(client, c[0], c[1], c[2]), cases))
    batches = metric(server, "idefics3_batches_total") - batches_before
    assert batches <= 3, f"8 requests sent together ran in {batches} batches"
    for (question, images, max_tokens), out in zip(cases, answers):
        text, reason, prompt_tokens, completion_tokens = reference.answer(question, images, max_tokens)
        assert out.choices[0].message.content == text, question
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, completion_tokens)
        assert out.choices[0].finish_reason == reason
    assert len({a.choices[0].message.content for a in answers}) >= 4, "test setup: the answers are all alike"


def test_sampling_with_a_seed_is_reproducible_alone_and_batched(client):
    def sampled(seed, question="Tell me a story"):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=1.0,
            top_p=0.9, seed=seed).choices[0].message.content

    alone = sampled(7)
    with ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(lambda s: sampled(s[0], s[1]),
                                [(7, "Tell me a story"), (8, "Tell me a story"), (7, "Tell me a story"), (None, "x")]))
    assert batched[0] == batched[2] == alone
    assert batched[1] != alone  # another seed, another answer
    greedy = ask(client, "Tell me a story", max_tokens=12).choices[0].message.content
    assert alone != greedy


# ----------------------------------------------------------------------------------------------- endpoints
def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    good_request_still_answers(client)
    health = httpx.get(server.root + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(server.root + "/metrics").text
    for name in ("idefics3_requests_total", "idefics3_prompt_tokens_total", "idefics3_completion_tokens_total",
                 "idefics3_queue_depth", "idefics3_batch_size", "idefics3_time_to_first_token_seconds_bucket"):
        assert name in text
    assert metric(server, "idefics3_completion_tokens_total") > 0


# ----------------------------------------------------------------------------------------------- errors
def good_request_still_answers(client):
    assert ask(client, "Still there?", max_tokens=2).usage.completion_tokens == 2


def post(server, body=None, key=KEY, raw=None, headers=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if raw is not None:
        return httpx.post(server.base + "/chat/completions", content=raw, headers={**h, "Content-Type":
                                                                                   "application/json"}, timeout=60)
    return httpx.post(server.base + "/chat/completions", json=body, headers=h, timeout=60)


def user(content):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def long_text(tokens_wanted: int, reference) -> str:
    """A text of about `tokens_wanted` tokens."""
    unit = "the quick brown fox jumps over the lazy dog "
    per_unit = len(reference.processor.tokenizer.encode(unit * 20)) / 20
    return unit * int(tokens_wanted / per_unit)


ERROR_CASES = {
    "malformed_json": (lambda r: dict(raw=b'{"model": "x", "messages": [}'), 400, "not valid JSON", None),
    "wrong_field_type": (lambda r: dict(body={**user("hi"), "max_tokens": "ten"}), 400, "max_tokens", "max_tokens"),
    "unknown_content_part": (lambda r: dict(body=user([{"type": "input_audio", "input_audio": {}}])), 400,
                             "input_audio", "messages.0.content.0"),
    "undecodable_image": (lambda r: dict(body=user([image_part(
        "data:image/png;base64," + base64.b64encode(b"not an image at all").decode())])), 400,
        "not an image file", "messages"),
    "bad_base64": (lambda r: dict(body=user([image_part("data:image/png;base64,@@@not-base64")])), 400,
                   "not valid base64", "messages"),
    "too_many_images": (lambda r: dict(body=user([image_part(png_data_uri(random_image(i))) for i in range(3)])),
                        400, "at most 2", "messages"),
    "image_over_pixel_limit": (lambda r: dict(body=user([image_part(png_data_uri(random_image(0, (250, 200))))])),
                               400, "--max-image-pixels", "messages"),
    "prompt_over_max_prompt_tokens": (lambda r: dict(body=user(long_text(1600, r))), 400, "--max-prompt-tokens",
                                      "messages"),
    "prompt_and_max_tokens_over_context": (lambda r: dict(body={**user(long_text(1200, r)), "max_tokens": 1000}),
                                           400, "beyond the model's context", "max_tokens"),
    "max_tokens_over_limit": (lambda r: dict(body={**user("hi"), "max_tokens": 5000}), 400, "--max-tokens-limit",
                              "max_tokens"),
    "n_above_1": (lambda r: dict(body={**user("hi"), "n": 2}), 400, "n=2", "n"),
    "missing_key": (lambda r: dict(body=user("hi"), key=None), 401, "API key", None),
    "wrong_key": (lambda r: dict(body=user("hi"), key="sk-wrong"), 401, "API key", None),
    "unknown_model": (lambda r: dict(body={**user("hi"), "model": "gpt-4o"}), 404, "gpt-4o", "model"),
    "oversized_body": (lambda r: dict(body=user("x" * 400_000)), 413, "--max-request-bytes", None),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_case_gives_its_status_and_openai_error_body(case, server, client, reference):
    make, status, message, param = ERROR_CASES[case]
    r = post(server, **make(reference))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert error["param"] == param
    assert "Traceback" not in r.text
    good_request_still_answers(client)


def test_openai_client_raises_its_own_error_types(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)


def test_a_full_queue_gives_503_with_retry_after(server, client):
    body = {**user("Keep talking"), "max_tokens": 400}
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda _: post(server, body), range(24)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["code"] == "queue_full"
    assert set(codes) == {200, 503}
    good_request_still_answers(client)


# ----------------------------------------------------------------------------------------------- lifecycle
def test_a_client_that_goes_away_mid_stream_frees_its_row(server, client):
    cancelled = metric(server, 'idefics3_finished_rows_total{reason="cancelled"}')
    tokens = metric(server, "idefics3_completion_tokens_total")
    body = {**user("Talk for a long time"), "max_tokens": LIMITS["tokens"], "stream": True}
    with httpx.stream("POST", server.base + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen == 3:
                break  # leave: the connection closes
    for _ in range(200):
        if metric(server, 'idefics3_finished_rows_total{reason="cancelled"}') > cancelled:
            break
        threading.Event().wait(0.1)
    assert metric(server, 'idefics3_finished_rows_total{reason="cancelled"}') == cancelled + 1
    assert metric(server, "idefics3_running_requests") == 0
    generated = metric(server, "idefics3_completion_tokens_total") - tokens
    assert 1 <= generated < LIMITS["tokens"] // 2, generated  # stopped well before its max_tokens
    good_request_still_answers(client)
