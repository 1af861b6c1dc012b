"""WebSocket handshake probes against the edge and against each origin.

A probe is one bounded handshake: it opens, reads the status line, closes, and never retries,
so what it returns is exactly what a client would have met at that moment.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from enum import StrEnum

from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import connect

from ._threads import map_in_threads
from .config import HostSettings

_BODY_PREVIEW_BYTES = 200
_LIMIT_STATUSES = frozenset({502, 503})
# Cloudflare's own 52x errors: the edge could not get a valid answer from the origin.
_CLOUDFLARE_STATUSES = frozenset({520, 521, 522, 523, 524, 525, 526, 530})


class ProbeOutcome(StrEnum):
    OK = "ok"
    LIMIT_SUSPECTED = "limit_suspected"
    CLOUDFLARE_ERROR = "cloudflare_error"
    HTTP_ERROR = "http_error"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    DNS_ERROR = "dns_error"
    TLS_ERROR = "tls_error"
    PROTOCOL_ERROR = "protocol_error"


@dataclass(frozen=True)
class ProbeResult:
    """One handshake: where it went, how it ended, and the status line when there was one."""

    target: str
    url: str
    outcome: ProbeOutcome
    status: int | None
    duration_ms: int
    detail: str = ""

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


def probe_handshake(target: str, url: str, *, timeout: float) -> ProbeResult:
    """Open one WebSocket handshake to ``url`` and classify how it ended."""
    started = time.monotonic()
    outcome, status, detail = _attempt_handshake(url, timeout)
    duration_ms = round((time.monotonic() - started) * 1000)
    return ProbeResult(target, url, outcome, status, duration_ms, detail)


def _attempt_handshake(url: str, timeout: float) -> tuple[ProbeOutcome, int | None, str]:
    try:
        # proxy=None: a probe must reach the address in its URL, never an HTTP proxy from the environment.
        with connect(
            url,
            open_timeout=timeout,
            close_timeout=min(timeout, 2.0),
            proxy=None,
            compression=None,
            user_agent_header="cfheal-probe",
        ):
            return ProbeOutcome.OK, 101, ""
    except InvalidStatus as error:
        return _classify_status(error.response.status_code, error.response.body)
    except TimeoutError:
        return ProbeOutcome.TIMEOUT, None, f"no handshake answer within {timeout:g}s"
    except ConnectionRefusedError:
        return ProbeOutcome.REFUSED, None, "connection refused"
    except socket.gaierror as error:
        return ProbeOutcome.DNS_ERROR, None, f"name lookup failed: {error.strerror}"
    except ssl.SSLError as error:
        return ProbeOutcome.TLS_ERROR, None, f"TLS failed: {error.reason or error}"
    except InvalidURI as error:
        return ProbeOutcome.PROTOCOL_ERROR, None, str(error)
    except (InvalidHandshake, EOFError, ConnectionError) as error:
        return ProbeOutcome.PROTOCOL_ERROR, None, f"{type(error).__name__}: {error}"
    except OSError as error:
        return ProbeOutcome.REFUSED, None, f"connect failed: {error.strerror or error}"


def _classify_status(status: int, body: bytes | None) -> tuple[ProbeOutcome, int, str]:
    preview = (body or b"")[:_BODY_PREVIEW_BYTES].decode("utf-8", errors="replace").strip()
    if status in _LIMIT_STATUSES:
        return ProbeOutcome.LIMIT_SUSPECTED, status, preview
    if status in _CLOUDFLARE_STATUSES:
        return ProbeOutcome.CLOUDFLARE_ERROR, status, preview
    return ProbeOutcome.HTTP_ERROR, status, preview


def probe_edge(url: str, *, count: int, spacing: float, timeout: float) -> list[ProbeResult]:
    """Probe the edge ``count`` times, one after another, so the probes never compete for a slot."""
    results = []
    for index in range(count):
        if index:
            time.sleep(spacing)
        results.append(probe_handshake("edge", url, timeout=timeout))
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
