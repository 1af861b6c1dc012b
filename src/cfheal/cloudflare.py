"""Cloudflare's API through the official SDK: the zone's plan, evidence, and a plan change.

Reads are retried here on rate limits, 5xx and timeouts, honouring Retry-After up to a
bound. The SDK's own retries are switched off, so one policy applies and every retry is
logged with Cloudflare's original error. A plan change is sent exactly once and never
retried, because the SDK would resend a POST or PUT with no idempotency key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import cloudflare
import httpx
import structlog
from tenacity import RetryCallState, retry, retry_if_exception, stop_after_attempt

from .config import CloudflareSettings
from .errors import CfhealError

log = structlog.get_logger("cfheal.cloudflare")

TOKEN_ENVIRONMENT_VARIABLE = "CLOUDFLARE_API_TOKEN"
_AUTH_ERROR_CODE = 10000
_SUBSCRIPTION_NOT_FOUND_CODE = 1207

# The token permission each call needs, named as Cloudflare's dashboard names it.
_PERMISSIONS = {
    "verify_token": "a valid API token",
    "zone": "Zone > Zone: Read",
    "available_plans": "Zone > Billing: Read",
    "subscription": "Zone > Billing: Read",
    "change_plan": "Zone > Billing: Edit",
    "pool_health": "Account > Load Balancing: Monitors and Pools: Read",
    "edge_errors": "Account > Account Analytics: Read",
}

_EDGE_ERRORS_QUERY = """
query EdgeErrors($zoneTag: string, $since: Time, $until: Time) {
  viewer {
    zones(filter: {zoneTag: $zoneTag}) {
      httpRequestsAdaptiveGroups(
        limit: 10
        filter: {datetime_geq: $since, datetime_lt: $until, edgeResponseStatus_in: [502, 503], originResponseStatus: 0}
      ) {
        count
        dimensions { edgeResponseStatus }
      }
    }
  }
}
"""


class CloudflareAPIError(CfhealError):
    """A Cloudflare API call failed. ``temporary`` is true when a later retry can help."""

    def __init__(self, message: str, *, operation: str, status: int | None = None, codes: tuple[int, ...] = (), temporary: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.operation = operation
        self.status = status
        self.codes = codes
        self.temporary = temporary
        self.retry_after = retry_after


@dataclass(frozen=True)
class RatePlan:
    """A plan a zone is on or can move to, as ``available_plans`` lists it."""

    id: str
    legacy_id: str
    name: str
    price: float
    currency: str
    frequency: str
    can_subscribe: bool
    is_subscribed: bool

    @classmethod
    def from_api(cls, item: dict[str, Any]) -> "RatePlan":
        return cls(
            id=str(item.get("id", "")),
            legacy_id=str(item.get("legacy_id") or item.get("id", "")),
            name=str(item.get("name", "")),
            price=float(item.get("price") or 0),
            currency=str(item.get("currency") or "USD"),
            frequency=str(item.get("frequency") or "monthly"),
            can_subscribe=bool(item.get("can_subscribe")),
            is_subscribed=bool(item.get("is_subscribed")),
        )


def read_token(settings: CloudflareSettings) -> str | None:
    """Return the API token from the configured file or CLOUDFLARE_API_TOKEN, or None."""
    if settings.api_token_file is not None:
        try:
            token = settings.api_token_file.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise CfhealError(f"cannot read cloudflare.api_token_file {settings.api_token_file}: {error.strerror}") from None
        return token or None
    return os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None


class CloudflareAPI:
    """The calls cfheal makes to Cloudflare, with errors translated and reads retried."""

    def __init__(self, settings: CloudflareSettings, token: str, *, http_client: httpx.Client | None = None) -> None:
        self.settings = settings
        # max_retries=0: retries are decided in this module, never by the SDK.
        self._client = cloudflare.Cloudflare(
            api_token=token,
            base_url=settings.base_url or os.environ.get("CLOUDFLARE_BASE_URL") or None,
            timeout=settings.timeout,
            max_retries=0,
            http_client=http_client,
        )
        # The SDK fills an email, a key or a service key from the environment when given None,
        # and sends whichever it finds first in place of the token. cfheal uses the token only.
        ignored = [name for name in ("CLOUDFLARE_EMAIL", "CLOUDFLARE_API_KEY", "CLOUDFLARE_API_USER_SERVICE_KEY") if os.environ.get(name)]
        if ignored:
            log.warning("cloudflare_credentials_ignored", variables=ignored, reason="cfheal authenticates with the API token only")
        self._client.api_email = None
        self._client.api_key = None
        self._client.user_service_key = None

    def close(self) -> None:
        self._client.close()

    def verify_token(self) -> str:
        result = self._read("verify_token", lambda: self._client.user.tokens.verify())
        return str(getattr(result, "status", "unknown"))

    def zone(self) -> tuple[str, RatePlan]:
        """Return the zone's name and the plan it is on now."""
        zone = self._read("zone", lambda: self._raw_get(f"/zones/{self.settings.zone_id}"))
        return zone.get("name", self.settings.zone_id), RatePlan.from_api(zone.get("plan") or {})

    def available_plans(self) -> list[RatePlan]:
        items = self._read("available_plans", lambda: self._raw_get(f"/zones/{self.settings.zone_id}/available_plans"))
        return [RatePlan.from_api(item) for item in items or []]

    def subscription(self) -> dict[str, Any] | None:
        """Return the zone's subscription, or None for a zone without one (a Free zone)."""
        try:
            return self._read("subscription", lambda: self._raw_get(f"/zones/{self.settings.zone_id}/subscription"))
        except CloudflareAPIError as error:
            if error.status == 404 and _SUBSCRIPTION_NOT_FOUND_CODE in error.codes:
                return None
            raise

    def pool_health(self, pool_id: str) -> dict[str, Any]:
        # Read raw: the response is keyed by region, then origin address, unlike the SDK's type.
        account = self._require_account("pool_health")
        return self._read("pool_health", lambda: self._raw_get(f"/accounts/{account}/load_balancers/pools/{pool_id}/health"))

    def edge_errors(self) -> dict[int, int]:
        """Count edge 502/503 answered without asking the origin, over the analytics window."""
        until = datetime.now(UTC).replace(microsecond=0)
        since = until - timedelta(seconds=self.settings.analytics_window)
        variables = {"zoneTag": self.settings.zone_id, "since": since.isoformat().replace("+00:00", "Z"), "until": until.isoformat().replace("+00:00", "Z")}
        body = self._read("edge_errors", lambda: self._client.post("/graphql", body={"query": _EDGE_ERRORS_QUERY, "variables": variables}, cast_to=object))
        return _parse_edge_errors(body)

    def change_plan(self, plan: RatePlan, *, frequency: str, create: bool) -> dict[str, Any]:
        """Send the plan change once: POST when the zone has no subscription, else PUT."""
        path = f"/zones/{self.settings.zone_id}/subscription"
        body = {"frequency": frequency, "rate_plan": {"id": plan.legacy_id, "public_name": plan.name}}
        method = self._client.post if create else self._client.put
        try:
            answer = method(path, body=body, cast_to=object)
        except Exception as error:
            raise _translate(error, "change_plan") from error
        return _unwrap(answer, "change_plan")

    def _raw_get(self, path: str) -> Any:
        return _unwrap(self._client.get(path, cast_to=object), path)

    def _require_account(self, operation: str) -> str:
        if not self.settings.account_id:
            raise CloudflareAPIError(f"cloudflare.account_id is required for {operation}; add it to the configuration", operation=operation)
        return self.settings.account_id

    def _read(self, operation: str, call):
        def attempt():
            try:
                return call()
            except CloudflareAPIError:
                raise
            except Exception as error:
                raise _translate(error, operation) from error

        retrying = retry(
            retry=retry_if_exception(lambda error: isinstance(error, CloudflareAPIError) and error.temporary),
            stop=stop_after_attempt(self.settings.read_attempts),
            wait=lambda state: _retry_wait(state, self.settings.max_retry_wait),
            before_sleep=lambda state: _log_retry(operation, state),
            reraise=True,
        )
        return retrying(attempt)()


