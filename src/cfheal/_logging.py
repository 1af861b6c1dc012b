"""Configure structlog once: JSON lines off a terminal, readable lines on one, secrets removed."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_SECRET_MARKERS = ("token", "password", "secret", "authorization", "passphrase", "api_key", "private_key")
_NOISY_LIBRARIES = ("paramiko", "docker", "urllib3", "websockets", "httpx", "httpcore", "cloudflare")


def redact_secrets(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Replace the value of any field whose name suggests a secret."""
    for key in list(event_dict):
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(log_format: str = "auto", *, debug: bool = False, stream=None) -> None:
    """Send cfheal's events to ``stream`` (stderr by default) as JSON or readable lines."""
    stream = stream or sys.stderr
    use_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    renderer = structlog.processors.JSONRenderer(sort_keys=False) if use_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if debug else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )

    # Third-party libraries log through the standard library; keep them quiet unless debugging.
    logging.basicConfig(stream=stream, level=logging.DEBUG if debug else logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL)
