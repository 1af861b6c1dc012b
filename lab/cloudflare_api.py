"""Local stand-in for the parts of the Cloudflare API v4 that cfheal calls.

Run it on a loopback address and point the ``cloudflare`` SDK at it with
``base_url="http://127.0.0.20:8787/client/v4"``:

    python lab/cloudflare_api.py --listen 127.0.0.20 --port 8787 --state-dir /tmp/cf-standin

It prints the base URL on stdout once it listens, and stops on SIGINT or SIGTERM.
Tests start it in a thread with ``CloudflareStandIn(state_dir, host, port).start()``.

The state directory contains ``scenario.json``, the zones, plans, tokens, pools, analytics
counts and injected faults that the stand-in serves. The stand-in reads the file on every
request and writes it back when a request changes it (a plan purchase, a fault used up), so
an edit to the file takes effect on the next request. It appends every API request to
``requests.jsonl`` with the status it returned, never with the token value. When
``scenario.json`` does not exist the stand-in writes ``default_scenario()``.

Every request to an operation in Cloudflare's OpenAPI schema is validated against it, and an
invalid one gets 400 with Cloudflare's error envelope. Every response except an injected
fault is validated too. A response that fails is a bug in the stand-in, so it is replaced
by a 500 that names the failure. ``POST /client/v4/graphql`` is not in the schema. It
returns the scenario's counts for the ``httpRequestsAdaptiveGroups`` query.

Paths under ``/__standin/`` are the stand-in's own administration interface, not part of
Cloudflare's API, and need no token:

    GET    /__standin/scenario   the current scenario
    PUT    /__standin/scenario   replace the scenario (validated; 400 names the problem)
    POST   /__standin/faults     add one fault, for example
                                 {"method": "GET", "path": "/zones/*", "kind": "rate_limit",
                                  "count": 1, "retry_after": 7}
    DELETE /__standin/faults     remove every fault
    GET    /__standin/requests   the recorded requests, oldest first
    DELETE /__standin/requests   clear the record
    POST   /__standin/reset      restore the default scenario and clear the record
"""

from __future__ import annotations

import argparse
import calendar
import copy
import fnmatch
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema

from cloudflare_schema import CloudflareSchema, OperationNotFoundError, SchemaValidationError

log = logging.getLogger("cloudflare_api")

API_PREFIX = "/client/v4"
ADMIN_PREFIX = "/__standin"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
MAX_BODY_BYTES = 1 << 20

SCENARIO_FILE = "scenario.json"
REQUESTS_FILE = "requests.jsonl"

# Token permissions that a scenario's token can hold.
ZONE_READ = "Zone Read"
ZONE_BILLING_READ = "Zone Billing Read"
ZONE_BILLING_EDIT = "Zone Billing Edit"
LOAD_BALANCING_READ = "Load Balancing Read"
ACCOUNT_ANALYTICS_READ = "Account Analytics Read"
PERMISSIONS = (ZONE_READ, ZONE_BILLING_READ, ZONE_BILLING_EDIT, LOAD_BALANCING_READ, ACCOUNT_ANALYTICS_READ)
# A permission to edit includes the permission to read, as in Cloudflare's token model.
_IMPLIED_PERMISSIONS = {ZONE_BILLING_EDIT: (ZONE_BILLING_READ,)}

# Error codes that Cloudflare's API uses for these cases.
CODE_AUTHENTICATION = 10000
CODE_RATE_LIMITED = 10100
CODE_NO_SUBSCRIPTION = 1207
CODE_MALFORMED_JSON = 6007
CODE_NO_ROUTE = 7000
CODE_INVALID_OBJECT_IDENTIFIER = 7003
CODE_CONTENT_TYPE = 9207
# NOTE: the codes below are this stand-in's choice. The codes Cloudflare returns for these
# cases are not known here.
CODE_INVALID_REQUEST = 1004
CODE_PLAN_UNAVAILABLE = 1205
CODE_SUBSCRIPTION_EXISTS = 1206
CODE_STANDIN_FAILURE = 1000

DEFAULT_DELAY_SECONDS = 30
FAULT_KINDS = ("rate_limit", "permission_denied", "server_error", "delay", "html_200", "graphql_errors")

# The HTML page that some faults send in place of JSON, as an edge or challenge page would.
_HTML_PAGE = "<!DOCTYPE html>\n<html><head><title>{title}</title></head><body><h1>{title}</h1><p>cloudflare</p></body></html>\n"


def lab_id(label: str) -> str:
    """Return a stable 32-character hex identifier for ``label``, shaped like Cloudflare's ids."""
    return hashlib.md5(f"cfheal-lab {label}".encode()).hexdigest()


def default_scenario() -> dict[str, Any]:
    """Return the default scenario: example.com on Free, one account, token and pool."""
    account_id = lab_id("account")
    zone_id = lab_id("zone example.com")
    pool_id = lab_id("pool ws-backends")
    created = "2024-01-15T09:30:00Z"
    return {
        "accounts": [{"id": account_id, "name": "cfheal lab"}],
        "zones": [
            {
                "id": zone_id,
                "name": "example.com",
                "account_id": account_id,
                "status": "active",
                "plan_id": FREE_PLAN_ID,
                "subscription": None,
                "created_on": created,
                "modified_on": created,
                "edge_status_counts": {"502": 0, "503": 0},
            }
        ],
        "plans": copy.deepcopy(DEFAULT_PLANS),
        "tokens": [
            {
                "value": "lab-token",
                "id": lab_id("token lab-token"),
                "status": "active",
                "permissions": list(PERMISSIONS),
            }
        ],
        "pools": [
            {
                "id": pool_id,
                "account_id": account_id,
                "name": "ws-backends",
                "description": "WebSocket backends of the cfheal lab",
                "enabled": True,
                "minimum_origins": 1,
                "health_regions": ["Amsterdam, NL", "Frankfurt, DE"],
                "created_on": created,
                "modified_on": created,
                "origins": [
                    _default_origin("backend-1", "127.0.0.11"),
                    _default_origin("backend-2", "127.0.0.12"),
                    _default_origin("backend-3", "127.0.0.13"),
                ],
            }
        ],
        "load_balancers": [
            {
                "id": lab_id("load balancer ws.example.com"),
                "zone_id": zone_id,
                "name": "ws.example.com",
                "enabled": True,
                "proxied": True,
                "default_pools": [pool_id],
                "fallback_pool": pool_id,
                "created_on": created,
                "modified_on": created,
            }
        ],
        "faults": [],
    }


def _default_origin(name: str, address: str) -> dict[str, Any]:
    return {
        "name": name,
        "address": address,
        "enabled": True,
        "weight": 1,
        "healthy": True,
        "failure_reason": "No failures",
        "response_code": 200,
        "rtt": "1.2ms",
    }


def _plan(plan_id: str, name: str, legacy_id: str, *, price: float, can_subscribe: bool) -> dict[str, Any]:
    return {
        "id": plan_id,
        "name": name,
        "legacy_id": legacy_id,
        "price": price,
        "currency": "USD",
        "frequency": "monthly",
        "can_subscribe": can_subscribe,
    }