def _unwrap(answer: Any, operation: str) -> Any:
    if not isinstance(answer, dict):
        raise CloudflareAPIError(f"Cloudflare responded to {operation} with a body that is not a JSON object; try again later", operation=operation, temporary=True)
    if answer.get("success") is False:
        codes = tuple(int(item.get("code", 0)) for item in answer.get("errors") or [])
        raise CloudflareAPIError(f"Cloudflare rejected {operation}: {answer.get('errors')}", operation=operation, codes=codes)
    return answer.get("result", answer)


def _parse_edge_errors(body: Any) -> dict[int, int]:
    if not isinstance(body, dict):
        raise CloudflareAPIError("GraphQL analytics responded with a body that is not JSON", operation="edge_errors", temporary=True)
    if body.get("errors"):
        messages = "; ".join(str(item.get("message", item)) for item in body["errors"])
        raise CloudflareAPIError(f"GraphQL analytics returned errors: {messages}", operation="edge_errors")
    counts: dict[int, int] = {}
    for zone in ((body.get("data") or {}).get("viewer") or {}).get("zones") or []:
        for group in zone.get("httpRequestsAdaptiveGroups") or []:
            status = int(group["dimensions"]["edgeResponseStatus"])
            counts[status] = counts.get(status, 0) + int(group["count"])
    return counts


