"""Remote images under the server's rules (mindone_idefics3/serve/media.py), without the model.

The address rules are pure functions and are tested as such for every non-loopback address: no test here sends
anything anywhere but 127.0.0.1. The fetcher's resolver and connector are stand-ins where a test needs a "public"
host: the name resolves (in the stub) to a public-looking address, and the connector opens the socket to the local
test server on 127.0.0.1 instead, recording the address it was asked for; any other address fails the test.
"""
import random
import socket
import time
from urllib.parse import quote

import pytest

from mindone_idefics3.serve.errors import APIError
from mindone_idefics3.serve.media import (MAX_REDIRECTS, Fetcher, FetchError, MediaPolicy, check_url,
                                          checked_addresses, numeric_address, refusal)
from mindone_idefics3.serve.prepare import Limits, Preparer

from serve_helpers import LocalImageServer, closed_loopback_port

PUBLIC = "93.184.215.14"  # a public address the stub resolver hands out; never connected to (see `connector`)


@pytest.fixture
def local():
    server = LocalImageServer()
    yield server
    server.close()


def resolver(table, calls=None):
    def resolve(host, port):
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(f"stub resolver: unknown host {host}")
        return list(table[host])
    return resolve


def connector(local, connected):
    """Connects to the local test server for PUBLIC and for loopback; fails the test for anything else."""
    def connect(address, port, timeout):
        connected.append(address)
        if address == PUBLIC:
            return socket.create_connection(("127.0.0.1", local.port), timeout)
        assert address in ("127.0.0.1", "::1"), f"the fetcher tried to connect to {address}"
        return socket.create_connection((address, port), timeout)
    return connect


# ----------------------------------------------------------------------------------------------- pure rules
@pytest.mark.parametrize("host, address", [
    ("127.0.0.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"), ("0x7F000001", "127.0.0.1"), ("127.0.0.1.", "127.0.0.1"), ("0", "0.0.0.0"),
    ("[::1]", "::1"), ("[::ffff:127.0.0.1]", "::ffff:7f00:1"), ("169.254.169.254", "169.254.169.254"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"), ("2852039166", "169.254.169.254"),
    ("localhost", None), ("images.example", None), ("08.0.0.1", None), ("256.0.0.1", None), ("1.16777216", None),
    ("1.2.3.4.5", None), ("127..1", None),
])
def test_numeric_hosts_are_read_as_the_address_they_denote(host, address):
    ip = numeric_address(host)
    assert (str(ip) if ip is not None else None) == address


def test_numeric_ipv4_reading_agrees_with_inet_aton():
    """Random addresses written in the forms inet_aton takes (1-4 parts; decimal, octal, hex): our parser and the C
    library's agree (socket.inet_aton parses locally: no network)."""
    rng = random.Random(0)
    formats = [str, lambda v: f"0{v:o}" if v else "0", hex, lambda v: f"0X{v:X}"]
    for _ in range(2000):
        value = rng.getrandbits(32)
        parts = rng.choice([1, 2, 3, 4])
        if parts == 1:
            fields = [value]
        else:
            head = list(value.to_bytes(4, "big"))[:parts - 1]
            fields = head + [value & ((1 << 8 * (5 - parts)) - 1)]
        host = ".".join(rng.choice(formats)(v) for v in fields)
        assert numeric_address(host).packed == socket.inet_aton(host), host


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("10.1.2.3", "private"), ("172.16.5.4", "private"),
    ("192.168.0.1", "private"), ("169.254.169.254", "link-local"), ("100.64.0.1", "not globally reachable"),
    ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("240.0.0.1", "private"),
    ("255.255.255.255", "private"), ("198.18.0.1", "private"), ("::1", "loopback"), ("::", "unspecified"),
    ("fe80::1", "link-local"), ("fc00::1", "private"), ("fd12:3456::1", "private"), ("ff02::1", "multicast"),
    ("fec0::1", "site-local"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::1", "loopback (embedded IPv4 127.0.0.1)"),
    ("64:ff9b::a9fe:a9fe", "link-local (embedded IPv4 169.254.169.254)"),
    ("8.8.8.8", None), (PUBLIC, None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
])
def test_address_kinds(address, kind):
    import ipaddress

    assert refusal(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "scheme 'file'"), ("ftp://images.example/x.png", "scheme 'ftp'"),
    ("gopher://images.example/", "scheme 'gopher'"), ("/etc/passwd", "scheme ''"),
    ("http://user:secret@images.example/x.png", "credentials"), ("http:///x.png", "no host"),
    ("http://images.example:99999/x.png", "malformed URL"),
    ("http://other.example/x.png", "not in --allowed-media-domains"),
    ("http://sub.images.example/x.png", "not in --allowed-media-domains"),
])
def test_urls_refused_before_any_resolution(url, reason):
    with pytest.raises(FetchError) as e:
        check_url(url, MediaPolicy(allowed_domains=MediaPolicy.domains("images.example, B.example.")))
    assert reason in e.value.reason


