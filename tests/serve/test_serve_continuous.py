"""Continuous batching on the real server (127.0.0.1, the tiny demo checkpoint): a conversation's next turn reuses
its earlier prompt (image included) from the parked row and answers as transformers does on the whole
conversation; a client arriving while another streams gets its answer before the running one ends; the warm-up
ran before ready; a request that does not fit a row is a 400 naming --max-model-len."""
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from reference import transformers_chat_answer
from serve_helpers import Reference, Server, png_data_uri

MODEL = "tiny-idefics3"
REUSED = "idefics3_prefix_reused_tokens_total"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mindone_idefics3.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("serve-continuous") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(["--model", str(model_dir), "--served-model-name", MODEL, "--max-batch-size", "4",
                "--max-model-len", "1024"])
    yield s
    s.stop()


def metric(server, name: str) -> float:
    for line in httpx.get(server.root + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def post(server, messages, max_tokens=12, **extra):
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(server.base + "/chat/completions", json=body, timeout=300)


def test_warm_up_ran_before_ready(server):
    assert metric(server, "idefics3_warmup_seconds") > 0


def test_a_continued_conversation_reuses_its_image_and_answers_as_transformers(server, model_dir):
    from mindone_idefics3 import Idefics3Processor
    from mindone_idefics3.config import Idefics3Config

    photo = Image.fromarray(np.random.default_rng(11).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    stops = set(Reference(model_dir).stops.tolist())
    first_turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri(photo)}},
                                               {"type": "text", "text": "What is in this picture?"}]}]
    first = post(server, first_turn)
    assert first.status_code == 200, first.text
    answer = first.json()["choices"][0]["message"]["content"]
    conversation = first_turn + [{"role": "assistant", "content": answer},
                                 {"role": "user", "content": "And what else?"}]
    before = metric(server, REUSED)
    second = post(server, conversation)
    assert second.status_code == 200, second.text
    reused = metric(server, REUSED) - before
    template = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                {"role": "user", "content": [{"type": "text", "text": "And what else?"}]}]
    ids = Idefics3Processor.from_pretrained(model_dir).chat_inputs(template, [photo])["input_ids"][0]
    image_token = Idefics3Config.from_json_file(model_dir / "config.json").image_token_id
    assert reused >= int(np.flatnonzero(ids == image_token)[-1]) + 1  # at least up to the image's end
    assert second.json()["usage"]["prompt_tokens"] == len(ids)
    assert second.json()["choices"][0]["message"]["content"] == transformers_chat_answer(model_dir, template, [photo],
                                                                                          12, stops)


def test_a_client_arriving_while_another_streams_is_answered_before_it_ends(server, model_dir):
    reference = Reference(model_dir)
    ended = {}

    def long_stream():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Talk for a long time."}],
                "max_tokens": 600, "temperature": 0, "stream": True}
        chunks = 0
        with httpx.stream("POST", server.base + "/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 5:
                    streaming.set()
        ended["long"] = time.monotonic()

    streaming = threading.Event()
    thread = threading.Thread(target=long_stream)
    thread.start()
    assert streaming.wait(300)
    short = post(server, [{"role": "user", "content": "Hello there"}], max_tokens=8)
    ended["short"] = time.monotonic()
    thread.join()
    assert short.status_code == 200, short.text
    assert short.json()["choices"][0]["message"]["content"] == reference.answer("Hello there", (), 8)[0]
    assert ended["short"] < ended["long"]  # it did not wait for the running answer
    assert metric(server, "idefics3_running_requests") == 0


def test_a_request_that_does_not_fit_a_row_is_a_400_naming_the_limit(server):
    r = post(server, [{"role": "user", "content": "hi"}], max_tokens=1020)
    assert r.status_code == 400
    assert "--max-model-len" in r.json()["error"]["message"]
    assert post(server, [{"role": "user", "content": "hi"}], max_tokens=4).status_code == 200
