"""Record an SDK client's traffic and validate it against Cloudflare's OpenAPI schema."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "lab"))

from cloudflare_schema import CloudflareSchema, SchemaValidationError  # noqa: E402


@dataclass
class Exchange:
    """One request the SDK sent and the response it received, if any."""

    request: httpx.Request
    response: httpx.Response | None = None


class ExchangeRecorder:
    """httpx event hooks that keep every request and response of an SDK client."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def on_request(self, request: httpx.Request) -> None:
        request.read()
        self.exchanges.append(Exchange(request))

    def on_response(self, response: httpx.Response) -> None:
        response.read()
        for exchange in reversed(self.exchanges):
            if exchange.request is response.request:
                exchange.response = response
                return
        raise AssertionError(f"response to a request that was never recorded: {response.request.url}")


def is_outside_schema(response: httpx.Response) -> bool:
    """Return whether a response is one the schema cannot describe: 5xx or not JSON."""
    content_type = response.headers.get("Content-Type", "")
    return response.status_code >= 500 or not content_type.startswith("application/json")


def validate_exchanges(schema: CloudflareSchema, exchanges: list[Exchange]) -> int:
    """Validate every exchange against the schema and return how many were checked.

    GraphQL is not in the schema and is skipped. A response outside the schema must be
    rejected by the validator, which proves that the validator checks it.
    """
    checked = 0
    for exchange in exchanges:
        request = exchange.request
        if request.url.path.endswith("/graphql"):
            continue
        schema.validate_request(
            request.method,
            request.url.path,
            query=request.url.query.decode(),
            headers=dict(request.headers),
            body=request.content or None,
        )
        checked += 1
        response = exchange.response
        if response is None:
            continue
        arguments = dict(status=response.status_code, headers=dict(response.headers), body=response.content)
        if is_outside_schema(response):
            with pytest.raises(SchemaValidationError):
                schema.validate_response(request.method, request.url.path, **arguments)
        else:
            schema.validate_response(request.method, request.url.path, **arguments)
    return checked