# Plan ids, names and legacy ids as the live API returns them, for example in the
# `cli4 /zones/:example.com/available_plans` output in python-cloudflare's README.
# NOTE: the prices are illustrative monthly USD prices, not read from Cloudflare. The live
# API reports Free with an empty "frequency" in a zone's plan, which the schema's enum for
# available plans rejects, so the stand-in reports "monthly" everywhere.
FREE_PLAN_ID = "0feeeeeeeeeeeeeeeeeeeeeeeeeeeeee"
DEFAULT_PLANS = [
    _plan(FREE_PLAN_ID, "Free Website", "free", price=0, can_subscribe=True),
    _plan("a577b510288e82b26486fd1df47000ec", "Pro Website", "pro", price=25, can_subscribe=True),
    _plan("1ac039f6c29b691475c3d74fe588d1ae", "Business Website", "business", price=250, can_subscribe=True),
    # Enterprise is sold by contract, so it cannot be bought through the API.
    _plan("94f3b7b768b0458b56d2cac4fe5ec0f9", "Enterprise Website", "enterprise", price=0, can_subscribe=False),
]

_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
_TIMESTAMP = {"type": "string", "format": "date-time"}
SCENARIO_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["accounts", "zones", "plans", "tokens", "pools", "load_balancers", "faults"],
    "additionalProperties": False,
    "properties": {
        "accounts": {
            "type": "array",
            "items": {"type": "object", "required": ["id", "name"], "properties": {"id": _ID, "name": {"type": "string"}}},
        },
        "zones": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "name", "account_id", "status", "plan_id", "subscription", "created_on", "modified_on", "edge_status_counts"],
                "properties": {
                    "id": _ID,
                    "name": {"type": "string", "minLength": 1},
                    "account_id": _ID,
                    "status": {"enum": ["initializing", "pending", "active", "moved"]},
                    "plan_id": _ID,
                    "subscription": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/subscription"}]},
                    "created_on": _TIMESTAMP,
                    "modified_on": _TIMESTAMP,
                    "edge_status_counts": {
                        "type": "object",
                        "propertyNames": {"pattern": "^[1-5][0-9][0-9]$"},
                        "additionalProperties": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
        "plans": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "name", "legacy_id", "price", "currency", "frequency", "can_subscribe"],
                "properties": {
                    "id": _ID,
                    "name": {"type": "string"},
                    "legacy_id": {"type": "string"},
                    "price": {"type": "number", "minimum": 0},
                    "currency": {"type": "string"},
                    "frequency": {"enum": ["weekly", "monthly", "quarterly", "yearly"]},
                    "can_subscribe": {"type": "boolean"},
                },
            },
        },
        "tokens": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["value", "id", "status", "permissions"],
                "properties": {
                    "value": {"type": "string", "minLength": 1},
                    "id": _ID,
                    "status": {"enum": ["active", "disabled", "expired"]},
                    "permissions": {"type": "array", "items": {"enum": list(PERMISSIONS)}},
                },
            },
        },
        "pools": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "account_id", "name", "enabled", "minimum_origins", "health_regions", "origins", "created_on", "modified_on"],
                "properties": {
                    "id": _ID,
                    "account_id": _ID,
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "enabled": {"type": "boolean"},
                    "minimum_origins": {"type": "integer", "minimum": 0},
                    "health_regions": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "created_on": _TIMESTAMP,
                    "modified_on": _TIMESTAMP,
                    "origins": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "address", "enabled", "weight", "healthy", "failure_reason", "response_code", "rtt"],
                            "properties": {
                                "name": {"type": "string"},
                                "address": {"type": "string"},
                                "enabled": {"type": "boolean"},
                                "weight": {"type": "number", "minimum": 0, "maximum": 1},
                                "healthy": {"type": "boolean"},
                                "failure_reason": {"type": "string"},
                                "response_code": {"type": "integer"},
                                "rtt": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
        "load_balancers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "zone_id", "name", "enabled", "proxied", "default_pools", "fallback_pool", "created_on", "modified_on"],
                "properties": {
                    "id": _ID,
                    "zone_id": _ID,
                    "name": {"type": "string"},
                    "enabled": {"type": "boolean"},
                    "proxied": {"type": "boolean"},
                    "default_pools": {"type": "array", "items": _ID},
                    "fallback_pool": _ID,
                    "created_on": _TIMESTAMP,
                    "modified_on": _TIMESTAMP,
                },
            },
        },
        "faults": {"type": "array", "items": {"$ref": "#/$defs/fault"}},
    },
    "$defs": {
        "subscription": {
            "type": "object",
            "required": ["id", "rate_plan_id", "frequency", "price", "currency", "state", "current_period_start", "current_period_end"],
            "properties": {
                "id": _ID,
                "rate_plan_id": {"type": "string"},
                "frequency": {"enum": ["weekly", "monthly", "quarterly", "yearly"]},
                "price": {"type": "number", "minimum": 0},
                "currency": {"type": "string"},
                "state": {"enum": ["Trial", "Provisioned", "Paid", "AwaitingPayment", "Cancelled", "Failed", "Expired"]},
                "current_period_start": _TIMESTAMP,
                "current_period_end": _TIMESTAMP,
            },
        },
        "fault": {
            "type": "object",
            "required": ["method", "path", "kind", "count"],
            "additionalProperties": False,
            "properties": {
                "method": {"type": "string", "pattern": "^([A-Z]+|\\*)$"},
                "path": {"type": "string", "pattern": "^/"},
                "kind": {"enum": list(FAULT_KINDS)},
                "count": {"type": "integer", "minimum": 1},
                "retry_after": {"type": "integer", "minimum": 0},
                "body": {"enum": ["json", "html"]},
                "status": {"enum": [500, 502, 503]},
                "seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 300},
                "message": {"type": "string"},
            },
        },
    },
}


class ScenarioError(ValueError):
    """A scenario that does not match SCENARIO_SCHEMA or refers to a missing object."""


def validate_scenario(scenario: Any) -> None:
    """Raise ScenarioError unless ``scenario`` is complete and consistent."""
    validator = jsonschema.Draft202012Validator(SCENARIO_SCHEMA, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(scenario), key=lambda error: list(error.absolute_path))
    if errors:
        problems = [f"at {'/'.join(str(part) for part in error.absolute_path) or '(root)'}: {error.message}" for error in errors[:5]]
        raise ScenarioError("invalid scenario: " + "; ".join(problems))

    plan_ids = {plan["id"] for plan in scenario["plans"]}
    account_ids = {account["id"] for account in scenario["accounts"]}
    zone_ids = {zone["id"] for zone in scenario["zones"]}
    pool_ids = {pool["id"] for pool in scenario["pools"]}
    for zone in scenario["zones"]:
        if zone["plan_id"] not in plan_ids:
            raise ScenarioError(f"invalid scenario: zone {zone['name']} has plan_id {zone['plan_id']}, which is not in plans")
        if zone["account_id"] not in account_ids:
            raise ScenarioError(f"invalid scenario: zone {zone['name']} has account_id {zone['account_id']}, which is not in accounts")
    for pool in scenario["pools"]:
        if pool["account_id"] not in account_ids:
            raise ScenarioError(f"invalid scenario: pool {pool['name']} has account_id {pool['account_id']}, which is not in accounts")
    for balancer in scenario["load_balancers"]:
        if balancer["zone_id"] not in zone_ids:
            raise ScenarioError(f"invalid scenario: load balancer {balancer['name']} has zone_id {balancer['zone_id']}, which is not in zones")
        missing = [pool_id for pool_id in [*balancer["default_pools"], balancer["fallback_pool"]] if pool_id not in pool_ids]
        if missing:
            raise ScenarioError(f"invalid scenario: load balancer {balancer['name']} refers to pools {missing}, which are not in pools")
    values = [token["value"] for token in scenario["tokens"]]
    if len(values) != len(set(values)):
        raise ScenarioError("invalid scenario: two tokens have the same value")


