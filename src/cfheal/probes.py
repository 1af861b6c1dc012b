"""WebSocket handshake probes against the edge and against each origin.

A probe is one bounded handshake on its own socket: it sends the upgrade request, reads the
status line, the headers and the start of the body, and closes. One deadline bounds the whole
exchange (name lookup, connect, TLS and every read), and a probe never retries or follows a
redirect, so what it returns is exactly what a client met at that moment.

The handshake is written here instead of taken from a WebSocket client library. websockets 17
holds back a non-101 response until its whole body has arrived, so an error page that arrives
slowly or without an end becomes a timeout with no status. It also follows 3xx redirects with
a second connection, and its errors drop the headers that identify the sender.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from ._threads import map_in_threads
from .config import HostSettings

_BODY_PREVIEW_BYTES = 200
# Bytes of an error page read to find Cloudflare's name in it. The rest is never read.
_BODY_READ_BYTES = 8192
_MAX_HEAD_BYTES = 65536
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_LIMIT_STATUSES = frozenset({502, 503})
# Cloudflare's own 5xx codes and their names in Cloudflare's documentation. Each means that the
# edge could not get a valid response from the origin side.
CLOUDFLARE_ERRORS = {
    520: "web server returned an unknown error",
    521: "web server is down",
    522: "connection timed out",
    523: "origin is unreachable",
    524: "a timeout occurred",
    525: "SSL handshake failed",
    526: "invalid SSL certificate",
    527: "Railgun listener to origin error",
    530: "error 1xxx, named in the page",
}
# 530 carries a 1xxx error in its page. These two are failures on the origin side, and the side
# of any other 1xxx error is left unknown.
_CLOUDFLARE_1XXX_ORIGIN = {1016: "origin DNS error", 1033: "Cloudflare Tunnel error"}
_NAMES_CLOUDFLARE = re.compile(rb"cloudflare", re.IGNORECASE)
_ERROR_1XXX = re.compile(rb"\b(1\d{3})\b")
_HTML_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: (.*))?$")


class ProbeOutcome(StrEnum):
    OK = "ok"
    LIMIT_SUSPECTED = "limit_suspected"
    CLOUDFLARE_ERROR = "cloudflare_error"
    # A 502 or 503 that a proxy behind the edge sent, not the edge itself.
    PROXY_ERROR = "proxy_error"
    HTTP_ERROR = "http_error"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    DNS_ERROR = "dns_error"
    TLS_ERROR = "tls_error"
    PROTOCOL_ERROR = "protocol_error"


class FailureSide(StrEnum):
    """Side of the edge that a failed probe points at."""

    EDGE = "edge"
    ORIGIN = "origin"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ProbeResult:
    """One handshake: where it went, how it ended, and who sent the response when one arrived."""

    target: str
    url: str
    outcome: ProbeOutcome
    status: int | None
    duration_ms: int
    detail: str = ""
    # None when the handshake succeeded.
    side: FailureSide | None = None
    server: str | None = None
    cf_ray: str | None = None
    body_start: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is ProbeOutcome.OK


@dataclass(frozen=True)
class OriginTarget:
    host: str
    container: str
    url: str

    @property
    def label(self) -> str:
        return f"{self.host}/{self.container}"


@dataclass
class _Response:
    """Parts of a response received before the connection ended or the deadline passed."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    head_complete: bool