def _translate(error: Exception, operation: str) -> CloudflareAPIError:
    """Map an SDK or transport exception to a CloudflareAPIError whose message names the fix."""
    permission = _PERMISSIONS.get(operation, "the permission for this call")
    if isinstance(error, cloudflare.APITimeoutError):
        return CloudflareAPIError(f"Cloudflare request {operation} timed out", operation=operation, temporary=True)
    if isinstance(error, cloudflare.APIConnectionError):
        return CloudflareAPIError(f"cannot reach the Cloudflare API for {operation}: {error}", operation=operation, temporary=True)
    if isinstance(error, cloudflare.APIResponseValidationError):
        return CloudflareAPIError(f"Cloudflare responded to {operation} with an unexpected body; try again later", operation=operation, status=error.status_code, temporary=True)
    if not isinstance(error, cloudflare.APIStatusError):
        return CloudflareAPIError(f"{operation} failed: {type(error).__name__}: {error}", operation=operation)

    status = error.status_code
    codes = tuple(item.code for item in error.errors if item.code is not None)
    original = "; ".join(f"{item.code}: {item.message}" for item in error.errors) or _body_start(error.response)
    if _AUTH_ERROR_CODE in codes or status in (401, 403):
        # Code 10000 is an authentication or permission failure even when it comes as a 429.
        return CloudflareAPIError(
            f"Cloudflare rejected the token for {operation} (HTTP {status}, {original}); it needs {permission}. "
            f"Check {TOKEN_ENVIRONMENT_VARIABLE} or cloudflare.api_token_file",
            operation=operation, status=status, codes=codes,
        )
    if status == 404:
        return CloudflareAPIError(f"{operation}: not found (HTTP 404, {original}); check cloudflare.zone_id, account_id and pools", operation=operation, status=status, codes=codes)
    if status == 429:
        return CloudflareAPIError(f"Cloudflare rate-limited {operation} (HTTP 429, {original})", operation=operation, status=status, codes=codes, temporary=True, retry_after=_retry_after(error.response))
    if status >= 500:
        return CloudflareAPIError(f"Cloudflare failed {operation} (HTTP {status}, {original})", operation=operation, status=status, codes=codes, temporary=True)
    return CloudflareAPIError(f"Cloudflare rejected {operation} (HTTP {status}, {original})", operation=operation, status=status, codes=codes)


def _body_start(response: httpx.Response) -> str:
    return " ".join(response.text[:120].split()) or "empty body"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _retry_wait(state: RetryCallState, max_wait: float) -> float:
    error = state.outcome.exception() if state.outcome else None
    if isinstance(error, CloudflareAPIError) and error.retry_after is not None:
        return min(error.retry_after, max_wait)
    return min(2.0 ** (state.attempt_number - 1), max_wait)


def _log_retry(operation: str, state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("cloudflare_call_retrying", operation=operation, attempt=state.attempt_number, wait_s=round(state.next_action.sleep, 1) if state.next_action else None, error=str(error))

