"""A day of traffic, compressed (slow: `python -m pytest -m slow tests/serve/test_serve_soak.py -s`).

1,000 requests (SOAK_REQUESTS to change it) through the real server with the demo checkpoint, 4 clients at a time, a
fresh connection each: greedy requests with and without images, streamed and not; streams cancelled after their
first chunks; malformed, unauthorised, unknown-model and over-limit requests; remote image URLs the server must
refuse. Every good answer must equal the same request's answer alone, every bad request its 4xx, nothing a 500;
the server's RSS and open file descriptors are recorded after every 50 requests (the clients idle), and after the
last round must be within 5% of after request 100. SOAK_REPORT=path writes the figures as JSON.
"""
import base64
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from serve_helpers import Server, png_data_uri, random_image

pytestmark = pytest.mark.slow

KEY = "sk-soak"
MODEL = "idefics3-demo"
ROUND = 50
CLIENTS = 4


def text(question):
    return [{"type": "text", "text": question}]


def images(*seeds_sizes):
    return [{"type": "image_url", "image_url": {"url": png_data_uri(random_image(seed, size))}}
            for seed, size in seeds_sizes]


GOOD = [  # (content, max_tokens)
    (text("Describe a cat."), 6),
    (text("Tell me about the sea, the sky and the mountains far away."), 8),
    (images((1, (90, 70))) + text("What is in this image?"), 5),
    (images((2, (60, 80)), (3, (70, 50))) + text("Compare the two images."), 6),
    ("Just a plain string message", 4),
]


def body(content, max_tokens, **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


BAD = [  # (what, how to send it, the status it must get)
    ("malformed JSON", dict(content=b'{"model": "idefics3-demo", "messages": [}'), 400),
    ("max_tokens over the limit", dict(json=body(text("hi"), 5000)), 400),
    ("too many images", dict(json=body(images((4, (20, 20)), (5, (20, 20)), (6, (20, 20))) + text("?"), 2)), 400),
    ("body over the limit", dict(json=body(text("x" * 250_000), 2)), 413),
    ("wrong key", dict(json=body(text("hi"), 2), key="sk-wrong"), 401),
    ("unknown model", dict(json={**body(text("hi"), 2), "model": "gpt-4o"}), 404),
    ("loopback image URL", dict(json=body([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]
                                          + text("?"), 2)), 400),
    ("bad base64", dict(json=body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}], 2)),
     400),
    ("n=2", dict(json={**body(text("hi"), 2), "n": 2}), 400),
]


def rss_and_fds(pid: int):
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def send(server, kind, index, expected_alone):
    """One request of the mix; returns a problem (str) or None."""
    headers = {"Authorization": f"Bearer {KEY}"}
    if kind == "bad":
        what, how, status = BAD[index % len(BAD)]
        how = dict(how)
        if "key" in how:
            headers = {"Authorization": f"Bearer {how.pop('key')}"}
        if "content" in how:
            headers["Content-Type"] = "application/json"
        r = httpx.post(server.base + "/chat/completions", headers=headers, timeout=600, **how)
        if r.status_code != status or "error" not in r.json():
            return f"{what}: HTTP {r.status_code} (expected {status}) {r.text[:200]}"
        return None
    content, max_tokens = GOOD[index % len(GOOD)]
    if kind == "cancel":
        with httpx.stream("POST", server.base + "/chat/completions", headers=headers, timeout=600,
                          json=body(content, 64, stream=True)) as r:
            if r.status_code != 200:
                return f"cancelled stream: HTTP {r.status_code}"
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    break  # leave mid-stream
        return None
    if kind == "stream":
        pieces = []
        with httpx.stream("POST", server.base + "/chat/completions", headers=headers, timeout=600,
                          json=body(content, max_tokens, stream=True)) as r:
            if r.status_code != 200:
                return f"stream: HTTP {r.status_code}"
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        return f"stream error: {chunk}"
                    pieces.append(chunk["choices"][0]["delta"].get("content") or "")
        answer = "".join(pieces)
    else:
        r = httpx.post(server.base + "/chat/completions", headers=headers, json=body(content, max_tokens),
                       timeout=600)
        if r.status_code != 200:
            return f"good request: HTTP {r.status_code} {r.text[:200]}"
        answer = r.json()["choices"][0]["message"]["content"]
    if answer != expected_alone[index % len(GOOD)]:
        return f"good request {index % len(GOOD)} ({kind}): {answer!r} != alone {expected_alone[index % len(GOOD)]!r}"
    return None


def plan(n: int, seed: int = 0):
    """The request mix: about 55% good (half streamed), 35% bad, 10% cancelled, shuffled."""
    rng = random.Random(seed)
    kinds = (["plain"] * 28 + ["stream"] * 27 + ["bad"] * 35 + ["cancel"] * 10)
    return [(rng.choice(kinds), rng.randrange(1000)) for _ in range(n)]


def _write_report(n, statuses, figures, problems):
    if os.environ.get("SOAK_REPORT"):
        report = {"requests": n, "mix": statuses, "figures": figures, "problems": problems[:20]}
        Path(os.environ["SOAK_REPORT"]).write_text(json.dumps(report, indent=1))


def test_a_thousand_requests_leave_the_server_as_they_found_it():
    n = int(os.environ.get("SOAK_REQUESTS", "1000"))
    server = Server(["--demo", "--api-key", KEY, "--max-tokens-limit", "64", "--max-images-per-request", "2",
                     "--max-request-bytes", "200000", "--max-queue", "64"])
    figures, problems, statuses = [], [], {}
    try:
        alone = []
        for content, max_tokens in GOOD:  # each good request alone first: the answers to compare with
            r = httpx.post(server.base + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                           json=body(content, max_tokens), timeout=600)
            assert r.status_code == 200, r.text
            alone.append(r.json()["choices"][0]["message"]["content"])
        requests = plan(n)
        start = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            for done in range(0, n, ROUND):
                batch = requests[done:done + ROUND]
                for (kind, index), problem in zip(batch, pool.map(lambda r: send(server, *r, alone), batch)):
                    statuses[kind] = statuses.get(kind, 0) + 1
                    if problem:
                        problems.append(problem)
                time.sleep(1.0)  # let the server close the connections of the round
                rss, fds = rss_and_fds(server.proc.pid)
                figures.append({"requests": done + len(batch), "rss_mb": round(rss, 1), "open_fds": fds,
                                "seconds": round(time.monotonic() - start, 1)})
                print(figures[-1], flush=True)
                _write_report(n, statuses, figures, problems)  # after every round: a run cut short still tells
                if len(problems) > 20:
                    break
        metrics = httpx.get(server.root + "/metrics").text
    finally:
        server.stop()
    _write_report(n, statuses, figures, problems)
    assert not problems, problems[:10]
    assert 'status="500"' not in metrics
    assert "Traceback" not in server.log, server.log[-3000:]
    at_100 = next(f for f in figures if f["requests"] >= 100)
    last = figures[-1]
    assert last["rss_mb"] <= at_100["rss_mb"] * 1.05, figures
    assert last["open_fds"] <= at_100["open_fds"] * 1.05, figures