class _ProbeFailed(Exception):
    def __init__(self, outcome: ProbeOutcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout

    def remaining(self) -> float:
        """Return the seconds left, or raise TimeoutError once the deadline has passed."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left


def probe_handshake(target: str, url: str, *, timeout: float, via_edge: bool = False, edge_server: str | None = None) -> ProbeResult:
    """Open one WebSocket handshake to ``url`` and classify how it ended.

    ``via_edge`` means that ``url`` goes through the edge, so a failure can be on either side of
    it. ``edge_server`` is the Server header the edge sends, or None to skip the sender check.
    A direct probe's failure is always the origin's.
    """
    started = time.monotonic()
    deadline = _Deadline(timeout)
    response: _Response | None = None
    try:
        response = _exchange(url, deadline)
    except _ProbeFailed as failure:
        outcome, status, detail = failure.outcome, None, failure.detail
        side = _transport_failure_side(outcome) if via_edge else FailureSide.ORIGIN
    else:
        status = response.status
        if status == 101:
            outcome, side, detail = ProbeOutcome.OK, None, ""
        else:
            outcome, side, detail = classify_response(response, via_edge=via_edge, edge_server=edge_server)
    duration_ms = round((time.monotonic() - started) * 1000)

    if response is None:
        return ProbeResult(target, url, outcome, status, duration_ms, detail, side)
    return ProbeResult(
        target,
        url,
        outcome,
        status,
        duration_ms,
        detail,
        side,
        server=response.headers.get("server"),
        cf_ray=response.headers.get("cf-ray"),
        body_start=_preview(response.body),
    )


def probe_edge(url: str, *, count: int, spacing: float, timeout: float, edge_server: str | None = None) -> list[ProbeResult]:
    """Probe the edge ``count`` times, one after another, so the probes never compete for a slot."""
    results = []
    for index in range(count):
        if index:
            time.sleep(spacing)
        results.append(probe_handshake("edge", url, timeout=timeout, via_edge=True, edge_server=edge_server))
    return results


def origin_targets(hosts: list[HostSettings]) -> list[OriginTarget]:
    return [
        OriginTarget(host.name, container.name, container.origin)
        for host in hosts
        for container in host.containers
    ]


def probe_origins(targets: list[OriginTarget], *, timeout: float) -> dict[str, ProbeResult]:
    """Probe every origin directly, in parallel; keyed by ``host/container``."""
    results = map_in_threads(
        lambda target: probe_handshake(target.label, target.url, timeout=timeout),
        targets,
        max_workers=16,
        name="origin-probe",
    )
    return {target.label: result for target, result in zip(targets, results)}


# Classification: who sent the response, and which side of the edge failed.


def classify_response(response: _Response, *, via_edge: bool, edge_server: str | None) -> tuple[ProbeOutcome, FailureSide, str]:
    """Classify a non-101 response and return (outcome, side, detail)."""
    status = response.status
    summary = _summarize(response)
    if not via_edge:
        return ProbeOutcome.HTTP_ERROR, FailureSide.ORIGIN, f"origin answered {summary}"

    server = response.headers.get("server")
    from_cloudflare = _product(server) == "cloudflare" or "cf-ray" in response.headers or bool(_NAMES_CLOUDFLARE.search(response.body))

    if status in CLOUDFLARE_ERRORS:
        return _classify_cloudflare_error(response, from_cloudflare)

    if status in _LIMIT_STATUSES:
        if edge_server is None:
            side = FailureSide.EDGE if from_cloudflare else FailureSide.UNKNOWN
            return ProbeOutcome.LIMIT_SUSPECTED, side, f"edge answered {summary}"
        if from_cloudflare or _product(server) == _product(edge_server):
            return ProbeOutcome.LIMIT_SUSPECTED, FailureSide.EDGE, f"edge (Server: {server or 'none'}) answered {summary}"
        if server is None:
            # No Server header and no Cloudflare page, so nothing identifies the sender.
            return ProbeOutcome.LIMIT_SUSPECTED, FailureSide.UNKNOWN, f"answer without a Server header: {summary}"
        detail = f"{server} behind the edge answered {summary}; the edge sends Server: {edge_server}"
        return ProbeOutcome.PROXY_ERROR, FailureSide.ORIGIN, detail

    if 300 <= status < 400 and "location" in response.headers:
        return ProbeOutcome.HTTP_ERROR, FailureSide.UNKNOWN, f"redirect to {response.headers['location']} not followed: {summary}"
    return ProbeOutcome.HTTP_ERROR, FailureSide.UNKNOWN, summary


def _classify_cloudflare_error(response: _Response, from_cloudflare: bool) -> tuple[ProbeOutcome, FailureSide, str]:
    status = response.status
    meaning = cloudflare_error_meaning(status, response.body)
    ray = response.headers.get("cf-ray")
    detail = f"Cloudflare {status} {meaning}" + (f" (CF-RAY {ray})" if ray else "")
    if not from_cloudflare:
        # A 52x is Cloudflare's own code, but without its Server header, CF-RAY or page nothing
        # proves that Cloudflare sent this one.
        return ProbeOutcome.CLOUDFLARE_ERROR, FailureSide.UNKNOWN, f"{detail}, but without Cloudflare's Server header, CF-RAY or page"
    if status == 530:
        code = _error_1xxx(response.body)
        side = FailureSide.ORIGIN if code in _CLOUDFLARE_1XXX_ORIGIN else FailureSide.UNKNOWN
        return ProbeOutcome.CLOUDFLARE_ERROR, side, detail
    return ProbeOutcome.CLOUDFLARE_ERROR, FailureSide.ORIGIN, detail


def cloudflare_error_meaning(status: int, body: bytes = b"") -> str:
    """Return Cloudflare's name for a 52x or 530 status, with the 1xxx error of a 530 page."""
    if status != 530:
        return CLOUDFLARE_ERRORS.get(status, "unknown Cloudflare error")
    code = _error_1xxx(body)
    if code is None:
        return "with no 1xxx error in the page"
    return f"error {code} ({_CLOUDFLARE_1XXX_ORIGIN.get(code, 'see the page')})"


def _transport_failure_side(outcome: ProbeOutcome) -> FailureSide:
    # Refused, unresolvable or failing TLS at the edge's address means the edge's front door;
    # a timeout or a garbled answer could come from either side.
    if outcome in (ProbeOutcome.REFUSED, ProbeOutcome.DNS_ERROR, ProbeOutcome.TLS_ERROR):
        return FailureSide.EDGE
    return FailureSide.UNKNOWN


def _product(server: str | None) -> str | None:
    """Return the first product name of a Server header ("nginx/1.22.1" -> "nginx"), lowercased."""
    if not server:
        return None
    return server.split()[0].split("/")[0].lower()


def _error_1xxx(body: bytes) -> int | None:
    match = _ERROR_1XXX.search(body)
    return int(match.group(1)) if match else None


def _summarize(response: _Response) -> str:
    title = _HTML_TITLE.search(response.body)
    text = title.group(1) if title else response.body[:80] or response.reason.encode("latin-1")
    text = " ".join(text.decode("utf-8", errors="replace").split())
    summary = f"HTTP {response.status}" + (f": {text}" if text else "")
    if not response.head_complete:
        summary += " (headers incomplete when the connection ended or the deadline passed)"
    return summary


def _preview(body: bytes) -> str:
    return body[:_BODY_PREVIEW_BYTES].decode("utf-8", errors="replace").strip()


# The exchange on the wire.


def _exchange(url: str, deadline: _Deadline) -> _Response:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise _ProbeFailed(ProbeOutcome.PROTOCOL_ERROR, f"invalid WebSocket URL {url!r}: expected ws:// or wss:// and a host")
    try:
        port = parts.port or (443 if parts.scheme == "wss" else 80)
    except ValueError:
        raise _ProbeFailed(ProbeOutcome.PROTOCOL_ERROR, f"invalid port in WebSocket URL {url!r}") from None

    try:
        sock = _connect(parts.hostname, port, deadline)
        try:
            if parts.scheme == "wss":
                sock = _start_tls(sock, parts.hostname, deadline)
            key = base64.b64encode(os.urandom(16))
            sock.settimeout(deadline.remaining())
            sock.sendall(_upgrade_request(parts, port, key))
            response = _read_response(sock, deadline)
            if response.status == 101:
                _check_upgrade(response, key)
                _close_websocket(sock, deadline)
            return response
        finally:
            sock.close()
    except (TimeoutError, socket.timeout):
        raise _ProbeFailed(ProbeOutcome.TIMEOUT, f"no handshake answer within {deadline.timeout:g}s") from None
    except ssl.SSLError as error:
        raise _ProbeFailed(ProbeOutcome.TLS_ERROR, f"TLS failed: {error.reason or error}") from None
    except ConnectionError as error:
        raise _ProbeFailed(ProbeOutcome.PROTOCOL_ERROR, f"connection failed during the handshake: {error.strerror or error}") from None
    except OSError as error:
        raise _ProbeFailed(ProbeOutcome.PROTOCOL_ERROR, f"socket error during the handshake: {error.strerror or error}") from None


def _connect(host: str, port: int, deadline: _Deadline) -> socket.socket:
    addresses = _resolve(host, port, deadline)
    last_error: OSError | None = None
    for family, kind, protocol, _, address in addresses:
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(address)
        except OSError as error:
            sock.close()
            if isinstance(error, (TimeoutError, socket.timeout)):
                raise
            last_error = error
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    if isinstance(last_error, ConnectionRefusedError):
        raise _ProbeFailed(ProbeOutcome.REFUSED, "connection refused")
    raise _ProbeFailed(ProbeOutcome.REFUSED, f"connect failed: {getattr(last_error, 'strerror', None) or last_error}")


def _resolve(host: str, port: int, deadline: _Deadline) -> list:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)

    # getaddrinfo takes no timeout, so a slow resolver is waited for in a thread that is left
    # behind when the deadline passes.
    found: dict[str, object] = {}

    def lookup() -> None:
        try:
            found["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            found["error"] = error

    thread = threading.Thread(target=lookup, name="probe-dns", daemon=True)
    thread.start()
    thread.join(deadline.remaining())
    if "error" in found:
        raise _ProbeFailed(ProbeOutcome.DNS_ERROR, f"name lookup of {host} failed: {found['error'].strerror}")
    if "addresses" not in found:
        raise _ProbeFailed(ProbeOutcome.TIMEOUT, f"name lookup of {host} did not finish within {deadline.timeout:g}s")
    return found["addresses"]


def _start_tls(sock: socket.socket, host: str, deadline: _Deadline) -> socket.socket:
    context = ssl.create_default_context()
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    # CPython bounds the whole TLS handshake by the socket timeout, not each read within it.
    tls.settimeout(deadline.remaining())
    tls.do_handshake()
    return tls


def _upgrade_request(parts, port: int, key: bytes) -> bytes:
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    default_port = 443 if parts.scheme == "wss" else 80
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    host_header = host if port == default_port else f"{host}:{port}"
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
        "User-Agent: cfheal-probe",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket, deadline: _Deadline) -> _Response:
    """Read the status line, headers and up to _BODY_READ_BYTES of body, until the deadline.

    An answer cut short by the deadline or the peer still returns its status when the status
    line arrived in full.
    """
    buffer = b""
    timed_out = ended = False
    while b"\r\n\r\n" not in buffer and len(buffer) <= _MAX_HEAD_BYTES:
        data = _receive(sock, deadline)
        if data is None:
            timed_out = True
            break
        if not data:
            ended = True
            break
        buffer += data

    head, separator, body = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if len(lines) < 2 and not separator:
        if timed_out and not buffer:
            raise TimeoutError
        if timed_out:
            raise _ProbeFailed(ProbeOutcome.TIMEOUT, f"status line incomplete after {deadline.timeout:g}s ({len(buffer)} bytes received)")
        if not buffer:
            raise _ProbeFailed(ProbeOutcome.PROTOCOL_ERROR, "connection closed before any answer")
        raise _ProbeFailed(ProbeOutcome.PROTOCOL_ERROR, f"connection closed inside the status line ({len(buffer)} bytes received)")

    match = _STATUS_LINE.match(lines[0])
    if not match:
        status_line = lines[0][:80].decode("latin-1")
        raise _ProbeFailed(ProbeOutcome.PROTOCOL_ERROR, f"invalid HTTP status line {status_line!r}")
    status = int(match.group(1))
    reason = (match.group(2) or b"").decode("latin-1")
    # Without the blank line, the last line may be cut in the middle.
    header_lines = lines[1:] if separator else lines[1:-1]
    headers = _parse_headers(header_lines)
    response = _Response(status, reason, headers, b"", head_complete=bool(separator))

    if separator and status != 101 and _has_body(status):
        response.body = _read_body(sock, deadline, headers, body, ended or timed_out)
    return response


