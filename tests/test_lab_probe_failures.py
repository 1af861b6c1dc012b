"""Probe and diagnosis failures from the field, reproduced against real servers on loopback.

The edge's responses come from a real nginx on 127.0.0.41 and from a raw-socket HTTP server
that sends crafted bytes with crafted timing. Normal client churn runs on the lab itself.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import subprocess
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cfheal.config import EdgeSettings, load_config
from cfheal.diagnosis import DiagnosisKind, diagnose
from cfheal.probes import FailureSide, OriginTarget, ProbeOutcome, probe_edge, probe_handshake, probe_origins
from conftest import EDGE_URL, HOSTS, LAB_CONFIG, cfheal_json, edge_status, lab, start_times

NGINX_ADDRESS = "127.0.0.41"
EDGE_ADDRESS = "127.0.0.42"
OTHER_ADDRESS = "127.0.0.43"
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CLOUDFLARE_522_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>example.com | 522: Connection timed out</title></head>"
    b'<body><div id="cf-error-details"><h1>Connection timed out</h1><span>Error code 522</span>'
    b"<p>Visit cloudflare.com for more information.</p><p>Cloudflare Ray ID: 8f1c2d3e4a5b6c7d</p>"
    b"</div></body></html>\n"
)
CLOUDFLARE_503_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>503 Service Temporarily Unavailable</title></head>"
    b"<body><h1>503 Service Temporarily Unavailable</h1><hr><center>cloudflare</center></body></html>\n"
)
NGINX_503_PAGE = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    b"<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


# A raw-socket HTTP server that sends crafted bytes with crafted timing to every request.


@dataclass
class Answer:
    """What the raw server sends: chunks, each after its delay in seconds, then an optional hold."""

    chunks: list[tuple[float, bytes]]
    hold_open: float = 0.0
    upgrade: bool = False


@dataclass
class RawServer:
    address: str
    answer: Answer
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    def url(self, path: str = "/ws/") -> str:
        return f"ws://{self.address}:{self.port}{path}"


def http_response(status: int, reason: str, headers: dict[str, str], body: bytes, *, length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _accept_key(request: bytes) -> str:
    for line in request.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-key":
            digest = hashlib.sha1((value.strip() + WEBSOCKET_GUID).encode()).digest()
            return base64.b64encode(digest).decode()
    raise AssertionError(f"request without Sec-WebSocket-Key: {request!r}")


def _serve_connection(server: RawServer, connection: socket.socket) -> None:
    with connection:
        connection.settimeout(10)
        request = b""
        try:
            while b"\r\n\r\n" not in request:
                data = connection.recv(4096)
                if not data:
                    return
                request += data
        except OSError:
            return
        server.requests.append(request)
        chunks = server.answer.chunks
        if server.answer.upgrade:
            head = (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {_accept_key(request)}\r\n\r\n"
            ).encode()
            chunks = [(0.0, head), *chunks]
        try:
            for delay, data in chunks:
                time.sleep(delay)
                connection.sendall(data)
            time.sleep(server.answer.hold_open)
        except OSError:
            # The probe closed first, which is what a bounded probe does to a slow response.
            return


@pytest.fixture
def raw_server():
    """Start raw HTTP servers on loopback; return a factory ``(address, Answer) -> RawServer``."""
    listeners: list[socket.socket] = []

    def start(address: str, answer: Answer) -> RawServer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, 0))
        listener.listen(16)
        listeners.append(listener)
        server = RawServer(address, answer, port=listener.getsockname()[1])

        def accept_loop() -> None:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                server.connections += 1
                threading.Thread(target=_serve_connection, args=(server, connection), daemon=True).start()

        threading.Thread(target=accept_loop, daemon=True).start()
        return server

    yield start
    for listener in listeners:
        listener.close()


@pytest.fixture
def nginx_503(tmp_path):
    """Run a real nginx on 127.0.0.41:8080 that answers every request 503 with an HTML page."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    root = tmp_path / "nginx"
    (root / "html").mkdir(parents=True)
    (root / "logs").mkdir()
    (root / "html" / "503.html").write_text(
        "<!DOCTYPE html>\n<html><head><title>Service unavailable</title></head>\n"
        "<body><h1>We are over capacity</h1><p>Try again in a few minutes.</p></body></html>\n"
    )
    config = root / "nginx.conf"
    # user root: the workers must read the page under pytest's root-only tmp_path.
    config.write_text(f"""
user root;
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/logs/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {root}/logs/access.log;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen {NGINX_ADDRESS}:8080;
        error_page 503 /503.html;
        location = /503.html {{ root {root}/html; internal; }}
        location / {{ return 503; }}
    }}
}}
""")
    process = subprocess.Popen([nginx, "-p", f"{root}/", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((NGINX_ADDRESS, 8080), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"nginx did not listen on {NGINX_ADDRESS}:8080: {process.stderr.read().decode()}") from None
                time.sleep(0.1)
        yield f"ws://{NGINX_ADDRESS}:8080/ws/"
    finally:
        process.terminate()
        process.wait(timeout=10)


def timed_probe(url: str, *, timeout: float, **identity):
    started = time.monotonic()
    result = probe_handshake("edge", url, timeout=timeout, via_edge=True, **identity)
    return result, time.monotonic() - started


# 1. Handshake libraries that hide the status.


def test_nginx_503_page_returns_status_and_body(nginx_503):
    result, elapsed = timed_probe(nginx_503, timeout=3.0)

    assert result.status == 503
    assert result.body_start.startswith("<!DOCTYPE html>")
    assert "over capacity" in result.body_start
    assert result.server.startswith("nginx")
    assert elapsed < 3.0


SLOW_503_HEAD = b"HTTP/1.1 503 Service Unavailable\r\nServer: cloudflare\r\nContent-Type: text/html\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        # The body arrives one byte every 250 ms: every read succeeds, the whole never ends.
        Answer([(0.0, SLOW_503_HEAD + b"Content-Length: 4000\r\n\r\n")] + [(0.25, b"<")] * 40),
        # No Content-Length and the connection stays open: the body ends only at close.
        Answer([(0.0, SLOW_503_HEAD + b"\r\n<html>over capacity")], hold_open=10),
        # A body larger than the 1 MiB websockets 17 accepts before it drops the response.
        Answer([(0.0, SLOW_503_HEAD + b"Content-Length: 2097152\r\n\r\n" + b"<" * 65536)], hold_open=10),
    ],
    ids=["trickling_body", "unterminated_body", "oversized_body"],
)
def test_slow_503_body_keeps_status(raw_server, answer):
    server = raw_server(EDGE_ADDRESS, answer)

    result, elapsed = timed_probe(server.url(), timeout=2.0)

    assert result.status == 503
    assert result.body_start.startswith("<")
    assert elapsed < 2.5


