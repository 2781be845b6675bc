"""idefics3-serve as it is exposed on a network: the real server (demo checkpoint) on 127.0.0.1 and a local image
server on 127.0.0.1 that the image URLs point at. By default no form of a loopback URL reaches the image server and
every refusal has one message shape; with --allow-private-media-urls the image is fetched, and a 404, a closed port
or a text file give that same shape; --allowed-media-domains refuses other hosts, also behind a redirect. Slow and
hostile clients: a body slower than --request-timeout gets 408 and the next client is served (a client that never
reads its stream: test_serve_parts.py, in-process — on loopback the kernel buffers more than the demo checkpoint's
longest answer). Operations: /health, /ready, one access-log line per request whose id is
the completion's, the API key never in the log.

Only loopback is ever contacted (the refusals of other addresses are tested as pure functions in
test_serve_media.py, with the redirect from a public host to a private one)."""
import json
import re
import select
import socket
import time
from urllib.parse import quote, urlsplit

import httpx
import pytest

from serve_helpers import LocalImageServer, Server, closed_loopback_port

KEY = "sk-exposed-secret-4711"
MODEL = "idefics3-demo"
FETCH_FAILED = re.compile(r"^image 0 could not be fetched from (\S+); send an image URL this server may fetch or "
                          r"the image inline as data:image/\.\.\.;base64,\.\.\.$")


@pytest.fixture(scope="module")
def local():
    server = LocalImageServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def default_server():
    """Remote images under the default rules; an API key; JSON logs; a short --request-timeout."""
    s = Server(["--demo", "--api-key", KEY, "--log-format", "json", "--request-timeout", "3"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def private_server():
    """Private addresses allowed, but only the host 127.0.0.1."""
    s = Server(["--demo", "--allow-private-media-urls", "--allowed-media-domains", "127.0.0.1"])
    yield s
    s.stop()


def chat(server, content, key=KEY, max_tokens=2, timeout=300, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
    return httpx.post(server.base + "/chat/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}"} if key else {})


def with_image(url):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]


def fetch_refused(r) -> str:
    """The host a refused fetch names (and checks the message shape)."""
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "image_fetch_failed" and error["param"] == "messages"
    match = FETCH_FAILED.match(error["message"])
    assert match, error["message"]
    return match.group(1)


def metric(server, name: str) -> float:
    total = 0.0
    for line in httpx.get(server.root + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------- remote images
def test_by_default_no_loopback_url_reaches_the_local_server(default_server, local):
    p = local.port
    urls = [f"http://127.0.0.1:{p}/x.png", f"http://localhost:{p}/x.png", f"http://[::1]:{p}/x.png",
            f"http://2130706433:{p}/x.png", f"http://0x7f.1:{p}/x.png", f"http://[::ffff:127.0.0.1]:{p}/x.png",
            f"http://127.0.0.1:{p}/redirect?to=" + quote(f"http://127.0.0.1:{p}/x.png", safe="")]
    hosts = [fetch_refused(chat(default_server, with_image(url))) for url in urls]
    assert hosts == ["127.0.0.1", "localhost", "::1", "2130706433", "0x7f.1", "::ffff:127.0.0.1", "127.0.0.1"]
    assert local.hits == []
    wait_for(lambda: default_server.log.count("a loopback address") >= len(urls), 10, "the reasons in the log")
    assert chat(default_server, "Still there?").status_code == 200


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "/etc/passwd"])
def test_other_schemes_and_local_paths_are_refused(default_server, url):
    r = chat(default_server, with_image(url))
    assert r.status_code == 400 and "must be a data:image" in r.json()["error"]["message"]


def test_with_private_addresses_allowed_the_image_is_fetched_and_failures_look_alike(private_server, local):
    local.hits.clear()
    ok = chat(private_server, with_image(local.url("/x.png")))
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] >= 1 and local.hits == ["/x.png"]
    for url in [local.url("/missing.png"), f"http://127.0.0.1:{closed_loopback_port()}/x.png",
                local.url("/text.txt")]:
        assert fetch_refused(chat(private_server, with_image(url))) == "127.0.0.1", url