def test_allowed_domains_match_exactly_and_ignore_case_and_root_dot():
    policy = MediaPolicy(allowed_domains=MediaPolicy.domains(" Images.Example , b.example. "))
    assert policy.allowed_domains == {"images.example", "b.example"}
    assert check_url("https://IMAGES.example./x.png", policy) == ("https", "images.example", 443)
    assert check_url("http://b.example:8080/x", policy) == ("http", "b.example", 8080)
    assert MediaPolicy.domains("") is None and MediaPolicy.domains(None) is None


def test_every_address_of_a_name_must_be_public():
    resolve = resolver({"mixed.example": [PUBLIC, "10.0.0.7"], "ok.example": [PUBLIC, "2606:4700:4700::1111"],
                        "v6.example": ["fd00::5"]})
    policy = MediaPolicy()
    assert checked_addresses("ok.example", 80, policy, resolve) == [PUBLIC, "2606:4700:4700::1111"]
    for host, address in [("mixed.example", "10.0.0.7"), ("v6.example", "fd00::5")]:
        with pytest.raises(FetchError) as e:
            checked_addresses(host, 80, policy, resolve)
        assert address in e.value.reason
    assert checked_addresses("mixed.example", 80, MediaPolicy(allow_private=True), resolve) == [PUBLIC, "10.0.0.7"]
    with pytest.raises(FetchError, match="cannot resolve"):
        checked_addresses("nowhere.example", 80, policy, resolve)


def test_a_numeric_host_never_reaches_the_resolver():
    def no_resolver(host, port):
        raise AssertionError(f"resolver called for {host}")
    assert checked_addresses("0x7f.1", 80, MediaPolicy(allow_private=True), no_resolver) == ["127.0.0.1"]
    with pytest.raises(FetchError, match="loopback"):
        checked_addresses("2130706433", 80, MediaPolicy(), no_resolver)


# ----------------------------------------------------------------------------------------------- the fetcher
def loopback_urls(local):
    p = local.port
    return [f"http://127.0.0.1:{p}/x.png", f"http://localhost:{p}/x.png", f"http://[::1]:{p}/x.png",
            f"http://2130706433:{p}/x.png", f"http://0x7f.1:{p}/x.png", f"http://[::ffff:127.0.0.1]:{p}/x.png",
            f"http://0177.0.0.1:{p}/x.png", f"https://127.0.0.1:{p}/x.png"]


def test_by_default_no_loopback_form_reaches_the_local_server(local):
    fetch = Fetcher(MediaPolicy())  # the real resolver: `localhost` resolves to loopback, which is refused
    for url in loopback_urls(local):
        with pytest.raises(FetchError) as e:
            fetch(url)
        assert "loopback" in e.value.reason, (url, e.value.reason)
    assert local.hits == []


def test_with_private_addresses_allowed_the_image_is_fetched(local):
    fetch = Fetcher(MediaPolicy(allow_private=True))
    assert fetch(local.url("/x.png")) == local.png
    assert fetch(local.url("/redirect?to=" + local.url("/x.png"))) == local.png
    for url, reason in [(local.url("/missing.png"), "HTTP 404"),
                        (f"http://127.0.0.1:{closed_loopback_port()}/x.png", "ConnectionRefusedError")]:
        with pytest.raises(FetchError) as e:
            fetch(url)
        assert reason in e.value.reason and e.value.host == "127.0.0.1"


def test_a_redirect_from_a_public_host_to_a_private_one_is_refused(local):
    connected, calls = [], []
    resolve = resolver({"images.example": [PUBLIC], "internal.example": ["10.0.0.5"]}, calls)
    fetch = Fetcher(MediaPolicy(), resolve=resolve, connect=connector(local, connected))
    public = f"http://images.example:{local.port}"
    assert fetch(public + "/x.png") == local.png  # the stand-in "public" host works
    for target in [local.url("/x.png"), local.url("/x.png", "0x7f.1"), f"http://[::1]:{local.port}/x.png",
                   f"http://internal.example:{local.port}/x.png", "file:///etc/passwd",
                   "http://169.254.169.254/latest/meta-data/"]:
        local.hits.clear()
        with pytest.raises(FetchError) as e:
            fetch(public + "/redirect?to=" + target)
        assert e.value.host == "images.example"  # the message names the client's host, not the hop's
        assert "redirect 1" in e.value.reason
        assert [h.split("?")[0] for h in local.hits] == ["/redirect"]  # the second hop never left
    assert set(connected) == {PUBLIC}