class ScenarioStore:
    """The scenario file and the request record in one state directory.

    Every method takes the store's lock, so read-modify-write cycles in this process never
    interleave. A process that edits the file from outside takes no lock, but each write
    here replaces the file atomically, so a reader sees either the old or the new scenario.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.scenario_path = self.state_dir / SCENARIO_FILE
        self.requests_path = self.state_dir / REQUESTS_FILE
        self.lock = threading.RLock()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.lock:
            if not self.scenario_path.exists():
                self.write(default_scenario())

    def read(self) -> dict[str, Any]:
        """Read and validate the scenario file. Raise ScenarioError if it is invalid."""
        with self.lock:
            try:
                scenario = json.loads(self.scenario_path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                scenario = default_scenario()
                self.write(scenario)
            except json.JSONDecodeError as error:
                raise ScenarioError(f"{self.scenario_path} is not valid JSON: {error}") from None
            validate_scenario(scenario)
            return scenario

    def write(self, scenario: dict[str, Any]) -> None:
        """Validate ``scenario`` and replace the file atomically."""
        validate_scenario(scenario)
        with self.lock:
            handle, temporary = tempfile.mkstemp(dir=self.state_dir, prefix=".scenario-", suffix=".json")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as stream:
                    json.dump(scenario, stream, indent=2)
                    stream.write("\n")
                os.replace(temporary, self.scenario_path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise

    def update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply ``change`` to the scenario, write it back, and return what ``change`` returned."""
        with self.lock:
            scenario = self.read()
            result = change(scenario)
            self.write(scenario)
            return result

    def record(self, entry: Mapping[str, Any]) -> None:
        with self.lock:
            with self.requests_path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(entry, sort_keys=True) + "\n")

    def recorded_requests(self) -> list[dict[str, Any]]:
        with self.lock:
            try:
                lines = self.requests_path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                return []
        return [json.loads(line) for line in lines if line.strip()]

    def clear_requests(self) -> None:
        with self.lock:
            self.requests_path.write_text("", encoding="utf-8")


@dataclass
class Reply:
    """An HTTP response that the stand-in sends."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class ApiError(Exception):
    """A Cloudflare error response: HTTP status and the errors[] of the envelope."""

    def __init__(self, status: int, code: int, message: str, *more: tuple[int, str]) -> None:
        super().__init__(message)
        self.status = status
        self.errors = [{"code": code, "message": message}, *({"code": c, "message": m} for c, m in more)]


@dataclass
class Call:
    """One API request as the handlers see it."""

    method: str
    api_path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    body: Any
    scenario: dict[str, Any]
    token: dict[str, Any] | None
    changed: bool = False

    def query_value(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    permission: str | None
    handler: Callable[[Call], Any]
    pattern: re.Pattern[str]


def _route(method: str, template: str, permission: str | None, handler: Callable[[Call], Any]) -> Route:
    pattern = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)))
    return Route(method, template, permission, handler, pattern)


def envelope(result: Any, *, result_info: dict[str, Any] | None = None, messages: list[dict] | None = None) -> dict[str, Any]:
    body = {"success": True, "errors": [], "messages": messages or [], "result": result}
    if result_info is not None:
        body["result_info"] = result_info
    return body


def error_envelope(errors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"success": False, "errors": errors, "messages": [], "result": None}


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _add_months(moment: datetime, months: int) -> datetime:
    month_index = moment.month - 1 + months
    year = moment.year + month_index // 12
    month = month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def _no_route(call: Call) -> ApiError:
    return ApiError(
        404,
        CODE_INVALID_OBJECT_IDENTIFIER,
        f"Could not route to {API_PREFIX}{call.api_path}, perhaps your object identifier is invalid?",
        (CODE_NO_ROUTE, "No route for that URI"),
    )


# NOTE: whether the live API returns 404 or 400 for an unknown identifier is not certain.
def _find_zone(call: Call, zone_id: str) -> dict[str, Any]:
    for zone in call.scenario["zones"]:
        if zone["id"] == zone_id:
            return zone
    raise _no_route(call)


def _find_account(call: Call, account_id: str) -> dict[str, Any]:
    for account in call.scenario["accounts"]:
        if account["id"] == account_id:
            return account
    raise _no_route(call)


def _find_pool(call: Call, account_id: str, pool_id: str) -> dict[str, Any]:
    for pool in call.scenario["pools"]:
        if pool["id"] == pool_id and pool["account_id"] == account_id:
            return pool
    raise _no_route(call)


def _plan_by_id(scenario: dict[str, Any], plan_id: str) -> dict[str, Any]:
    return next(plan for plan in scenario["plans"] if plan["id"] == plan_id)


# ---- Rendering scenario objects as Cloudflare API objects ----


def render_zone(scenario: dict[str, Any], zone: dict[str, Any]) -> dict[str, Any]:
    account = next(account for account in scenario["accounts"] if account["id"] == zone["account_id"])
    plan = _plan_by_id(scenario, zone["plan_id"])
    return {
        "id": zone["id"],
        "name": zone["name"],
        "status": zone["status"],
        "paused": False,
        "type": "full",
        "development_mode": 0,
        "name_servers": ["ada.ns.cloudflare.com", "bob.ns.cloudflare.com"],
        "original_name_servers": None,
        "original_registrar": None,
        "original_dnshost": None,
        "created_on": zone["created_on"],
        "modified_on": zone["modified_on"],
        "activated_on": zone["created_on"],
        "meta": {
            "step": 2,
            "custom_certificate_quota": 0,
            "page_rule_quota": 3,
            "phishing_detected": False,
            "cdn_only": False,
            "dns_only": False,
            "foundation_dns": False,
        },
        "owner": {"id": account["id"], "type": "organization", "name": account["name"]},
        "account": {"id": account["id"], "name": account["name"]},
        "permissions": ["#zone:read", "#billing:read", "#billing:edit", "#lb:read", "#analytics:read"],
        "plan": render_zone_plan(plan, zone),
    }


def render_zone_plan(plan: dict[str, Any], zone: dict[str, Any]) -> dict[str, Any]:
    """Render a plan as the zone's ``plan`` object, which the SDK types as zones.Plan."""
    subscribed = plan["id"] == zone["plan_id"]
    return {
        "id": plan["id"],
        "name": plan["name"],
        "price": plan["price"],
        "currency": plan["currency"],
        "frequency": plan["frequency"],
        "is_subscribed": subscribed,
        "can_subscribe": plan["can_subscribe"] and not subscribed,
        "legacy_id": plan["legacy_id"],
        "legacy_discount": False,
        "externally_managed": False,
    }