def test_allowed_media_domains_refuse_other_hosts_also_behind_a_redirect(private_server, local):
    local.hits.clear()
    assert fetch_refused(chat(private_server, with_image(local.url("/x.png", "localhost")))) == "localhost"
    assert local.hits == []
    redirect = local.url("/redirect?to=" + quote(local.url("/x.png", "localhost"), safe=""))
    assert fetch_refused(chat(private_server, with_image(redirect))) == "127.0.0.1"
    assert [h.split("?")[0] for h in local.hits] == ["/redirect"]  # the allowed hop, not the one it pointed to


# ----------------------------------------------------------------------------------------------- clients
def _connect(server) -> socket.socket:
    url = urlsplit(server.root)
    s = socket.socket()
    s.settimeout(60)
    s.connect((url.hostname, url.port))
    return s


def _request_head(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {length}\r\n\r\n").encode()


def test_a_body_slower_than_the_timeout_gets_408_and_the_next_client_is_served(default_server):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 50}]}).encode()
    with _connect(default_server) as s:
        s.sendall(_request_head(len(body)))
        start, sent, answer = time.monotonic(), 0, b""
        while time.monotonic() - start < 30:  # a byte every 0.25 s: the whole body would take ~50 s
            if sent < len(body):
                s.sendall(body[sent:sent + 1])
                sent += 1
            if select.select([s], [], [], 0.25)[0]:
                break
        elapsed = time.monotonic() - start
        while True:  # the answer, to the connection's end (the server closes it)
            piece = s.recv(65536)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer and sent < len(body)
    assert 2.5 < elapsed < 10, elapsed  # --request-timeout 3 counts from the headers, trickling does not reset it
    assert chat(default_server, "Next client").status_code == 200


# ----------------------------------------------------------------------------------------------- operations
def test_health_and_ready(default_server):
    assert httpx.get(default_server.root + "/health").json()["status"] == "ok"
    ready = httpx.get(default_server.root + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert httpx.get(default_server.root + "/health?ready").status_code == 200


def access_lines(server):
    lines = []
    for line in server.log.splitlines():
        if line.startswith("{") and '"mindone_idefics3.serve.access"' in line:
            lines.append(json.loads(line))
    return lines


def test_one_access_line_per_request_with_the_completion_id_and_no_key(default_server):
    r = chat(default_server, "Hello", max_tokens=3)
    rid = r.json()["id"]
    assert r.headers["X-Request-Id"] == rid
    streamed = httpx.post(default_server.base + "/chat/completions", timeout=300,
                          headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                "stream": True})
    sid = json.loads(streamed.text.split("\n\n")[0][len("data: "):])["id"]
    assert streamed.headers["X-Request-Id"] == sid
    refused = chat(default_server, "Hello", key="sk-wrong-guess-0815")
    assert refused.status_code == 401
    wait_for(lambda: refused.headers["X-Request-Id"] in default_server.log, 10, "the 401's access line")
    lines = {line["request_id"]: line for line in access_lines(default_server)}
    assert sum(line["request_id"] == rid for line in access_lines(default_server)) == 1
    line = lines[rid]
    assert (line["status"], line["method"], line["path"], line["client"]) == (200, "POST", "/v1/chat/completions",
                                                                                "127.0.0.1")
    usage = r.json()["usage"]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert line["finish_reason"] == r.json()["choices"][0]["finish_reason"]
    assert 0 < line["ttft_s"] <= line["total_s"]
    assert lines[sid]["status"] == 200 and 1 <= lines[sid]["completion_tokens"] <= 4
    assert lines[refused.headers["X-Request-Id"]]["status"] == 401
    assert KEY not in default_server.log and "sk-wrong-guess-0815" not in default_server.log