def test_trickling_headers_bounded_by_total_deadline(raw_server):
    # Each header byte arrives 200 ms after the last, well inside any per-read timeout.
    headers = b"Server: cloudflare\r\nX-Padding: " + b"x" * 60 + b"\r\n\r\n"
    answer = Answer([(0.0, b"HTTP/1.1 503 Service Unavailable\r\n")] + [(0.2, bytes([byte])) for byte in headers])
    server = raw_server(EDGE_ADDRESS, answer)

    result, elapsed = timed_probe(server.url(), timeout=2.0)

    assert elapsed < 2.5
    assert result.status == 503
    assert "incomplete" in result.detail


def test_trickling_status_line_times_out_at_deadline(raw_server):
    answer = Answer([(0.3, bytes([byte])) for byte in b"HTTP/1.1 503 Service Unavailable\r\n\r\n"])
    server = raw_server(EDGE_ADDRESS, answer)

    result, elapsed = timed_probe(server.url(), timeout=2.0)

    assert elapsed < 2.5
    assert result.outcome is ProbeOutcome.TIMEOUT
    assert result.status is None


def test_redirect_is_not_followed(raw_server):
    target = raw_server(OTHER_ADDRESS, Answer([], upgrade=True))
    redirect = http_response(302, "Found", {"Location": target.url()}, b"")
    server = raw_server(EDGE_ADDRESS, Answer([(0.0, redirect)]))

    result, _ = timed_probe(server.url(), timeout=2.0)

    assert result.status == 302
    assert result.outcome is ProbeOutcome.HTTP_ERROR
    assert server.connections == 1
    assert target.connections == 0


def test_close_without_answer_is_one_attempt(raw_server):
    server = raw_server(EDGE_ADDRESS, Answer([]))

    result, _ = timed_probe(server.url(), timeout=2.0)

    assert result.outcome is ProbeOutcome.PROTOCOL_ERROR
    assert result.status is None
    assert server.connections == 1


# 2. Whose error is it.

