"""The HTTP endpoint of watch: webhooks and cfheal trigger ask for an evaluation; /metrics.

A trigger never acts by itself: it only wakes the loop, which evaluates and applies the same
settle time and safety limits as always.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import structlog

from .config import WatchSettings
from .errors import ConfigError

log = structlog.get_logger("cfheal.triggers")

_MAX_BODY_BYTES = 1_048_576


def _read_secret(path: Path | None, key: str) -> bytes | None:
    if path is None:
        return None
    try:
        secret = path.read_bytes().strip()
    except OSError as error:
        raise ConfigError(f"watch.{key}: cannot read {path}: {error.strerror}") from None
    if not secret:
        raise ConfigError(f"watch.{key}: {path} is empty; put the shared secret in it")
    return secret


class TriggerServer:
    """Serve POST /trigger, /webhooks/cloudflare, /webhooks/alertmanager and GET /metrics, /healthz."""

    def __init__(self, settings: WatchSettings, *, request_evaluation: Callable[[str], None], metrics: Callable[[], bytes], status: Callable[[], dict]) -> None:
        self._cloudflare_secret = _read_secret(settings.webhook_secret_file, "webhook_secret_file")
        self._alertmanager_token = _read_secret(settings.alertmanager_token_file, "alertmanager_token_file")
        self._request_evaluation = request_evaluation
        self._metrics = metrics
        self._status = status
        try:
            self._server = ThreadingHTTPServer(settings.address, self._handler_class())
        except OSError as error:
            raise ConfigError(f"watch.listen: cannot listen on {settings.listen}: {error.strerror}; is another cfheal watch running?") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="trigger-server", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self._thread.start()
        log.info("trigger_endpoint_listening", address=self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._reply(200, endpoint._metrics(), "text/plain; version=0.0.4")
                elif self.path == "/healthz":
                    self._reply_json(200, endpoint._status())
                else:
                    self._reply_json(404, {"error": f"no such path {self.path}"})

            def do_POST(self) -> None:
                body = self._read_body()
                if body is None:
                    return
                if self.path == "/trigger":
                    endpoint._accept(self, "operator", body)
                elif self.path == "/webhooks/cloudflare":
                    endpoint._cloudflare_webhook(self, body)
                elif self.path == "/webhooks/alertmanager":
                    endpoint._alertmanager_webhook(self, body)
                else:
                    self._reply_json(404, {"error": f"no such path {self.path}"})

            def _read_body(self) -> bytes | None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > _MAX_BODY_BYTES:
                    self._reply_json(413, {"error": "body too large"})
                    return None
                return self.rfile.read(length) if length else b""

            def _reply_json(self, status: int, document: dict) -> None:
                self._reply(status, json.dumps(document).encode(), "application/json")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                # Requests are logged as cfheal events instead of http.server's stderr lines.
                pass

        return Handler

    def _accept(self, handler, source: str, body: bytes, **fields) -> None:
        log.info("evaluation_requested", source=source, **fields)
        self._request_evaluation(source)
        handler._reply_json(202, {"evaluation": "requested", "source": source})

    def _cloudflare_webhook(self, handler, body: bytes) -> None:
        if self._cloudflare_secret is None:
            handler._reply_json(403, {"error": "Cloudflare webhooks are disabled: set watch.webhook_secret_file"})
            return
        offered = handler.headers.get("cf-webhook-auth", "").encode()
        if not hmac.compare_digest(offered, self._cloudflare_secret):
            log.warning("webhook_rejected", source="cloudflare", reason="cf-webhook-auth does not match")
            handler._reply_json(401, {"error": "cf-webhook-auth does not match the configured secret"})
            return
        document = _parse_json(body)
        if document is None:
            handler._reply_json(400, {"error": "body is not a JSON object"})
            return
        self._accept(handler, "cloudflare", body, alert_type=document.get("alert_type"), policy=document.get("policy_name"))

    def _alertmanager_webhook(self, handler, body: bytes) -> None:
        if self._alertmanager_token is not None:
            offered = handler.headers.get("Authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(offered, self._alertmanager_token):
                log.warning("webhook_rejected", source="alertmanager", reason="bearer token does not match")
                handler._reply_json(401, {"error": "bearer token does not match watch.alertmanager_token_file"})
                return
        document = _parse_json(body)
        if document is None:
            handler._reply_json(400, {"error": "body is not a JSON object"})
            return
        firing = [alert.get("labels", {}).get("alertname") for alert in document.get("alerts", []) if alert.get("status") == "firing"]
        self._accept(handler, "alertmanager", body, firing=firing)


def _parse_json(body: bytes) -> dict | None:
    try:
        document = json.loads(body or b"null")
    except ValueError:
        return None
    return document if isinstance(document, dict) else None