def render_available_plan(plan: dict[str, Any], zone: dict[str, Any]) -> dict[str, Any]:
    """Render a plan for available_plans, which has the same fields as the zone's plan."""
    return render_zone_plan(plan, zone)


def render_rate_plan(plan: dict[str, Any]) -> dict[str, Any]:
    page_rules = {"free": 3, "pro": 20, "business": 50, "enterprise": 125}.get(plan["legacy_id"], 3)
    return {
        "id": plan["legacy_id"],
        "name": plan["name"].replace(" Website", " Plan"),
        "currency": plan["currency"],
        "duration": 1,
        "frequency": plan["frequency"],
        "components": [
            {"name": "page_rules", "default": page_rules, "unit_price": 5},
            {"name": "zones", "default": 1, "unit_price": 0},
        ],
    }


def render_subscription(scenario: dict[str, Any], zone: dict[str, Any]) -> dict[str, Any]:
    subscription = zone["subscription"]
    plan = next(plan for plan in scenario["plans"] if plan["legacy_id"] == subscription["rate_plan_id"])
    return {
        "id": subscription["id"],
        "currency": subscription["currency"],
        "price": subscription["price"],
        "frequency": subscription["frequency"],
        "state": subscription["state"],
        "current_period_start": subscription["current_period_start"],
        "current_period_end": subscription["current_period_end"],
        "component_values": [],
        "rate_plan": {
            "id": plan["legacy_id"],
            "public_name": plan["name"],
            "currency": plan["currency"],
            "scope": "zone",
            "externally_managed": False,
            "is_contract": plan["legacy_id"] == "enterprise",
            "sets": [],
        },
        "zone": {"id": zone["id"], "name": zone["name"]},
    }


def render_pool(pool: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": pool["id"],
        "name": pool["name"],
        "description": pool.get("description", ""),
        "enabled": pool["enabled"],
        "minimum_origins": pool["minimum_origins"],
        "monitor": None,
        "check_regions": None,
        "notification_email": "",
        "created_on": pool["created_on"],
        "modified_on": pool["modified_on"],
        "origins": [
            {"name": origin["name"], "address": origin["address"], "enabled": origin["enabled"], "weight": origin["weight"], "header": {}}
            for origin in pool["origins"]
        ],
    }


def render_pool_health(pool: dict[str, Any]) -> dict[str, Any]:
    """Render pool health keyed by region, then by origin address, as the live API does.

    The SDK's HealthGetResponse type models neither key, so callers read this raw.
    """
    origins = [
        {
            origin["address"]: {
                "healthy": origin["healthy"],
                "rtt": origin["rtt"],
                "failure_reason": origin["failure_reason"],
                "response_code": origin["response_code"],
            }
        }
        for origin in pool["origins"]
        if origin["enabled"]
    ]
    healthy_count = sum(1 for origin in pool["origins"] if origin["enabled"] and origin["healthy"])
    region_healthy = pool["enabled"] and healthy_count >= max(pool["minimum_origins"], 1)
    return {
        "pool_id": pool["id"],
        "pop_health": {region: {"healthy": region_healthy, "origins": copy.deepcopy(origins)} for region in pool["health_regions"]},
    }


def render_load_balancer(balancer: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": balancer["id"],
        "name": balancer["name"],
        "description": "",
        "enabled": balancer["enabled"],
        "proxied": balancer["proxied"],
        "ttl": 30,
        "steering_policy": "off",
        "session_affinity": "none",
        "default_pools": list(balancer["default_pools"]),
        "fallback_pool": balancer["fallback_pool"],
        "created_on": balancer["created_on"],
        "modified_on": balancer["modified_on"],
    }


# ---- API handlers ----


def handle_verify_token(call: Call) -> dict[str, Any]:
    token = call.token
    assert token is not None
    return envelope(
        {"id": token["id"], "status": token["status"]},
        messages=[{"code": 10000, "message": "This API Token is valid and active"}],
    )


def _matches_name_filter(value: str, expression: str) -> bool:
    """Apply a Cloudflare list filter such as "contains:.org" or "example.com" to ``value``."""
    operator, separator, operand = expression.partition(":")
    if not separator or operator not in _NAME_OPERATORS:
        operator, operand = "equal", expression
    case_sensitive = operator.endswith("_case_sensitive")
    if not case_sensitive:
        value, operand = value.lower(), operand.lower()
    test = _NAME_OPERATORS[operator]
    return test(value, operand)


_NAME_OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "equal": lambda value, operand: value == operand,
    "not_equal": lambda value, operand: value != operand,
    "starts_with": str.startswith,
    "ends_with": str.endswith,
    "contains": lambda value, operand: operand in value,
    "starts_with_case_sensitive": str.startswith,
    "ends_with_case_sensitive": str.endswith,
    "contains_case_sensitive": lambda value, operand: operand in value,
}


_ZONE_SORT_KEYS: dict[str, Callable[[dict[str, Any]], str]] = {
    "name": lambda zone: zone["name"],
    "status": lambda zone: zone["status"],
    "account.id": lambda zone: zone["account"]["id"],
    "account.name": lambda zone: zone["account"]["name"],
}