CLOUDFLARE_HEADERS = {"Server": "cloudflare", "CF-RAY": "8f1c2d3e4a5b6c7d-FRA", "Content-Type": "text/html"}


@pytest.mark.parametrize(
    ("status", "meaning"),
    [
        (520, "unknown error"),
        (521, "web server is down"),
        (522, "connection timed out"),
        (523, "origin is unreachable"),
        (524, "a timeout occurred"),
        (525, "SSL handshake failed"),
        (526, "invalid SSL certificate"),
        (527, "Railgun"),
    ],
)
def test_cloudflare_52x_blames_origin_side(raw_server, status, meaning):
    body = CLOUDFLARE_522_PAGE.replace(b"522", str(status).encode())
    server = raw_server(EDGE_ADDRESS, Answer([(0.0, http_response(status, "", CLOUDFLARE_HEADERS, body))]))

    result, _ = timed_probe(server.url(), timeout=2.0, edge_server="cloudflare")

    assert result.outcome is ProbeOutcome.CLOUDFLARE_ERROR
    assert result.side is FailureSide.ORIGIN
    assert meaning in result.detail
    assert result.cf_ray == "8f1c2d3e4a5b6c7d-FRA"


@pytest.mark.parametrize(("error_code", "side"), [(1016, FailureSide.ORIGIN), (1033, FailureSide.ORIGIN), (1018, FailureSide.UNKNOWN)])
def test_cloudflare_530_side_from_1xxx_code(raw_server, error_code, side):
    body = f"<html><title>Error {error_code}</title><body>Cloudflare error code: {error_code}</body></html>".encode()
    server = raw_server(EDGE_ADDRESS, Answer([(0.0, http_response(530, "", CLOUDFLARE_HEADERS, body))]))

    result, _ = timed_probe(server.url(), timeout=2.0, edge_server="cloudflare")

    assert result.outcome is ProbeOutcome.CLOUDFLARE_ERROR
    assert result.side is side
    assert str(error_code) in result.detail


def test_cloudflare_522_quorum_is_origin_failure(raw_server):
    edge = raw_server(EDGE_ADDRESS, Answer([(0.0, http_response(522, "", CLOUDFLARE_HEADERS, CLOUDFLARE_522_PAGE))]))
    origin = raw_server(OTHER_ADDRESS, Answer([], upgrade=True))

    edge_results = probe_edge(edge.url(), count=5, spacing=0.0, timeout=2.0, edge_server="cloudflare")
    origin_results = probe_origins([OriginTarget("backend-1", "ws-backend", origin.url())], timeout=2.0)
    diagnosis = diagnose(edge_results, origin_results, quorum=3)

    assert all(result.side is FailureSide.ORIGIN for result in edge_results)
    assert origin_results["backend-1/ws-backend"].ok
    assert diagnosis.kind is DiagnosisKind.ORIGIN_FAILURE
    assert "522" in diagnosis.reason
    assert "according to Cloudflare" in diagnosis.reason
    assert "connection timed out" in diagnosis.reason


def test_503_page_naming_cloudflare_is_edge_limit(raw_server):
    # No Server header at all: the page is the only sign of who sent it.
    edge = raw_server(EDGE_ADDRESS, Answer([(0.0, http_response(503, "Service Unavailable", {"Content-Type": "text/html"}, CLOUDFLARE_503_PAGE))]))
    origin = raw_server(OTHER_ADDRESS, Answer([], upgrade=True))

    edge_results = probe_edge(edge.url(), count=5, spacing=0.0, timeout=2.0, edge_server="cloudflare")
    origin_results = probe_origins([OriginTarget("backend-1", "ws-backend", origin.url())], timeout=2.0)
    diagnosis = diagnose(edge_results, origin_results, quorum=3)

    assert all(result.outcome is ProbeOutcome.LIMIT_SUSPECTED for result in edge_results)
    assert all(result.side is FailureSide.EDGE for result in edge_results)
    assert diagnosis.kind is DiagnosisKind.EDGE_CONNECTION_LIMIT


