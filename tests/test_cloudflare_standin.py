"""Tests for the Cloudflare API stand-in in lab/cloudflare_api.py, driven by the cloudflare SDK.

A test of the stand-in starts it in this process on 127.0.0.20 with a free port and a fresh
state directory, and talks to it through the real ``cloudflare`` SDK. An httpx event hook
on the SDK's HTTP client records every request and response on the wire. After each test
the ``sdk`` fixture validates all of them against Cloudflare's OpenAPI schema. A response
that is outside the schema on purpose (an HTML body, a 5xx status) must be rejected by the
validator instead.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudflare
import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
LAB_DIR = REPO / "lab"
sys.path.append(str(LAB_DIR))

import cloudflare_api  # noqa: E402
from cloudflare_api import (  # noqa: E402
    ACCOUNT_ANALYTICS_READ,
    FREE_PLAN_ID,
    LOAD_BALANCING_READ,
    ZONE_BILLING_READ,
    ZONE_READ,
    CloudflareStandIn,
    ScenarioError,
    lab_id,
)
from cloudflare_schema import CloudflareSchema, OperationNotFoundError, SchemaValidationError  # noqa: E402
from cloudflare_support import ExchangeRecorder, validate_exchanges  # noqa: E402

HOST = "127.0.0.20"
TOKEN = "lab-token"
ZONE_ID = lab_id("zone example.com")
ACCOUNT_ID = lab_id("account")
POOL_ID = lab_id("pool ws-backends")
PRO_PLAN_ID = "a577b510288e82b26486fd1df47000ec"
GRAPHQL_QUERY = """
query EdgeErrors($zoneTag: string, $since: Time, $until: Time) {
  viewer {
    zones(filter: {zoneTag: $zoneTag}) {
      httpRequestsAdaptiveGroups(
        limit: 100
        filter: {datetime_geq: $since, datetime_lt: $until, edgeResponseStatus_in: [502, 503], originResponseStatus: 0}
      ) {
        count
        dimensions { edgeResponseStatus }
      }
    }
  }
}
"""


@pytest.fixture(autouse=True)
def clean_cloudflare_environment(monkeypatch):
    # cloudflare 5.9 sends CLOUDFLARE_EMAIL or CLOUDFLARE_API_KEY in place of the token when
    # either is set, and reads the base URL and extra headers from the environment too.
    for name in (
        "CLOUDFLARE_API_TOKEN",
        "CLOUDFLARE_API_KEY",
        "CLOUDFLARE_EMAIL",
        "CLOUDFLARE_API_USER_SERVICE_KEY",
        "CLOUDFLARE_BASE_URL",
        "CLOUDFLARE_CUSTOM_HEADERS",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def schema() -> CloudflareSchema:
    return CloudflareSchema.load()


@pytest.fixture
def standin(tmp_path, schema):
    server = CloudflareStandIn(tmp_path / "state", host=HOST, port=0, schema=schema)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def recorder() -> ExchangeRecorder:
    return ExchangeRecorder()


@pytest.fixture
def sdk(standin, schema, recorder):
    """Return a factory of SDK clients bound to the stand-in, and validate their traffic afterwards."""
    clients = []

    def make_client(token: str = TOKEN, **options: Any) -> cloudflare.Cloudflare:
        # trust_env=False keeps proxy variables from routing loopback traffic elsewhere.
        http_client = cloudflare.DefaultHttpxClient(
            trust_env=False,
            event_hooks={"request": [recorder.on_request], "response": [recorder.on_response]},
        )
        client = cloudflare.Cloudflare(api_token=token, base_url=standin.base_url, http_client=http_client, **options)
        clients.append(client)
        return client

    yield make_client
    for client in clients:
        client.close()
    validate_exchanges(schema, recorder.exchanges)


def add_token(standin: CloudflareStandIn, value: str, permissions: list[str]) -> None:
    token = {"value": value, "id": lab_id(f"token {value}"), "status": "active", "permissions": permissions}
    standin.update_scenario(lambda scenario: scenario["tokens"].append(token))


def graphql(client: cloudflare.Cloudflare, query: str = GRAPHQL_QUERY, zone_tag: str = ZONE_ID) -> Any:
    variables = {"zoneTag": zone_tag, "since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:05:00Z"}
    return client.post("/graphql", cast_to=object, body={"query": query, "variables": variables})


# ---- Reading the zone, its plan and the plans available ----


def test_token_verify_active(sdk):
    verified = sdk().user.tokens.verify()

    assert verified.status == "active"
    assert verified.id == lab_id("token lab-token")


def test_zone_get_shows_free_plan(sdk):
    client = sdk()

    listed = client.zones.list(name="example.com").result
    zone = client.zones.get(zone_id=ZONE_ID)

    assert [item.id for item in listed] == [ZONE_ID]
    assert zone.name == "example.com"
    assert zone.account.id == ACCOUNT_ID
    assert zone.plan.id == FREE_PLAN_ID
    assert zone.plan.legacy_id == "free"
    assert zone.plan.price == 0
    assert zone.plan.is_subscribed is True


def test_zones_list_filters_and_pages(sdk, standin):
    def add_zones(scenario):
        for name in ("example.org", "lab.example.net"):
            zone = dict(scenario["zones"][0], id=lab_id(f"zone {name}"), name=name)
            scenario["zones"].append(zone)

    standin.update_scenario(add_zones)
    client = sdk()

    contains = client.zones.list(name="contains:example.").result
    ends_with = client.zones.list(name="ends_with:.org").result
    missing = client.zones.list(name="example.invalid").result
    first_page = client.zones.list(per_page=5, page=1)
    every_zone = list(client.zones.list(per_page=5))

    assert sorted(zone.name for zone in contains) == ["example.com", "example.org", "lab.example.net"]
    assert [zone.name for zone in ends_with] == ["example.org"]
    assert missing == []
    assert first_page.result_info.total_count == 3
    # Auto-pagination requests page 2, which must come back empty.
    assert len(every_zone) == 3


def test_subscription_get_on_free_raises_1207(sdk):
    with pytest.raises(cloudflare.NotFoundError) as caught:
        sdk().zones.subscriptions.get(zone_id=ZONE_ID)

    assert caught.value.status_code == 404
    assert [error.code for error in caught.value.errors] == [1207]


def test_plans_list_names_upgrade_targets(sdk):
    client = sdk()

    plans = {plan.legacy_id: plan for plan in client.zones.plans.list(zone_id=ZONE_ID)}
    pro = client.zones.plans.get(PRO_PLAN_ID, zone_id=ZONE_ID)

    assert set(plans) == {"free", "pro", "business", "enterprise"}
    assert plans["free"].is_subscribed is True
    assert plans["free"].can_subscribe is False
    assert plans["pro"].can_subscribe is True
    assert plans["business"].can_subscribe is True
    assert plans["enterprise"].can_subscribe is False
    assert plans["pro"].price < plans["business"].price
    assert {plan.frequency for plan in plans.values()} == {"monthly"}
    assert pro.id == PRO_PLAN_ID
    assert pro.legacy_id == "pro"


def test_rate_plans_list(sdk):
    rate_plans = {plan.id: plan for plan in sdk().zones.rate_plans.get(zone_id=ZONE_ID)}

    assert set(rate_plans) == {"free", "pro", "business", "enterprise"}
    assert rate_plans["pro"].currency == "USD"


def test_unknown_zone_raises_not_found(sdk):
    with pytest.raises(cloudflare.NotFoundError) as caught:
        sdk().zones.get(zone_id=lab_id("zone nowhere.example"))

    assert [error.code for error in caught.value.errors] == [7003, 7000]


# ---- Purchasing a plan ----


def test_subscription_create_free_to_pro(sdk, standin):
    client = sdk(max_retries=0)

    created = client.zones.subscriptions.create(zone_id=ZONE_ID, rate_plan={"id": "pro"}, frequency="monthly")
    zone = client.zones.get(zone_id=ZONE_ID)
    subscription = client.zones.subscriptions.get(zone_id=ZONE_ID)

    assert created.rate_plan.id == "pro"
    assert created.state == "Paid"
    assert created.price == 25
    assert zone.plan.legacy_id == "pro"
    assert zone.plan.id == PRO_PLAN_ID
    assert subscription.id == created.id
    purchases = [entry for entry in standin.recorded_requests() if entry["method"] == "POST"]
    assert [entry["body"] for entry in purchases] == [{"rate_plan": {"id": "pro"}, "frequency": "monthly"}]
    assert [entry["status"] for entry in purchases] == [200]
    assert standin.read_scenario()["zones"][0]["plan_id"] == PRO_PLAN_ID


def test_subscription_update_pro_to_business(sdk):
    client = sdk(max_retries=0)
    client.zones.subscriptions.create(zone_id=ZONE_ID, rate_plan={"id": "pro"}, frequency="monthly")

    updated = client.zones.subscriptions.update(zone_id=ZONE_ID, rate_plan={"id": "business"}, frequency="yearly")
    zone = client.zones.get(zone_id=ZONE_ID)

    assert updated.rate_plan.id == "business"
    assert updated.frequency == "yearly"
    assert zone.plan.legacy_id == "business"


def test_subscription_update_to_free_ends_it(sdk):
    client = sdk(max_retries=0)
    client.zones.subscriptions.create(zone_id=ZONE_ID, rate_plan={"id": "pro"})

    client.zones.subscriptions.update(zone_id=ZONE_ID, rate_plan={"id": "free"})

    assert client.zones.get(zone_id=ZONE_ID).plan.legacy_id == "free"
    with pytest.raises(cloudflare.NotFoundError):
        client.zones.subscriptions.get(zone_id=ZONE_ID)


def test_subscription_update_on_free_raises_1207(sdk):
    with pytest.raises(cloudflare.NotFoundError) as caught:
        sdk(max_retries=0).zones.subscriptions.update(zone_id=ZONE_ID, rate_plan={"id": "pro"})

    assert [error.code for error in caught.value.errors] == [1207]


def test_subscription_create_twice_rejected(sdk):
    client = sdk(max_retries=0)
    client.zones.subscriptions.create(zone_id=ZONE_ID, rate_plan={"id": "pro"})

    with pytest.raises(cloudflare.BadRequestError):
        client.zones.subscriptions.create(zone_id=ZONE_ID, rate_plan={"id": "business"})

    assert client.zones.get(zone_id=ZONE_ID).plan.legacy_id == "pro"


def test_subscription_enterprise_rejected(sdk):
    client = sdk(max_retries=0)

    with pytest.raises(cloudflare.BadRequestError) as caught:
        client.zones.subscriptions.create(zone_id=ZONE_ID, rate_plan={"id": "enterprise"})

    assert "cannot be subscribed" in caught.value.errors[0].message
    assert client.zones.get(zone_id=ZONE_ID).plan.legacy_id == "free"


@pytest.mark.parametrize(
    ("body", "failure"),
    [
        ({"rate_plan": {"id": "pro"}, "frequency": "daily"}, "'daily' is not one of"),
        ({"rate_plan": {"id": "pro"}, "price": 0}, "read-only property"),
        ({"rate_plan": "pro"}, "is not of type 'object'"),
    ],
)
def test_subscription_invalid_body_rejected(standin, schema, body, failure):
    # The SDK's types would not send these bodies, so they go through plain httpx.
    path = f"/zones/{ZONE_ID}/subscription"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    with pytest.raises(SchemaValidationError) as rejected:
        schema.validate_request("POST", path, headers=headers, body=body)
    with httpx.Client(trust_env=False) as client:
        response = client.post(standin.base_url + path, headers=headers, json=body)

    assert failure in str(rejected.value)
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == 1004
    assert failure in response.json()["errors"][0]["message"]
    schema.validate_response("POST", path, status=400, headers=dict(response.headers), body=response.content)
    assert standin.read_scenario()["zones"][0]["plan_id"] == FREE_PLAN_ID


def test_subscription_malformed_json_rejected(standin, schema):
    path = f"/zones/{ZONE_ID}/subscription"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    with httpx.Client(trust_env=False) as client:
        response = client.post(standin.base_url + path, headers=headers, content=b"{rate_plan: pro")

    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == 6007
    schema.validate_response("POST", path, status=400, headers=dict(response.headers), body=response.content)


# ---- Load balancing ----


def test_pool_health_raw_by_region_and_address(sdk):
    client = sdk()

    health = client.get(f"/accounts/{ACCOUNT_ID}/load_balancers/pools/{POOL_ID}/health", cast_to=object)

    pop_health = health["result"]["pop_health"]
    assert health["result"]["pool_id"] == POOL_ID
    assert set(pop_health) == {"Amsterdam, NL", "Frankfurt, DE"}
    for region in pop_health.values():
        assert region["healthy"] is True
        addresses = [address for origin in region["origins"] for address in origin]
        assert addresses == ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        assert all(entry["healthy"] for origin in region["origins"] for entry in origin.values())


def test_pool_health_typed_sdk_loses_regions(sdk):
    # The SDK types pop_health as one region without a name, so the typed call hides the data.
    typed = sdk().load_balancers.pools.health.get(POOL_ID, account_id=ACCOUNT_ID)

    assert typed.pool_id == POOL_ID
    assert typed.pop_health.healthy is None
    assert typed.pop_health.origins is None


def test_pool_health_follows_scenario(sdk, standin):
    def fail_origin(scenario):
        origin = scenario["pools"][0]["origins"][1]
        origin.update(healthy=False, failure_reason="HTTP timeout occurred", response_code=0)

    client = sdk()
    standin.update_scenario(fail_origin)

    health = client.get(f"/accounts/{ACCOUNT_ID}/load_balancers/pools/{POOL_ID}/health", cast_to=object)

    origins = health["result"]["pop_health"]["Amsterdam, NL"]["origins"]
    assert origins[1]["127.0.0.12"]["healthy"] is False
    assert origins[1]["127.0.0.12"]["failure_reason"] == "HTTP timeout occurred"
    # Two healthy origins still meet minimum_origins 1.
    assert health["result"]["pop_health"]["Amsterdam, NL"]["healthy"] is True


def test_pools_and_load_balancers_list(sdk):
    client = sdk()

    pools = client.load_balancers.pools.list(account_id=ACCOUNT_ID).result
    pool = client.load_balancers.pools.get(POOL_ID, account_id=ACCOUNT_ID)
    balancers = client.load_balancers.list(zone_id=ZONE_ID).result

    assert [item.id for item in pools] == [POOL_ID]
    assert [origin.address for origin in pool.origins] == ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
    assert [balancer.name for balancer in balancers] == ["ws.example.com"]
    assert balancers[0].default_pools == [POOL_ID]


# ---- Authentication and permissions ----


def test_unknown_token_raises_401(sdk):
    with pytest.raises(cloudflare.AuthenticationError) as caught:
        sdk(token="not-a-token", max_retries=0).zones.get(zone_id=ZONE_ID)

    assert caught.value.status_code == 401
    assert [(error.code, error.message) for error in caught.value.errors] == [(10000, "Authentication error")]


def test_missing_permission_raises_403(sdk, standin):
    add_token(standin, "read-only-token", [ZONE_READ, ZONE_BILLING_READ, LOAD_BALANCING_READ])
    client = sdk(token="read-only-token", max_retries=0)

    plans = client.zones.plans.list(zone_id=ZONE_ID)
    with pytest.raises(cloudflare.PermissionDeniedError) as caught:
        client.zones.subscriptions.create(zone_id=ZONE_ID, rate_plan={"id": "pro"})

    assert len(list(plans)) == 4
    assert [error.code for error in caught.value.errors] == [10000]
    assert standin.read_scenario()["zones"][0]["plan_id"] == FREE_PLAN_ID


def test_request_record_omits_token(sdk, standin):
    sdk().zones.get(zone_id=ZONE_ID)

    record = (standin.store.requests_path).read_text()
    assert TOKEN not in record
    assert json.loads(record.splitlines()[-1])["token_id"] == lab_id("token lab-token")


# ---- Injected faults ----


@pytest.mark.parametrize(
    ("fault", "exception", "status"),
    [
        ({"kind": "rate_limit", "retry_after": 7}, cloudflare.RateLimitError, 429),
        ({"kind": "rate_limit"}, cloudflare.RateLimitError, 429),
        ({"kind": "rate_limit", "body": "html"}, cloudflare.RateLimitError, 429),
        ({"kind": "permission_denied"}, cloudflare.PermissionDeniedError, 403),
        ({"kind": "server_error", "status": 500}, cloudflare.InternalServerError, 500),
        ({"kind": "server_error", "status": 502, "body": "html"}, cloudflare.InternalServerError, 502),
        ({"kind": "server_error", "status": 503}, cloudflare.InternalServerError, 503),
    ],
    ids=["429-retry-after", "429-bare", "429-html", "403", "500", "502-html", "503"],
)
def test_fault_raises_sdk_error(sdk, standin, fault, exception, status):
    standin.add_fault("GET", "/zones/*", **fault)
    client = sdk(max_retries=0)

    with pytest.raises(exception) as caught:
        client.zones.get(zone_id=ZONE_ID)

    assert caught.value.status_code == status
    assert client.zones.get(zone_id=ZONE_ID).id == ZONE_ID
    assert [entry["fault"] for entry in standin.recorded_requests()] == [fault["kind"], None]


def test_rate_limit_fault_details(sdk, standin):
    standin.add_fault("GET", "/zones/*", "rate_limit", retry_after=7)
    standin.add_fault("GET", "/zones/*", "rate_limit")
    standin.add_fault("GET", "/zones/*", "rate_limit", body="html")
    client = sdk(max_retries=0)

    with pytest.raises(cloudflare.RateLimitError) as with_header:
        client.zones.get(zone_id=ZONE_ID)
    with pytest.raises(cloudflare.RateLimitError) as without_header:
        client.zones.get(zone_id=ZONE_ID)
    with pytest.raises(cloudflare.RateLimitError) as html:
        client.zones.get(zone_id=ZONE_ID)

    assert with_header.value.response.headers["Retry-After"] == "7"
    assert [error.code for error in with_header.value.errors] == [10100]
    assert "Retry-After" not in without_header.value.response.headers
    assert [error.code for error in without_header.value.errors] == [10100]
    assert html.value.errors == []
    assert html.value.response.headers["Content-Type"].startswith("text/html")


def test_delay_fault_times_out(sdk, standin):
    standin.add_fault("GET", "/zones/*", "delay", seconds=5)
    client = sdk(max_retries=0, timeout=0.3)

    started = time.monotonic()
    with pytest.raises(cloudflare.APITimeoutError):
        client.zones.get(zone_id=ZONE_ID)

    assert time.monotonic() - started < 2


def test_html_200_strict_client_raises(sdk, standin):
    standin.add_fault("GET", "/zones/*", "html_200", count=2)

    with pytest.raises(cloudflare.APIResponseValidationError):
        sdk(max_retries=0, _strict_response_validation=True).zones.get(zone_id=ZONE_ID)
    # Without strict validation the SDK returns the HTML text, and unwrapping "result" fails.
    with pytest.raises(AttributeError, match="'str' object has no attribute 'result'"):
        sdk(max_retries=0).zones.get(zone_id=ZONE_ID)


def test_fault_count_and_scope(sdk, standin):
    standin.add_fault("POST", "/zones/*/subscription", "server_error", count=2, status=503)
    client = sdk(max_retries=0)

    assert client.zones.get(zone_id=ZONE_ID).plan.legacy_id == "free"
    for _ in range(2):
        with pytest.raises(cloudflare.InternalServerError):
            client.zones.subscriptions.create(zone_id=ZONE_ID, rate_plan={"id": "pro"})
    assert standin.read_scenario()["faults"] == []
    client.zones.subscriptions.create(zone_id=ZONE_ID, rate_plan={"id": "pro"})

    assert client.zones.get(zone_id=ZONE_ID).plan.legacy_id == "pro"
    assert [entry["status"] for entry in standin.recorded_requests()] == [200, 503, 503, 200, 200]


def test_sdk_retries_consume_fault(sdk, standin):
    # With its default max_retries=2 the SDK sends the request up to three times.
    standin.add_fault("GET", "/zones/*", "server_error", count=2, status=502)

    zone = sdk().zones.get(zone_id=ZONE_ID)

    assert zone.id == ZONE_ID
    assert [entry["status"] for entry in standin.recorded_requests()] == [502, 502, 200]


# ---- GraphQL analytics ----


def test_graphql_counts_edge_errors(sdk, standin):
    standin.update_scenario(lambda scenario: scenario["zones"][0]["edge_status_counts"].update({"502": 40, "503": 2}))

    answer = graphql(sdk())

    assert answer["errors"] is None
    groups = answer["data"]["viewer"]["zones"][0]["httpRequestsAdaptiveGroups"]
    assert groups == [
        {"count": 40, "dimensions": {"edgeResponseStatus": 502}},
        {"count": 2, "dimensions": {"edgeResponseStatus": 503}},
    ]


def test_graphql_filters_status(sdk, standin):
    standin.update_scenario(lambda scenario: scenario["zones"][0]["edge_status_counts"].update({"502": 40, "503": 2}))
    query = GRAPHQL_QUERY.replace("edgeResponseStatus_in: [502, 503]", "edgeResponseStatus_in: [503]")

    answer = graphql(sdk(), query=query)

    assert answer["data"]["viewer"]["zones"][0]["httpRequestsAdaptiveGroups"] == [{"count": 2, "dimensions": {"edgeResponseStatus": 503}}]


def test_graphql_errors_fault(sdk, standin):
    standin.add_fault("POST", "/graphql", "graphql_errors", message="unable to execute query, please try again later")

    answer = graphql(sdk(max_retries=0))

    assert answer["data"] is None
    assert [error["message"] for error in answer["errors"]] == ["unable to execute query, please try again later"]


def test_graphql_needs_analytics_permission(sdk, standin):
    add_token(standin, "zone-only-token", [ZONE_READ])

    with pytest.raises(cloudflare.PermissionDeniedError) as caught:
        graphql(sdk(token="zone-only-token", max_retries=0))

    assert caught.value.body["errors"][0]["message"] == "not authorized for that account"


def test_graphql_unknown_zone_not_authorized(sdk, standin):
    add_token(standin, "analytics-token", [ACCOUNT_ANALYTICS_READ])

    with pytest.raises(cloudflare.PermissionDeniedError) as caught:
        graphql(sdk(token="analytics-token", max_retries=0), zone_tag=lab_id("zone nowhere.example"))

    assert "are not authorized" in caught.value.body["errors"][0]["message"]


# ---- Scenario and administration interface ----


def test_scenario_file_edit_takes_effect(sdk, standin):
    client = sdk()
    scenario_path = standin.store.scenario_path
    scenario = json.loads(scenario_path.read_text())
    scenario["zones"][0]["plan_id"] = PRO_PLAN_ID
    scenario_path.write_text(json.dumps(scenario))

    assert client.zones.get(zone_id=ZONE_ID).plan.legacy_id == "pro"


def test_admin_interface_over_http(standin):
    with httpx.Client(base_url=standin.admin_url, trust_env=False) as admin:
        added = admin.post("/faults", json={"method": "get", "path": "/zones", "kind": "permission_denied"})
        invalid_fault = admin.post("/faults", json={"method": "GET", "path": "/zones", "kind": "explode"})
        scenario = admin.get("/scenario").json()
        invalid_scenario = admin.put("/scenario", json={"zones": []})
        with httpx.Client(trust_env=False) as client:
            denied = client.get(standin.base_url + "/zones", headers={"Authorization": f"Bearer {TOKEN}"})
        recorded = admin.get("/requests").json()
        reset = admin.post("/reset")

    assert added.status_code == 201
    assert added.json()["method"] == "GET"
    assert invalid_fault.status_code == 400
    assert "explode" in invalid_fault.json()["error"]
    assert [fault["kind"] for fault in scenario["faults"]] == ["permission_denied"]
    assert invalid_scenario.status_code == 400
    assert denied.status_code == 403
    assert [(entry["path"], entry["status"], entry["fault"]) for entry in recorded] == [("/client/v4/zones", 403, "permission_denied")]
    assert reset.status_code == 200
    assert standin.recorded_requests() == []
    assert standin.read_scenario() == cloudflare_api.default_scenario()


def test_invalid_scenario_file_returns_500(standin):
    standin.store.scenario_path.write_text(json.dumps({"zones": "none"}))

    with httpx.Client(trust_env=False) as client:
        response = client.get(standin.base_url + "/zones", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 500
    assert "scenario" in response.json()["errors"][0]["message"]


def test_standin_rejects_invalid_scenario_at_start(tmp_path, schema):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "scenario.json").write_text(json.dumps({"zones": []}))

    with pytest.raises(ScenarioError, match="'accounts' is a required property"):
        CloudflareStandIn(state_dir, host=HOST, port=0, schema=schema)


def test_scenario_validation_names_problem():
    scenario = cloudflare_api.default_scenario()
    scenario["zones"][0]["plan_id"] = "f" * 32

    with pytest.raises(ScenarioError, match="plan_id f{32}, which is not in plans"):
        cloudflare_api.validate_scenario(scenario)


def test_standin_rejects_non_loopback_address(tmp_path, schema):
    with pytest.raises(ValueError, match="not in 127.0.0.0/8"):
        CloudflareStandIn(tmp_path, host="192.0.2.1", port=0, schema=schema)


def test_standin_self_check_replaces_bad_response(sdk, monkeypatch):
    # A renderer that breaks the schema must make the stand-in fail loudly with 500.
    monkeypatch.setattr(cloudflare_api, "render_pool", lambda pool: {"id": pool["id"], "minimum_origins": "one"})

    with pytest.raises(cloudflare.InternalServerError) as caught:
        sdk(max_retries=0).load_balancers.pools.get(POOL_ID, account_id=ACCOUNT_ID)

    assert "violates the schema" in caught.value.errors[0].message
    assert "minimum_origins" in caught.value.errors[0].message


def test_command_line_serves_and_stops(tmp_path):
    script = LAB_DIR / "cloudflare_api.py"
    process = subprocess.Popen(
        [sys.executable, str(script), "--listen", "127.0.0.21", "--port", "0", "--state-dir", str(tmp_path / "state"), "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = process.stdout.readline().strip()
        with httpx.Client(trust_env=False) as client:
            response = client.get(base_url + "/user/tokens/verify", headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=10)

    assert base_url.startswith("http://127.0.0.21:")
    assert base_url.endswith("/client/v4")
    assert response.json()["result"]["status"] == "active"
    assert returncode == 0, process.stderr.read()
    assert (tmp_path / "state" / "scenario.json").exists()


# ---- The validator itself ----


def test_validator_rejects_malformed_response(schema):
    zone = cloudflare_api.render_zone(cloudflare_api.default_scenario(), cloudflare_api.default_scenario()["zones"][0])
    del zone["name_servers"]
    zone["development_mode"] = "off"
    body = {"success": True, "errors": [], "messages": [], "result": zone}

    with pytest.raises(SchemaValidationError) as rejected:
        schema.validate_response("GET", f"/client/v4/zones/{ZONE_ID}", status=200, body=body)

    message = str(rejected.value)
    assert f"/zones/{ZONE_ID}" in message
    assert "zones-0-get" in message
    assert "'name_servers' is a required property" in message
    assert "at result/development_mode: 'off' is not of type 'number'" in message


def test_validator_rejects_bad_error_envelope(schema):
    body = {"success": False, "errors": [{"code": 10000}], "messages": [], "result": None}

    with pytest.raises(SchemaValidationError, match="'message' is a required property"):
        schema.validate_response("GET", f"/zones/{ZONE_ID}/subscription", status=403, body=body)


def test_validator_rejects_unknown_operation(schema):
    with pytest.raises(OperationNotFoundError):
        schema.validate_request("DELETE", f"/zones/{ZONE_ID}/subscription")


def test_validator_covers_every_exchange(sdk, schema, recorder, standin):
    client = sdk()
    client.user.tokens.verify()
    client.zones.get(zone_id=ZONE_ID)
    graphql(client)

    checked = validate_exchanges(schema, recorder.exchanges)

    assert len(recorder.exchanges) == len(standin.recorded_requests()) == 3
    assert checked == 2


def test_published_schema_defects_are_corrected():
    published = CloudflareSchema.load(correct_defects=False)
    corrected = CloudflareSchema.load()
    path = f"/zones/{ZONE_ID}/subscription"
    error_body = {"success": False, "errors": [{"code": 1207, "message": "No subscription"}], "messages": [], "result": None}
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    with pytest.raises(SchemaValidationError, match="False is not one of \\[True\\]"):
        published.validate_response("GET", path, status=404, body=error_body)
    with pytest.raises(SchemaValidationError, match="Security not found"):
        published.validate_request("GET", path, headers=bearer)
    with pytest.raises(SchemaValidationError, match="read-only"):
        published.validate_request("GET", path, headers={**bearer, "X-Auth-Email": "a@example.com", "X-Auth-Key": "k"})
    corrected.validate_response("GET", path, status=404, body=error_body)
    corrected.validate_request("GET", path, headers=bearer)

    locations = {(c.operation.operation_id, c.location) for c in corrected.corrections}
    assert ("zone-subscription-zone-subscription-details", "responses/4XX") in locations
    assert ("zone-subscription-zone-subscription-details", "security") in locations
    assert ("zone-subscription-zone-subscription-details", "parameters/path/identifier") in locations
    assert ("zones-0-get", "responses/4XX") not in locations
    assert len(corrected.document_errors) == 1
    assert "'none' is not of type 'array'" in corrected.document_errors[0]
