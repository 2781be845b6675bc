"""Fetching a client's `http(s)://` image for the server without letting the client reach the server's network.

A URL in a request makes the server open a connection; without rules a client could make it request the cloud
metadata address, its own admin port, or any internal host (server-side request forgery). The rules, all pure
functions so they are tested without a network:

- only `http` and `https`, no credentials in the URL; with an allow-list (`--allowed-media-domains`), only those
  host names (exact, case-insensitive);
- the host is resolved once (a numeric host in any form `inet_aton` accepts — `2130706433`, `0x7f.1`,
  `0177.0.0.1` — is read as the address it denotes, without a resolver) and every address must be public:
  loopback, private, link-local, unique-local, shared (100.64/10), multicast, reserved and unspecified ranges are
  refused, for IPv4 and IPv6, including IPv4 addresses embedded in IPv6 (mapped, 6to4, NAT64) — unless the
  deployment opts in to private addresses (`--allow-private-media-urls`);
- the connection goes to an address that was checked (the Host header and TLS SNI/certificate check use the name),
  so a name that resolves differently a moment later (DNS rebinding) does not pass;
- each redirect hop is checked the same way, at most MAX_REDIRECTS of them; the body has a size and a time limit.

Every refusal or failure is a `FetchError` whose `reason` is for the server's log; the client gets one message that
does not tell a refused address from a closed port, a 404 or a body that is not an image (see prepare.py).
"""
from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Union
from urllib.parse import urljoin, urlsplit

from ..errors import Idefics3Error

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Resolver = Callable[[str, int], List[str]]  # (host name, port) -> the addresses it resolves to
Connector = Callable[[str, int, float], socket.socket]  # (checked address, port, timeout) -> a connected socket

MAX_REDIRECTS = 3
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# IPv4 inside IPv6 that a router may deliver to the IPv4 address: NAT64's well-known and local-use prefixes
NAT64_PREFIXES = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
# one part of a numeric IPv4 host as inet_aton reads it: hex (0x..), octal (leading 0) or decimal
_INET_ATON_PART = re.compile(r"^(0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*)$", re.IGNORECASE)


class FetchError(Idefics3Error):
    """A remote image that was refused or could not be fetched; `reason` is for the server's log only."""

    def __init__(self, host: str, reason: str):
        super().__init__(f"could not fetch an image from {host}: {reason}")
        self.host, self.reason = host, reason


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: Optional[frozenset] = None  # None: any host name; else only these (lower case, no dot at end)
    allow_private: bool = False
    timeout: float = 10.0  # seconds for the whole fetch, redirects included
    max_bytes: int = 20 * 2**20

    @staticmethod
    def domains(text: Optional[str]) -> Optional[frozenset]:
        """'a.com, B.org.' -> {'a.com', 'b.org'}; None or blank -> None (no allow-list)."""
        if not text or not text.strip():
            return None
        return frozenset(normalize_host(d) for d in text.split(",") if d.strip())


# ----------------------------------------------------------------------------------------------- pure rules
def normalize_host(host: str) -> str:
    """Lower case, without the brackets of an IPv6 literal and without a DNS root dot at the end."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") and not host.endswith("..") else host


def numeric_address(host: str) -> Optional[IPAddress]:
    """The address a numeric host denotes, or None for a name. IPv6 literals (with a zone or not), and IPv4 in the
    forms the C library's inet_aton accepts — 1 to 4 parts of decimal, octal (leading 0) or hex (0x); the last part
    fills the remaining bytes — so `2130706433`, `0x7f.1`, `127.1` and `0177.0.0.1` are all 127.0.0.1, as the
    resolver would make them."""
    host = normalize_host(host)
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.match(p) for p in parts):
        return None
    values = [int(p, 16) if p[:2].lower() == "0x" else int(p, 8) if p.startswith("0") else int(p)
              for p in (p if p.lower() != "0x" else "0x0" for p in parts)]
    last_bits = 8 * (5 - len(values))
    if any(v > 255 for v in values[:-1]) or values[-1] >= 1 << last_bits:
        return None  # out of range: inet_aton refuses it too, and a resolver would take it for a name
    value = 0
    for v in values[:-1]:
        value = value << 8 | v
    return ipaddress.IPv4Address(value << last_bits | values[-1])


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in NAT64_PREFIXES):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: IPAddress) -> Optional[str]:
    """Why the server must not connect to `ip` (its kind: 'loopback', 'private', ...), or None for a public
    address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket
            return refusal(ip.ipv4_mapped)
        embedded = _embedded_ipv4(ip)
        if embedded is not None and refusal(embedded):
            return f"{refusal(embedded)} (embedded IPv4 {embedded})"
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved", "site_local"):
        if getattr(ip, f"is_{kind}", False):
            return kind.replace("_", "-")
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT), which is neither private nor global
        return "not globally reachable"
    return None


