"""Tell people what watch saw and did: webhooks in Slack-compatible or plain JSON form.

A notification that cannot be delivered is logged and dropped; it never stops a remediation.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from .config import NotifySettings

log = structlog.get_logger("cfheal.notify")


class Notifier:
    def __init__(self, sinks: list[NotifySettings]) -> None:
        self._sinks = sinks

    def send(self, event: str, summary: str, **details: Any) -> None:
        """Deliver ``event`` to every sink; ``summary`` is the one line a person reads first."""
        document = {"event": event, "summary": summary, "at": datetime.now(UTC).isoformat(timespec="seconds"), **details}
        for sink in self._sinks:
            body = {"text": f"cfheal {event}: {summary}"} if sink.format == "slack" else document
            self._post(sink, event, body)

    def _post(self, sink: NotifySettings, event: str, body: dict[str, Any]) -> None:
        # Webhook URLs often carry a secret in their path, so only the host is logged.
        host = urlsplit(sink.url).netloc
        try:
            response = httpx.post(sink.url, json=body, timeout=sink.timeout, trust_env=False)
        except httpx.HTTPError as error:
            log.warning("notification_failed", sink=host, notification=event, error=type(error).__name__)
            return
        if response.status_code >= 300:
            log.warning("notification_rejected", sink=host, notification=event, status=response.status_code)
            return
        log.info("notification_sent", sink=host, notification=event)