def test_nginx_503_behind_edge_is_not_limit(raw_server):
    answer = http_response(503, "Service Temporarily Unavailable", {"Server": "nginx", "Content-Type": "text/html"}, NGINX_503_PAGE)
    edge = raw_server(EDGE_ADDRESS, Answer([(0.0, answer)]))
    origin = raw_server(OTHER_ADDRESS, Answer([], upgrade=True))

    edge_results = probe_edge(edge.url(), count=5, spacing=0.0, timeout=2.0, edge_server="cloudflare")
    origin_results = probe_origins([OriginTarget("backend-1", "ws-backend", origin.url())], timeout=2.0)
    diagnosis = diagnose(edge_results, origin_results, quorum=3)

    assert all(result.outcome is ProbeOutcome.PROXY_ERROR for result in edge_results)
    assert all(result.side is FailureSide.ORIGIN for result in edge_results)
    assert diagnosis.kind is not DiagnosisKind.EDGE_CONNECTION_LIMIT
    assert diagnosis.kind is DiagnosisKind.ORIGIN_FAILURE
    assert "nginx" in diagnosis.reason


def test_edge_server_setting_defaults_to_cloudflare():
    assert EdgeSettings(url="wss://example.com/ws/").server == "cloudflare"
    assert load_config(LAB_CONFIG).edge.server == "nginx"


@pytest.mark.lab
def test_lab_edge_limit_needs_nginx_identity(healthy_lab):
    lab("saturate")
    server = load_config(LAB_CONFIG).edge.server

    as_configured = probe_edge(EDGE_URL, count=3, spacing=0.1, timeout=3.0, edge_server=server)
    as_cloudflare = probe_edge(EDGE_URL, count=3, spacing=0.1, timeout=3.0, edge_server="cloudflare")

    assert [result.outcome for result in as_configured] == [ProbeOutcome.LIMIT_SUSPECTED] * 3
    assert [result.side for result in as_configured] == [FailureSide.EDGE] * 3
    assert [result.outcome for result in as_cloudflare] == [ProbeOutcome.PROXY_ERROR] * 3


# 3. Normal churn is not an outage.


@pytest.mark.parametrize(
    "after_upgrade",
    [
        (0.0, b"\x88\x02\x03\xe9"),  # close frame, code 1001 (going away)
        (0.0, b""),  # TCP close without a close frame: the client sees 1006
    ],
    ids=["close_1001", "drop_1006"],
)
def test_close_right_after_upgrade_is_ok(raw_server, after_upgrade):
    server = raw_server(OTHER_ADDRESS, Answer([after_upgrade], upgrade=True))

    result = probe_handshake("backend-1/ws-backend", server.url(), timeout=2.0)

    assert result.ok
    assert result.status == 101


def _drain(client, codes: list[int]) -> None:
    try:
        while True:
            client.recv()
    except ConnectionClosed as closed:
        codes.append(closed.rcvd.code if closed.rcvd else 1006)


@pytest.mark.lab
def test_client_churn_is_healthy(healthy_lab, lab_config):
    config = lab_config()
    codes: list[int] = []
    with ExitStack() as stack:
        clients = [stack.enter_context(connect(EDGE_URL, open_timeout=5, proxy=None)) for _ in range(9)]
        readers = [threading.Thread(target=_drain, args=(client, codes), daemon=True) for client in clients]
        for reader in readers:
            reader.start()

        # Idle clients leave with 1001, and a backend killed without warning drops its clients (1006).
        for client in clients[:3]:
            client.close(code=1001, reason="idle")
        engine = docker.APIClient(base_url="unix:///run/cfheal-lab/backend-2/docker.sock", version="1.41", timeout=30)
        try:
            engine.kill("ws-backend")
            for reader in readers[:3]:
                reader.join(timeout=5)
            deadline = time.monotonic() + 10
            while 1006 not in codes and time.monotonic() < deadline:
                time.sleep(0.1)
            engine.start("ws-backend")
        finally:
            engine.close()
        deadline = time.monotonic() + 15
        while probe_handshake("backend-2/ws-backend", "ws://127.0.0.12:8081/ws/", timeout=1.0).status != 101:
            assert time.monotonic() < deadline, "backend-2 did not accept a handshake within 15 s of its restart"
            time.sleep(0.2)
        before = start_times()

        check_code, check = cfheal_json("check", "-c", str(config))
        run_code, run = cfheal_json("run", "-c", str(config), "--yes")

    assert codes.count(1001) == 3
    assert 1006 in codes
    assert edge_status() == 101
    assert check_code == 0, check["diagnosis"]["reason"]
    assert check["diagnosis"]["kind"] == "healthy"
    assert run_code == 0
    assert run["outcome"] == "no_action"
    assert run["rollout"] is None
    assert start_times() == before
    assert set(before) == set(HOSTS)