def check_url(url: str, policy: MediaPolicy) -> tuple:
    """(scheme, host, port) of a URL the policy lets the server fetch, after the checks that need no resolver;
    else FetchError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchError(url_host(url), f"malformed URL ({e})") from None
    scheme, host = parts.scheme.lower(), normalize_host(parts.hostname or "")
    if scheme not in ("http", "https"):
        raise FetchError(host or "?", f"scheme {scheme!r} is not http or https")
    if not host:
        raise FetchError("?", "no host in the URL")
    if parts.username is not None or parts.password is not None:
        raise FetchError(host, "credentials in the URL")
    if policy.allowed_domains is not None and host not in policy.allowed_domains:
        raise FetchError(host, "host not in --allowed-media-domains")
    return scheme, host, port or (443 if scheme == "https" else 80)


def checked_addresses(host: str, port: int, policy: MediaPolicy, resolve: Resolver) -> List[str]:
    """The addresses to connect to for `host`: a numeric host is its own address (no resolver call); a name is
    resolved once and every address it resolves to must pass (one private address among public ones refuses the
    host: which one a client library would pick is not ours to guess)."""
    numeric = numeric_address(host)
    if numeric is not None:
        addresses = [numeric]
    else:
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolve(host, port)]
        except (OSError, UnicodeError, ValueError) as e:
            raise FetchError(host, f"cannot resolve ({e})") from None
        if not addresses:
            raise FetchError(host, "resolves to no address")
    if not policy.allow_private:
        for ip in addresses:
            reason = refusal(ip)
            if reason:
                raise FetchError(host, f"resolves to {ip}, a {reason} address (--allow-private-media-urls to allow)")
    return [str(ip) for ip in addresses]


# ----------------------------------------------------------------------------------------------- the network
def system_resolve(host: str, port: int) -> List[str]:
    seen: List[str] = []
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if sockaddr[0] not in seen:
            seen.append(sockaddr[0])
    return seen


def tcp_connect(address: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((address, port), timeout)


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP connection to `host` (Host header) that opens its socket to the checked addresses only."""

    def __init__(self, host, port, addresses, connect: Connector, timeout):
        super().__init__(host, port, timeout=timeout)
        self._create_connection = _pinned(addresses, connect)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As _PinnedConnection, over TLS: SNI and the certificate check use the host name, not the address."""

    def __init__(self, host, port, addresses, connect: Connector, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._create_connection = _pinned(addresses, connect)


def _pinned(addresses: Iterable[str], connect: Connector):
    def create_connection(_host_port, timeout, _source_address=None):
        error: Optional[OSError] = None
        for address in addresses:
            try:
                return connect(address, _host_port[1], timeout)
            except OSError as e:
                error = e
        raise error or OSError("no address to connect to")
    return create_connection


class Fetcher:
    """`fetcher(url) -> bytes` under a MediaPolicy. `resolve` and `connect` are the only ways out to the network
    (tests pass stand-ins)."""

    def __init__(self, policy: MediaPolicy, resolve: Resolver = system_resolve, connect: Connector = tcp_connect):
        self.policy, self.resolve, self.connect = policy, resolve, connect

    def __call__(self, url: str) -> bytes:
        deadline = time.monotonic() + self.policy.timeout
        first_host = url_host(url)
        for hop in range(MAX_REDIRECTS + 1):
            try:
                status, location, body = self._get(url, deadline)
            except FetchError as e:  # named by the client's host; the log gets the hop that failed
                reason = e.reason if hop == 0 else f"redirect {hop} to {_for_log(url)}: {e.reason}"
                raise FetchError(first_host, reason) from None
            if status in REDIRECT_STATUSES:
                if not location:
                    raise FetchError(first_host, f"HTTP {status} without a Location header from {_for_log(url)}")
                if hop == MAX_REDIRECTS:
                    raise FetchError(first_host, f"more than {MAX_REDIRECTS} redirects")
                url = urljoin(url, location)
                continue
            if not 200 <= status < 300:
                raise FetchError(first_host, f"HTTP {status} from {_for_log(url)}")
            return body
        raise AssertionError("unreachable")

    def _get(self, url: str, deadline: float):
        """(status, Location header, body of a 2xx) of one GET, every rule checked first."""
        scheme, host, port = check_url(url, self.policy)
        addresses = checked_addresses(host, port, self.policy, self.resolve)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(host, f"timed out ({self.policy.timeout:g} s)")
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedConnection
        conn = cls(host, port, addresses, self.connect, remaining)
        try:
            conn.request("GET", target, headers={"User-Agent": "mindone_idefics3", "Accept": "image/*"})
            sock = conn.sock  # getresponse() drops conn.sock when the server closes after the body
            response = conn.getresponse()
            if response.status in REDIRECT_STATUSES or not 200 <= response.status < 300:
                return response.status, response.getheader("Location"), b""
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
                raise FetchError(host, f"Content-Length {declared} over the limit of {self.policy.max_bytes} bytes")
            return response.status, None, self._read(sock, response, host, deadline)
        except FetchError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise FetchError(host, f"{type(e).__name__}: {e}") from None
        finally:
            conn.close()

    def _read(self, sock, response, host: str, deadline: float) -> bytes:
        """The body, at most max_bytes, within the deadline (a server that trickles bytes is cut off)."""
        chunks, size = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError(host, f"timed out reading the body ({self.policy.timeout:g} s)")
            sock.settimeout(remaining)
            chunk = response.read1(min(65536, self.policy.max_bytes + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > self.policy.max_bytes:
                raise FetchError(host, f"body over the limit of {self.policy.max_bytes} bytes")


def url_host(url: str) -> str:
    """The host of a URL as the client wrote it, for messages (never the address it resolved to)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        host = None
    return normalize_host(host)[:255] if host else "?"


def _for_log(url: str) -> str:
    """A URL without its query and fragment (signed URLs carry secrets there)."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    except ValueError:
        return "?"
