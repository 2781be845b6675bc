"""idefics3-serve's image-feature cache on the real server (127.0.0.1, the tiny demo checkpoint): the same photo
with another question or system prompt, or sent under another data: URI, skips the vision tower (no miss on
/metrics: a hit, or — when the prompt up to and with the image is a parked row's — the image inside the reused
prefix) and answers as generate() does without a cache; a photo one pixel away is a miss and answers as
that photo alone; with --image-cache-mb 0 nothing hits and the answers are the same."""
import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_helpers import Reference, Server, openai_messages, png_data_uri

MODEL = "tiny-idefics3"
HITS, MISSES = "idefics3_image_cache_hits_total", "idefics3_image_cache_misses_total"
REUSED = "idefics3_prefix_reused_tokens_total"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mindone_idefics3.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("serve-cache") / "model")


@pytest.fixture(scope="module")
def reference(model_dir):
    return Reference(model_dir)


@pytest.fixture(scope="module")
def cached(model_dir):
    s = Server(["--model", str(model_dir), "--served-model-name", MODEL])  # the device's default cache size
    s.model_dir = model_dir
    yield s
    s.stop()


@pytest.fixture(scope="module")
def uncached(model_dir):
    s = Server(["--model", str(model_dir), "--served-model-name", MODEL, "--image-cache-mb", "0"])
    s.model_dir = model_dir
    yield s
    s.stop()


def answer(server, messages, max_tokens: int = 12) -> str:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(server.base + "/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def counts(server):
    """(hits, misses, prefix tokens reused) on /metrics."""
    found = {}
    for line in httpx.get(server.root + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in (HITS, MISSES, REUSED):
            found[name] = float(value)
    return found[HITS], found[MISSES], found[REUSED]


def counted_after(server, before, seconds: float = 30.0):
    """(hits, misses) once the request just answered is counted: the counters catch up with the cache when its
    batch ends, which can be a moment after its answer went out."""
    deadline = time.monotonic() + seconds
    while (now := counts(server)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def ask_and_count(server, question, image, system=None):
    """(answer, images whose vision was skipped, images run through the vision tower) of one request with one
    image: skipped = a cache hit, or the image inside a prefix reused from a parked row (neither a hit nor a miss;
    the reused tokens then reach past the image)."""
    before = counts(server)
    text = answer(server, openai_messages(question, [image], system=system))
    after = counted_after(server, before)
    return (text, *skipped_and_run(before, after, reach_past_image(server, question, image, system)))


def skipped_and_run(before, after, image_end: int):
    hits, misses, reused = (a - b for a, b in zip(after, before))
    return hits + (misses == 0 and hits == 0 and reused >= image_end), misses


def reach_past_image(server, question, image, system=None) -> int:
    """Prompt tokens up to the end of the image's tokens (a prefix reuse covering the image reaches at least this)."""
    from mindone_idefics3 import Idefics3Processor

    from serve_helpers import template_messages

    processor = Idefics3Processor.from_pretrained(server.model_dir)
    inputs = processor.chat_inputs(template_messages(question, 1, system), [image])
    from mindone_idefics3.config import Idefics3Config

    image_token = Idefics3Config.from_json_file(server.model_dir / "config.json").image_token_id
    return int(np.flatnonzero(inputs["input_ids"][0] == image_token)[-1]) + 1


def flat(rgb):
    """A one-colour picture: the demo model's answers tell these apart (to it, noise pictures all look alike)."""
    return Image.new("RGB", (90, 70), rgb)


GREEN, BLUE, RED, BLACK = flat((0, 255, 0)), flat((0, 0, 255)), flat((255, 0, 0)), flat((0, 0, 0))


def one_pixel_changed(image):
    pixels = np.array(image)
    pixels[10, 20, 0] ^= 0xFF
    return Image.fromarray(pixels)


def test_the_same_photo_with_another_question_or_system_prompt_skips_vision(cached, reference):
    assert ask_and_count(cached, "What is in this image?", GREEN)[1:] == (0, 1)
    assert ask_and_count(cached, "What is in this image?", BLUE)[1:] == (0, 1)  # the last features: not GREEN's
    for question, system in [("Which colours are there?", None), ("What is in this image?", "Answer in French.")]:
        text, hits, misses = ask_and_count(cached, question, GREEN, system=system)
        assert (hits, misses) == (1, 0), (question, system)
        expected = reference.answer(question, [GREEN], 12, system=system)[0]
        assert text == expected, (question, system)
        assert expected != reference.answer(question, [BLUE], 12, system=system)[0], "test setup: alike answers"


def test_the_key_is_the_pixels_not_the_uri(cached, reference):
    assert ask_and_count(cached, "Describe it.", RED)[1:] == (0, 1)
    assert ask_and_count(cached, "Describe it.", BLACK)[1:] == (0, 1)
    buf = io.BytesIO()
    RED.save(buf, format="PNG", compress_level=0)  # the same pixels, other bytes: another data: URI
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert url != png_data_uri(RED)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe it again."}]}]
    before = counts(cached)
    text = answer(cached, messages)
    after = counted_after(cached, before)
    assert skipped_and_run(before, after, reach_past_image(cached, "Describe it again.", RED)) == (1, 0)
    expected = reference.answer("Describe it again.", [RED], 12)[0]
    assert text == expected
    assert expected != reference.answer("Describe it again.", [BLACK], 12)[0], "test setup: alike answers"


def test_a_photo_one_pixel_away_is_a_miss_and_answers_as_itself(cached, reference):
    photo = flat((30, 90, 160))
    changed = one_pixel_changed(photo)
    ask_and_count(cached, "What is in this image?", photo)
    text, hits, misses = ask_and_count(cached, "What is in this image?", changed)
    assert (hits, misses) == (0, 1)
    assert text == reference.answer("What is in this image?", [changed], 12)[0]  # fresh: that image alone


def test_with_the_cache_off_nothing_hits_and_the_answers_are_the_same(uncached, reference):
    for question, image, system in [("What is in this image?", GREEN, None), ("What is in this image?", BLUE, None),
                                    ("Which colours are there?", GREEN, "Answer in French.")]:
        text, hits, misses = ask_and_count(uncached, question, image, system=system)
        assert (hits, misses) == (0, 1), (question, system)  # every image runs through the vision tower
        assert text == reference.answer(question, [image], 12, system=system)[0], (question, system)
    assert counts(uncached)[0] == 0
