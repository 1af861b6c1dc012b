"""One WebSocket opening handshake against a URL, reduced to its outcome."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

PROBE_TIMEOUT_S = 3


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one handshake: the HTTP status, or an error text when none arrived."""

    url: str
    status: int | None
    error: str | None = None

    @property
    def upgraded(self) -> bool:
        return self.status == 101

    def describe(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status}"
        return self.error or "no response"

    def as_dict(self) -> dict[str, object]:
        return {"url": self.url, "status": self.status, "error": self.error}


async def probe_async(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Open a WebSocket to url and close it at once.

    The connection closes right after the upgrade, so a probe through the edge takes one
    of its connection slots for a few milliseconds only.
    """
    try:
        async with connect(url, open_timeout=timeout_s, close_timeout=1, ping_interval=None):
            return ProbeResult(url, 101)
    except InvalidStatus as error:
        return ProbeResult(url, error.response.status_code)
    except ConnectionRefusedError:
        return ProbeResult(url, None, "connection refused")
    except TimeoutError:
        return ProbeResult(url, None, f"timed out after {timeout_s:g} s")
    except (OSError, WebSocketException) as error:
        return ProbeResult(url, None, f"{type(error).__name__}: {error}")


def probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    return asyncio.run(probe_async(url, timeout_s))


def probe_many(urls: list[str]) -> list[ProbeResult]:
    """Probe the URLs concurrently and return the results in the same order."""

    async def run_all() -> list[ProbeResult]:
        return list(await asyncio.gather(*(probe_async(url) for url in urls)))

    return asyncio.run(run_all())