def _receive(sock: socket.socket, deadline: _Deadline) -> bytes | None:
    """Return the next bytes, b"" at end of stream, or None once the deadline has passed."""
    try:
        sock.settimeout(deadline.remaining())
        return sock.recv(4096)
    except (TimeoutError, socket.timeout):
        return None
    except ConnectionError:
        # A reset after the answer has started still leaves what arrived before it.
        return b""


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, separator, value = line.decode("latin-1").partition(":")
        if not separator:
            continue
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _has_body(status: int) -> bool:
    return not (100 <= status < 200 or status in (204, 304))


def _read_body(sock: socket.socket, deadline: _Deadline, headers: dict[str, str], received: bytes, finished: bool) -> bytes:
    """Read the start of the body: the whole of a short one, else _BODY_READ_BYTES at most."""
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    limit = _BODY_READ_BYTES
    length = headers.get("content-length", "")
    if not chunked and length.isdigit():
        limit = min(limit, int(length))

    raw = received
    while not finished and len(_decoded(raw, chunked)) < limit and not (chunked and raw.endswith(b"0\r\n\r\n")):
        data = _receive(sock, deadline)
        if not data:
            break
        raw += data
    return _decoded(raw, chunked)[:limit]


def _decoded(raw: bytes, chunked: bool) -> bytes:
    return _dechunk(raw) if chunked else raw