def test_the_name_is_resolved_once_and_the_connection_goes_to_the_checked_address(local):
    """DNS rebinding: a resolver that answers a public address, then loopback, is asked once; the socket goes to
    the public answer (here: the stand-in), and the request carries the name in its Host header."""
    answers = iter([[PUBLIC], ["127.0.0.1"]])
    connected, calls = [], []

    def rebinding(host, port):
        calls.append(host)
        return next(answers)

    fetch = Fetcher(MediaPolicy(), resolve=rebinding, connect=connector(local, connected))
    assert fetch(f"http://images.example:{local.port}/x.png") == local.png
    assert calls == ["images.example"] and connected == [PUBLIC]


def test_at_most_three_redirects(local):
    fetch = Fetcher(MediaPolicy(allow_private=True))
    url = local.url("/x.png")
    for _ in range(MAX_REDIRECTS):
        url = local.url("/redirect?to=" + quote(url, safe=""))
    assert fetch(url) == local.png
    url = local.url("/redirect?to=" + quote(url, safe=""))
    with pytest.raises(FetchError, match="more than 3 redirects"):
        fetch(url)


def test_allowed_domains_refuse_a_redirect_to_another_host(local):
    fetch = Fetcher(MediaPolicy(allowed_domains=frozenset({"localhost"}), allow_private=True))
    assert fetch(local.url("/x.png", "localhost")) == local.png
    local.hits.clear()
    with pytest.raises(FetchError) as e:
        fetch(local.url("/redirect?to=" + local.url("/x.png"), "localhost"))
    assert "not in --allowed-media-domains" in e.value.reason and e.value.host == "localhost"
    assert [h.split("?")[0] for h in local.hits] == ["/redirect"]
    with pytest.raises(FetchError, match="not in --allowed-media-domains"):
        fetch(local.url("/x.png"))
    assert [h.split("?")[0] for h in local.hits] == ["/redirect"]


def test_size_and_time_limits(local):
    with pytest.raises(FetchError, match="over the limit of 100 bytes"):
        Fetcher(MediaPolicy(allow_private=True, max_bytes=100))(local.url("/x.png"))
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out|TimeoutError|timeout"):
        Fetcher(MediaPolicy(allow_private=True, timeout=1.0))(local.url("/slow.png"))
    assert time.monotonic() - start < 3.0  # the whole fetch is bounded, not each read


# ----------------------------------------------------------------------------------------------- the client's view
def test_every_failure_gives_the_client_the_same_message(local):
    """Refused address, closed port, 404, a text file, a redirect to a private host: one message shape, naming
    only the host the client wrote; the reason is for the server's log."""
    def message(url, **policy):
        preparer = Preparer(None, Limits(context=100, **policy), {})
        with pytest.raises(APIError) as e:
            preparer._image(url, 3)
        assert e.value.status == 400 and e.value.code == "image_fetch_failed" and e.value.param == "messages"
        return e.value.message

    expected = "image 3 could not be fetched from {}; send an image URL this server may fetch or the image " \
               "inline as data:image/...;base64,..."
    for url in loopback_urls(local):
        host = url.split("//")[1].rsplit(":", 1)[0].strip("[]")
        assert message(url) == expected.format(host), url
    assert local.hits == []
    private = dict(allow_private_media_urls=True)
    assert message(local.url("/missing.png"), **private) == expected.format("127.0.0.1")
    assert message(local.url("/text.txt"), **private) == expected.format("127.0.0.1")
    assert message(f"http://127.0.0.1:{closed_loopback_port()}/x.png", **private) == expected.format("127.0.0.1")
    only = dict(allow_private_media_urls=True, allowed_media_domains=frozenset({"localhost"}))
    assert message(local.url("/redirect?to=" + local.url("/x.png"), "localhost"), **only) == \
        expected.format("localhost")
    ok = Preparer(None, Limits(context=100, **private), {})._image(local.url("/x.png"), 0)
    assert ok.size == (40, 30)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "/etc/passwd", "x.png"])
def test_other_schemes_and_local_paths_stay_refused(url, local):
    preparer = Preparer(None, Limits(context=100, allow_private_media_urls=True), {})
    with pytest.raises(APIError, match="must be a data:image"):
        preparer._image(url, 0)