def handle_list_zones(call: Call) -> dict[str, Any]:
    zones = [render_zone(call.scenario, zone) for zone in call.scenario["zones"]]
    checks: list[Callable[[dict[str, Any]], bool]] = []
    if (name := call.query_value("name")) is not None:
        checks.append(lambda zone: _matches_name_filter(zone["name"], name))
    if (status := call.query_value("status")) is not None:
        checks.append(lambda zone: zone["status"] == status)
    if (account_id := call.query_value("account.id")) is not None:
        checks.append(lambda zone: zone["account"]["id"] == account_id)
    if (account_name := call.query_value("account.name")) is not None:
        checks.append(lambda zone: _matches_name_filter(zone["account"]["name"], account_name))
    combine = any if call.query_value("match", "all") == "any" else all
    if checks:
        zones = [zone for zone in zones if combine(check(zone) for check in checks)]

    order = call.query_value("order")
    if order is not None:
        zones.sort(key=_ZONE_SORT_KEYS[order], reverse=call.query_value("direction") == "desc")

    page = int(float(call.query_value("page", "1")))
    per_page = int(float(call.query_value("per_page", "20")))
    start = (page - 1) * per_page
    selected = zones[start : start + per_page]
    total_pages = max(1, -(-len(zones) // per_page))
    result_info = {"page": page, "per_page": per_page, "count": len(selected), "total_count": len(zones), "total_pages": total_pages}
    return envelope(selected, result_info=result_info)


def handle_get_zone(call: Call) -> dict[str, Any]:
    return envelope(render_zone(call.scenario, _find_zone(call, call.params["zone_id"])))


def handle_get_subscription(call: Call) -> dict[str, Any]:
    zone = _find_zone(call, call.params["zone_id"])
    if zone["subscription"] is None:
        raise ApiError(404, CODE_NO_SUBSCRIPTION, "No subscription found for this zone. It is on the Free plan.")
    return envelope(render_subscription(call.scenario, zone))


def handle_create_subscription(call: Call) -> dict[str, Any]:
    zone = _find_zone(call, call.params["zone_id"])
    if zone["subscription"] is not None:
        raise ApiError(400, CODE_SUBSCRIPTION_EXISTS, "The zone already has a subscription. Change it with PUT.")
    return _subscribe(call, zone)


def handle_update_subscription(call: Call) -> dict[str, Any]:
    zone = _find_zone(call, call.params["zone_id"])
    if zone["subscription"] is None:
        raise ApiError(404, CODE_NO_SUBSCRIPTION, "No subscription found for this zone. Create one with POST.")
    return _subscribe(call, zone)


def _subscribe(call: Call, zone: dict[str, Any]) -> dict[str, Any]:
    """Move ``zone`` to the plan named by the request's rate_plan.id and return the subscription.

    A move to Free ends the subscription, so GET subscription returns 404 with code 1207 again.
    """
    requested = (call.body.get("rate_plan") or {}).get("id")
    if not isinstance(requested, str):
        raise ApiError(400, CODE_INVALID_REQUEST, "rate_plan.id is missing: name the plan by its legacy_id, for example \"pro\"")
    plan = next((plan for plan in call.scenario["plans"] if plan["legacy_id"] == requested), None)
    if plan is None:
        known = ", ".join(plan["legacy_id"] for plan in call.scenario["plans"])
        raise ApiError(400, CODE_PLAN_UNAVAILABLE, f"Rate plan {requested!r} is not available for this zone. Available: {known}.")
    if not plan["can_subscribe"]:
        raise ApiError(400, CODE_PLAN_UNAVAILABLE, f"Rate plan {requested!r} cannot be subscribed to through the API")
    if plan["id"] == zone["plan_id"]:
        raise ApiError(400, CODE_PLAN_UNAVAILABLE, f"The zone is already on rate plan {requested!r}")

    now = _now()
    frequency = call.body.get("frequency") or plan["frequency"]
    months = {"weekly": 0, "monthly": 1, "quarterly": 3, "yearly": 12}[frequency]
    period_end = now + timedelta(weeks=1) if months == 0 else _add_months(now, months)
    previous = zone["subscription"]
    zone["plan_id"] = plan["id"]
    zone["modified_on"] = _timestamp(now)
    zone["subscription"] = {
        "id": previous["id"] if previous else secrets.token_hex(16),
        "rate_plan_id": plan["legacy_id"],
        "frequency": frequency,
        "price": plan["price"],
        "currency": plan["currency"],
        # NOTE: the state that the live API reports for a move to Free is not known here.
        "state": "Cancelled" if plan["id"] == FREE_PLAN_ID else "Paid",
        "current_period_start": _timestamp(now),
        "current_period_end": _timestamp(period_end),
    }
    rendered = render_subscription(call.scenario, zone)
    if plan["id"] == FREE_PLAN_ID:
        zone["subscription"] = None
    call.changed = True
    log.info("zone %s moved to rate plan %s (%s)", zone["name"], plan["legacy_id"], frequency)
    return envelope(rendered)


def handle_list_available_plans(call: Call) -> dict[str, Any]:
    zone = _find_zone(call, call.params["zone_id"])
    plans = [render_available_plan(plan, zone) for plan in call.scenario["plans"]]
    return envelope(plans, result_info={"page": 1, "per_page": len(plans), "count": len(plans), "total_count": len(plans)})


def handle_get_available_plan(call: Call) -> dict[str, Any]:
    zone = _find_zone(call, call.params["zone_id"])
    for plan in call.scenario["plans"]:
        if plan["id"] == call.params["plan_id"]:
            return envelope(render_available_plan(plan, zone))
    raise _no_route(call)


def handle_list_rate_plans(call: Call) -> dict[str, Any]:
    _find_zone(call, call.params["zone_id"])
    plans = [render_rate_plan(plan) for plan in call.scenario["plans"]]
    return envelope(plans, result_info={"page": 1, "per_page": len(plans), "count": len(plans), "total_count": len(plans)})


def handle_list_pools(call: Call) -> dict[str, Any]:
    account = _find_account(call, call.params["account_id"])
    pools = [render_pool(pool) for pool in call.scenario["pools"] if pool["account_id"] == account["id"]]
    return envelope(pools, result_info={"page": 1, "per_page": 20, "count": len(pools), "total_count": len(pools)})


def handle_get_pool(call: Call) -> dict[str, Any]:
    return envelope(render_pool(_find_pool(call, call.params["account_id"], call.params["pool_id"])))


def handle_get_pool_health(call: Call) -> dict[str, Any]:
    return envelope(render_pool_health(_find_pool(call, call.params["account_id"], call.params["pool_id"])))


def handle_list_load_balancers(call: Call) -> dict[str, Any]:
    zone = _find_zone(call, call.params["zone_id"])
    balancers = [render_load_balancer(balancer) for balancer in call.scenario["load_balancers"] if balancer["zone_id"] == zone["id"]]
    return envelope(balancers, result_info={"page": 1, "per_page": 20, "count": len(balancers), "total_count": len(balancers)})


class GraphQLError(Exception):
    """A GraphQL failure: the HTTP status and the message for the errors[] array."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def graphql_body(data: Any, messages: list[str] | None) -> dict[str, Any]:
    timestamp = _now().isoformat().replace("+00:00", "Z")
    errors = None
    if messages:
        errors = [{"message": message, "path": None, "extensions": {"timestamp": timestamp}} for message in messages]
    return {"data": data, "errors": errors}


def handle_graphql(call: Call) -> dict[str, Any]:
    """Run a viewer.zones.httpRequestsAdaptiveGroups query against the zones' edge_status_counts.

    The counts are requests that the edge responded to itself (originResponseStatus 0),
    whatever time range the query names. Only the zoneTag, edgeResponseStatus_in,
    edgeResponseStatus and originResponseStatus arguments are read, literally or from
    variables. Other arguments are accepted and ignored.
    """
    if not isinstance(call.body, dict) or not isinstance(call.body.get("query"), str):
        raise GraphQLError(400, "the request body must be a JSON object with a \"query\" string")
    query = call.body["query"]
    variables = call.body.get("variables") or {}
    if not isinstance(variables, dict):
        raise GraphQLError(400, "\"variables\" must be a JSON object")

    dataset = re.search(r"(?:(\w+)\s*:\s*)?httpRequestsAdaptiveGroups\b", query)
    if dataset is None or not re.search(r"\bviewer\b", query) or not re.search(r"\bzones\s*\(", query):
        return graphql_body(None, ["unknown field: this stand-in answers only viewer.zones.httpRequestsAdaptiveGroups"])
    key = dataset.group(1) or "httpRequestsAdaptiveGroups"

    zone_tag = _graphql_argument(query, variables, "zoneTag", None)
    if not isinstance(zone_tag, str):
        return graphql_body(None, ["zones(filter: {zoneTag}) is required"])
    zone = next((zone for zone in call.scenario["zones"] if zone["id"] == zone_tag), None)
    if zone is None:
        raise GraphQLError(403, f"zones [{zone_tag}] are not authorized")

    dataset_filter = _graphql_argument(query[dataset.end() :], variables, "filter", None, object_argument=True)
    arguments = query[dataset.end() :]
    status_in = _graphql_filter_value(arguments, variables, dataset_filter, "edgeResponseStatus_in")
    status_equal = _graphql_filter_value(arguments, variables, dataset_filter, "edgeResponseStatus")
    origin_status = _graphql_filter_value(arguments, variables, dataset_filter, "originResponseStatus")
    if status_in is not None and not (isinstance(status_in, list) and all(isinstance(item, int) for item in status_in)):
        return graphql_body(None, [f"edgeResponseStatus_in must be a list of integers, not {status_in!r}"])
    for name, value in (("edgeResponseStatus", status_equal), ("originResponseStatus", origin_status)):
        if value is not None and not isinstance(value, int):
            return graphql_body(None, [f"{name} must be an integer, not {value!r}"])

    groups = []
    if origin_status in (None, 0):
        for status_text, count in sorted(zone["edge_status_counts"].items()):
            status = int(status_text)
            if status_in is not None and status not in status_in:
                continue
            if status_equal is not None and status != status_equal:
                continue
            if count > 0:
                groups.append({"count": count, "dimensions": {"edgeResponseStatus": status}})
    return graphql_body({"viewer": {"zones": [{key: groups}]}}, None)


def _graphql_argument(text: str, variables: dict[str, Any], name: str, default: Any, *, object_argument: bool = False) -> Any:
    """Return the value of argument ``name`` in ``text``: a literal string or number, or a variable."""
    if object_argument:
        match = re.search(rf"\b{name}\s*:\s*\$(\w+)", text)
        return variables.get(match.group(1), default) if match else default
    match = re.search(rf"\b{name}\s*:\s*(\$\w+|\"[^\"]*\"|-?\d+)", text)
    if match is None:
        return default
    token = match.group(1)
    if token.startswith("$"):
        return variables.get(token[1:], default)
    if token.startswith('"'):
        return token[1:-1]
    return int(token)


def _graphql_filter_value(text: str, variables: dict[str, Any], dataset_filter: Any, name: str) -> Any:
    if isinstance(dataset_filter, dict):
        return dataset_filter.get(name)
    match = re.search(rf"\b{name}\s*:\s*(\$\w+|\[[^\]]*\]|-?\d+)", text)
    if match is None:
        return None
    token = match.group(1)
    if token.startswith("$"):
        return variables.get(token[1:])
    if token.startswith("["):
        return [int(item) for item in re.findall(r"-?\d+", token)]
    return int(token)


ROUTES = [
    _route("GET", "/user/tokens/verify", None, handle_verify_token),
    _route("GET", "/zones", ZONE_READ, handle_list_zones),
    _route("GET", "/zones/{zone_id}", ZONE_READ, handle_get_zone),
    _route("GET", "/zones/{zone_id}/subscription", ZONE_BILLING_READ, handle_get_subscription),
    _route("POST", "/zones/{zone_id}/subscription", ZONE_BILLING_EDIT, handle_create_subscription),
    _route("PUT", "/zones/{zone_id}/subscription", ZONE_BILLING_EDIT, handle_update_subscription),
    _route("GET", "/zones/{zone_id}/available_plans", ZONE_BILLING_READ, handle_list_available_plans),
    _route("GET", "/zones/{zone_id}/available_plans/{plan_id}", ZONE_BILLING_READ, handle_get_available_plan),
    _route("GET", "/zones/{zone_id}/available_rate_plans", ZONE_BILLING_READ, handle_list_rate_plans),
    _route("GET", "/zones/{zone_id}/load_balancers", LOAD_BALANCING_READ, handle_list_load_balancers),
    _route("GET", "/accounts/{account_id}/load_balancers/pools", LOAD_BALANCING_READ, handle_list_pools),
    _route("GET", "/accounts/{account_id}/load_balancers/pools/{pool_id}", LOAD_BALANCING_READ, handle_get_pool),
    _route("GET", "/accounts/{account_id}/load_balancers/pools/{pool_id}/health", LOAD_BALANCING_READ, handle_get_pool_health),
    _route("POST", "/graphql", ACCOUNT_ANALYTICS_READ, handle_graphql),
]
GRAPHQL_PATH = "/graphql"


def _has_permission(token: dict[str, Any], permission: str) -> bool:
    granted = set(token["permissions"])
    for granted_permission in token["permissions"]:
        granted.update(_IMPLIED_PERMISSIONS.get(granted_permission, ()))
    return permission in granted


def _json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(body).encode("utf-8"), "application/json", dict(headers or {}))


def _html_reply(status: int, title: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, _HTML_PAGE.format(title=title).encode("utf-8"), "text/html", dict(headers or {}))


class CloudflareApi:
    """The stand-in's request handling, independent of the HTTP server."""

    def __init__(self, store: ScenarioStore, schema: CloudflareSchema, stopping: threading.Event) -> None:
        self.store = store
        self.schema = schema
        self.stopping = stopping
        self._ray_counter = itertools.count(1)
        self._ray_prefix = secrets.token_hex(4)

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """Return the reply to one HTTP request, and record it if it is an API request."""
        parts = urlsplit(target)
        if parts.path == ADMIN_PREFIX or parts.path.startswith(ADMIN_PREFIX + "/"):
            return self._handle_admin(method, parts.path, body)

        ray_id = f"{self._ray_prefix}{next(self._ray_counter):08x}-LAB"
        entry: dict[str, Any] = {
            "time": _now().isoformat().replace("+00:00", "Z"),
            "ray_id": ray_id,
            "method": method,
            "path": parts.path,
            "query": parse_qs(parts.query, keep_blank_values=True),
            "body": None,
            "status": None,
            "fault": None,
            "operation_id": None,
            "token_id": None,
        }
        try:
            entry["body"] = json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            entry["body_text"] = body[:2000].decode("utf-8", "replace")
        try:
            reply = self._handle_api(method, parts.path, parts.query, headers, body, entry)
        except Exception:
            log.exception("stand-in failed on %s %s (ray %s)", method, parts.path, ray_id)
            reply = _json_reply(500, error_envelope([{"code": CODE_STANDIN_FAILURE, "message": "stand-in internal error; see its log"}]))
        reply.headers.setdefault("cf-ray", ray_id)
        entry["status"] = reply.status
        self.store.record(entry)
        log.info("%s %s -> %d%s", method, parts.path, reply.status, f" (fault {entry['fault']})" if entry["fault"] else "")
        return reply

    def _handle_api(self, method: str, path: str, query_text: str, headers: Mapping[str, str], body: bytes, entry: dict[str, Any]) -> Reply:
        if not (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
            return _json_reply(404, error_envelope([{"code": CODE_NO_ROUTE, "message": "No route for that URI"}]))
        api_path = path[len(API_PREFIX) :].rstrip("/") or "/"
        try:
            entry["operation_id"] = self.schema.find_operation(method, api_path).operation_id
        except OperationNotFoundError:
            pass

        try:
            fault = self._take_fault(method, api_path)
        except ScenarioError as error:
            return self._scenario_failure(method, path, error)
        if fault is not None:
            entry["fault"] = fault["kind"]
            if fault["kind"] == "delay":
                # Wait outside the store's lock, so other requests go on meanwhile.
                self.stopping.wait(fault.get("seconds", DEFAULT_DELAY_SECONDS))
            else:
                return self._fault_reply(fault)

        # One lock around reading, handling and writing, so that concurrent purchases apply
        # in turn. It also keeps the schema validation to one thread at a time.
        with self.store.lock:
            try:
                scenario = self.store.read()
            except ScenarioError as error:
                return self._scenario_failure(method, path, error)
            reply = self._serve(method, api_path, query_text, headers, body, entry, scenario)
            # Faults other than a delay returned above, so this reply should match the schema.
            return self._check_response(method, api_path, reply)

    def _serve(
        self,
        method: str,
        api_path: str,
        query_text: str,
        headers: Mapping[str, str],
        body: bytes,
        entry: dict[str, Any],
        scenario: dict[str, Any],
    ) -> Reply:
        """Authenticate, authorize, validate and run the handler for one API request."""
        route, params = self._match_route(method, api_path)
        if route is None:
            return _json_reply(404, error_envelope([{"code": CODE_NO_ROUTE, "message": "No route for that URI"}]))

        is_graphql = route.template == GRAPHQL_PATH
        token = self._find_token(scenario, headers)
        if token is None or (token["status"] != "active" and route.permission is not None):
            return self._auth_failure(is_graphql, 401, "Unauthorized" if is_graphql else "Authentication error")
        entry["token_id"] = token["id"]
        if route.permission is not None and not _has_permission(token, route.permission):
            log.info("token %s lacks the permission %s for %s %s", token["id"], route.permission, method, api_path)
            return self._auth_failure(is_graphql, 403, "not authorized for that account" if is_graphql else "Authentication error")

        if is_graphql:
            if "body_text" in entry:
                return _json_reply(400, graphql_body(None, ["the request body is not valid JSON"]))
        else:
            rejection = self._validate_request(method, api_path, query_text, headers, body)
            if rejection is not None:
                return rejection

        call = Call(
            method=method,
            api_path=api_path,
            params=params,
            query=parse_qs(query_text, keep_blank_values=True),
            body=entry["body"] if entry["body"] is not None else {},
            scenario=scenario,
            token=token,
        )
        try:
            reply = _json_reply(200, route.handler(call))
        except ApiError as error:
            reply = _json_reply(error.status, error_envelope(error.errors))
        except GraphQLError as error:
            reply = _json_reply(error.status, graphql_body(None, [str(error)]))
        if call.changed:
            self.store.write(scenario)
        return reply

    @staticmethod
    def _scenario_failure(method: str, path: str, error: ScenarioError) -> Reply:
        log.error("cannot serve %s %s: %s", method, path, error)
        return _json_reply(500, error_envelope([{"code": CODE_STANDIN_FAILURE, "message": f"stand-in scenario error: {error}"}]))

    def _match_route(self, method: str, api_path: str) -> tuple[Route | None, dict[str, str]]:
        path_matched = False
        for route in ROUTES:
            match = route.pattern.fullmatch(api_path)
            if match is None:
                continue
            path_matched = True
            if route.method == method:
                return route, match.groupdict()
        if path_matched:
            log.info("method %s is not served for %s", method, api_path)
        return None, {}

    @staticmethod
    def _find_token(scenario: dict[str, Any], headers: Mapping[str, str]) -> dict[str, Any] | None:
        authorization = headers.get("Authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        return next((token for token in scenario["tokens"] if secrets.compare_digest(token["value"], value.strip())), None)

    @staticmethod
    def _auth_failure(is_graphql: bool, status: int, message: str) -> Reply:
        if is_graphql:
            return _json_reply(status, graphql_body(None, [message]))
        return _json_reply(status, error_envelope([{"code": CODE_AUTHENTICATION, "message": message}]))

    def _validate_request(self, method: str, api_path: str, query_text: str, headers: Mapping[str, str], body: bytes) -> Reply | None:
        """Return a 400 reply for a request that the schema rejects, or None."""
        if body:
            content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                return _json_reply(400, error_envelope([{"code": CODE_CONTENT_TYPE, "message": "Content-type must be application/json."}]))
            try:
                json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return _json_reply(400, error_envelope([{"code": CODE_MALFORMED_JSON, "message": "Malformed JSON in request body"}]))
        try:
            self.schema.validate_request(method, api_path, query=query_text, headers=dict(headers), body=body or None)
        except OperationNotFoundError:
            return None
        except SchemaValidationError as error:
            log.info("rejected %s %s: %s", method, api_path, "; ".join(error.failures))
            return _json_reply(400, error_envelope([{"code": CODE_INVALID_REQUEST, "message": f"Invalid request: {'; '.join(error.failures)}"}]))
        return None

    def _check_response(self, method: str, api_path: str, reply: Reply) -> Reply:
        try:
            self.schema.validate_response(method, api_path, status=reply.status, headers={"Content-Type": reply.content_type}, body=reply.body)
        except OperationNotFoundError:
            return reply
        except SchemaValidationError as error:
            log.error("stand-in response violates the Cloudflare schema: %s", error)
            return _json_reply(500, error_envelope([{"code": CODE_STANDIN_FAILURE, "message": f"stand-in response violates the schema: {error}"}]))
        return reply

    def _take_fault(self, method: str, api_path: str) -> dict[str, Any] | None:
        """Use up one count of the first fault that matches the request, and return it."""
        with self.store.lock:
            scenario = self.store.read()
            for index, fault in enumerate(scenario["faults"]):
                if fault["method"] in ("*", method) and fnmatch.fnmatchcase(api_path, fault["path"]):
                    used_fault = dict(fault)
                    fault["count"] -= 1
                    if fault["count"] == 0:
                        del scenario["faults"][index]
                    self.store.write(scenario)
                    return used_fault
        return None

    @staticmethod
    def _fault_reply(fault: dict[str, Any]) -> Reply:
        """Return the reply for an injected fault other than a delay."""
        kind = fault["kind"]
        if kind == "rate_limit":
            headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            if fault.get("body") == "html":
                return _html_reply(429, "429 Too Many Requests", headers)
            message = fault.get("message", "Rate limited. Please wait and consider throttling your request speed")
            return _json_reply(429, error_envelope([{"code": CODE_RATE_LIMITED, "message": message}]), headers)
        if kind == "permission_denied":
            message = fault.get("message", "Authentication error")
            return _json_reply(403, error_envelope([{"code": CODE_AUTHENTICATION, "message": message}]))
        if kind == "server_error":
            status = fault.get("status", 500)
            if fault.get("body") == "html":
                return _html_reply(status, f"{status} {HTTPStatus(status).phrase}")
            message = fault.get("message", "Internal Server Error")
            return _json_reply(status, error_envelope([{"code": CODE_STANDIN_FAILURE, "message": message}]))
        if kind == "html_200":
            return _html_reply(200, "Just a moment...")
        if kind == "graphql_errors":
            message = fault.get("message", "unable to execute query, please try again later")
            return _json_reply(200, graphql_body(None, [message]))
        raise ValueError(f"unknown fault kind {kind!r}")

    def _handle_admin(self, method: str, path: str, body: bytes) -> Reply:
        action = path[len(ADMIN_PREFIX) :].rstrip("/")
        try:
            payload = json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _json_reply(400, {"error": f"request body is not valid JSON: {error}"})
        try:
            if (method, action) == ("GET", "/scenario"):
                return _json_reply(200, self.store.read())
            if (method, action) == ("PUT", "/scenario"):
                self.store.write(payload)
                log.info("scenario replaced through %s/scenario", ADMIN_PREFIX)
                return _json_reply(200, self.store.read())
            if (method, action) == ("POST", "/faults"):
                fault = self.add_fault(payload)
                return _json_reply(201, fault)
            if (method, action) == ("DELETE", "/faults"):
                self.store.update(_remove_faults)
                return _json_reply(200, {"faults": []})
            if (method, action) == ("GET", "/requests"):
                return _json_reply(200, self.store.recorded_requests())
            if (method, action) == ("DELETE", "/requests"):
                self.store.clear_requests()
                return _json_reply(200, [])
            if (method, action) == ("POST", "/reset"):
                self.store.write(default_scenario())
                self.store.clear_requests()
                log.info("scenario reset to the default through %s/reset", ADMIN_PREFIX)
                return _json_reply(200, self.store.read())
        except ScenarioError as error:
            # A rejected change is the caller's error, but an invalid file on disk is not.
            return _json_reply(500 if method == "GET" else 400, {"error": str(error)})
        return _json_reply(404, {"error": f"no administration endpoint {method} {path}"})

    def add_fault(self, fault: Any) -> dict[str, Any]:
        """Append ``fault`` to the scenario's faults and return it. Raise ScenarioError if it is invalid."""
        if not isinstance(fault, dict):
            raise ScenarioError("a fault must be a JSON object with method, path, kind and count")
        stored = {"count": 1, **fault}
        stored["method"] = str(stored.get("method", "")).upper()
        self.store.update(lambda scenario: scenario["faults"].append(stored))
        log.info("fault added: %s", stored)
        return stored


def _remove_faults(scenario: dict[str, Any]) -> None:
    scenario["faults"] = []


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that can close its open connections when it stops.

    Handler threads are joined by server_close(). close_connections() first shuts down
    every open socket, so that a thread waiting on an idle keep-alive connection ends at once.
    """

    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], api: CloudflareApi) -> None:
        super().__init__(address, _Handler)
        self.api = api
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections close after this many seconds, so their threads end.
    timeout = 15

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _dispatch(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.send_error(411, "send the request body with Content-Length, not chunked")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.send_error(400, f"invalid Content-Length {self.headers.get('Content-Length')!r}")
            return
        if length > MAX_BODY_BYTES:
            self.send_error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            return
        body = self.rfile.read(length) if length else b""
        reply = self.server.api.handle(self.command, self.path, self.headers, body)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up first, as it does when an injected delay exceeds its timeout.
            log.debug("client closed the connection before the reply to %s %s", self.command, self.path)

    def version_string(self) -> str:
        return "cloudflare"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)


class CloudflareStandIn:
    """The stand-in as a server in a background thread, for tests and the command line.

    ``start()`` returns the base URL for the SDK; ``stop()`` shuts the server down and ends
    any injected delay still running. Usable as a context manager.
    """

    def __init__(self, state_dir: str | Path, host: str = "127.0.0.20", port: int = 0, *, schema: CloudflareSchema | None = None) -> None:
        address = ipaddress.ip_address(host)
        if address not in LOOPBACK:
            raise ValueError(f"listen address {host} is not in {LOOPBACK}. The stand-in serves loopback only.")
        self.host = host
        self.port = port
        self.store = ScenarioStore(Path(state_dir))
        # Fail at start, not on the first request, when scenario.json is invalid.
        self.store.read()
        self.schema = schema if schema is not None else CloudflareSchema.load()
        self._stopping = threading.Event()
        self.api = CloudflareApi(self.store, self.schema, self._stopping)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}{API_PREFIX}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.port}{ADMIN_PREFIX}"

    def start(self) -> str:
        """Start serving in a daemon thread and return the base URL."""
        if self._server is not None:
            raise RuntimeError("the stand-in is already running")
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self.api)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"cloudflare-standin-{self.port}", daemon=True
        )
        self._thread.start()
        log.info("Cloudflare API stand-in listening on %s (state in %s)", self.base_url, self.store.state_dir)
        return self.base_url

    def stop(self) -> None:
        """Stop serving and release the port. Safe to call twice."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
        log.info("Cloudflare API stand-in on %s:%d stopped", self.host, self.port)

    def __enter__(self) -> CloudflareStandIn:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def read_scenario(self) -> dict[str, Any]:
        return self.store.read()

    def write_scenario(self, scenario: dict[str, Any]) -> None:
        self.store.write(scenario)

    def update_scenario(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply ``change`` to the scenario under the store's lock, and return its result."""
        return self.store.update(change)

    def add_fault(self, method: str, path: str, kind: str, count: int = 1, **options: Any) -> dict[str, Any]:
        """Inject ``kind`` into the next ``count`` requests that match ``method`` and ``path``.

        ``path`` is a shell-style pattern on the path after /client/v4, and its ``*`` also
        matches "/". Options by kind: rate_limit takes retry_after (seconds, sent as
        Retry-After) and body ("json" or "html"); server_error takes status (500, 502 or
        503) and body; delay takes seconds (default 30); graphql_errors and the faults that
        send a JSON error take message.
        """
        return self.api.add_fault({"method": method, "path": path, "kind": kind, "count": count, **options})

    def recorded_requests(self) -> list[dict[str, Any]]:
        return self.store.recorded_requests()


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a local stand-in for the Cloudflare API v4 at http://ADDRESS:PORT/client/v4.")
    parser.add_argument("--listen", default="127.0.0.20", help="loopback address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8787, help="TCP port, or 0 for a free one (default: %(default)s)")
    parser.add_argument("--state-dir", type=Path, required=True, help="directory for scenario.json and requests.jsonl, created if missing")
    parser.add_argument("--schema", type=Path, default=None, help="Cloudflare OpenAPI schema (default: lab/cloudflare/openapi-subset.json)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=arguments.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        schema = CloudflareSchema.load(arguments.schema)
        standin = CloudflareStandIn(arguments.state_dir, arguments.listen, arguments.port, schema=schema)
        standin.start()
    except (ValueError, OSError, ScenarioError) as error:
        log.error("cannot start the stand-in: %s", error)
        return 2

    finished = threading.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: finished.set())
    print(standin.base_url, flush=True)
    finished.wait()
    standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