def _dechunk(raw: bytes) -> bytes:
    """Decode as much of a chunked body as arrived; a chunk cut short keeps what came."""
    body = b""
    position = 0
    while True:
        line_end = raw.find(b"\r\n", position)
        if line_end < 0:
            return body
        size_text = raw[position:line_end].split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return body
        if size == 0:
            return body
        start = line_end + 2
        body += raw[start : start + size]
        if start + size + 2 > len(raw):
            return body
        position = start + size + 2


def _check_upgrade(response: _Response, key: bytes) -> None:
    expected = base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest()).decode()
    headers = response.headers
    if headers.get("upgrade", "").lower() != "websocket":
        raise _ProbeFailed(ProbeOutcome.PROTOCOL_ERROR, f"101 without Upgrade: websocket (Upgrade: {headers.get('upgrade', 'missing')})")
    if "upgrade" not in [token.strip().lower() for token in headers.get("connection", "").split(",")]:
        raise _ProbeFailed(ProbeOutcome.PROTOCOL_ERROR, f"101 without Connection: Upgrade (Connection: {headers.get('connection', 'missing')})")
    if headers.get("sec-websocket-accept") != expected:
        raise _ProbeFailed(ProbeOutcome.PROTOCOL_ERROR, f"101 with an invalid Sec-WebSocket-Accept {headers.get('sec-websocket-accept', 'missing')!r}")


def _close_websocket(sock: socket.socket, deadline: _Deadline) -> None:
    """Send a close frame (1000) and wait briefly for the server to end the connection.

    The handshake has already succeeded, so a server that closes first or drops the
    connection (the client-side codes 1001 and 1006) does not change the result.
    """
    mask = os.urandom(4)
    payload = (1000).to_bytes(2, "big")
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    try:
        sock.settimeout(min(deadline.remaining(), 1.0))
        sock.sendall(b"\x88\x82" + mask + masked)
        # Reading to the end lets the server close first; closing with its close frame still
        # unread would make the kernel send a reset, which the server logs as an abnormal close.
        while sock.recv(4096):
            pass
    except (OSError, TimeoutError):
        pass
