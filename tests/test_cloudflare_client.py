"""cfheal's Cloudflare layer and plan-upgrade requests, against the local API stand-in.

Every request cfheal sends and every response it receives is recorded on the wire and
validated against Cloudflare's OpenAPI schema after each test.
"""

from __future__ import annotations

import time

import httpx
import pytest
import structlog

from cfheal.cloudflare import CloudflareAPI, CloudflareAPIError
from cfheal.config import CloudflareSettings
from cfheal.evidence import gather
from cfheal.upgrades import FAILED, PENDING, SUBMITTED, SUPERSEDED, UpgradeError, prepare_request, submit_request
from cloudflare_support import ExchangeRecorder, validate_exchanges

from cloudflare_api import CloudflareStandIn, lab_id
from cloudflare_schema import CloudflareSchema

HOST = "127.0.0.20"
ZONE_ID = lab_id("zone example.com")
ACCOUNT_ID = lab_id("account")
POOL_ID = lab_id("pool ws-backends")
SUBSCRIPTION_PATH = f"/zones/{ZONE_ID}/subscription"


@pytest.fixture(autouse=True)
def clean_cloudflare_environment(monkeypatch):
    for name in ("CLOUDFLARE_API_TOKEN", "CLOUDFLARE_API_KEY", "CLOUDFLARE_EMAIL", "CLOUDFLARE_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def schema() -> CloudflareSchema:
    return CloudflareSchema.load()


@pytest.fixture
def standin(tmp_path, schema):
    server = CloudflareStandIn(tmp_path / "state", host=HOST, port=0, schema=schema)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api(standin, schema):
    """Return a factory of cfheal Cloudflare clients whose traffic is validated afterwards."""
    recorder = ExchangeRecorder()
    clients = []

    def make(token: str = "lab-token", **settings) -> CloudflareAPI:
        http_client = httpx.Client(trust_env=False, event_hooks={"request": [recorder.on_request], "response": [recorder.on_response]})
        options = {"zone_id": ZONE_ID, "account_id": ACCOUNT_ID, "base_url": standin.base_url, "pools": [POOL_ID], "timeout": 2, "max_retry_wait": 0.2, **settings}
        client = CloudflareAPI(CloudflareSettings(**options), token, http_client=http_client)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    validate_exchanges(schema, recorder.exchanges)


def writes(standin: CloudflareStandIn) -> list[dict]:
    return [entry for entry in standin.recorded_requests() if entry["method"] in ("POST", "PUT") and entry["path"].endswith("/subscription")]


def prepare(api: CloudflareAPI, target: str = "next_tier"):
    return prepare_request(api, target=target, frequency=None, run_id="run-test", evidence={"diagnosis": "edge_connection_limit"})


class TestUpgradeRequests:
    def test_free_zone_to_pro_is_a_create(self, api, standin):
        client = api()

        request = prepare(client)
        submitted = submit_request(client, request)

        assert request.current_plan["legacy_id"] == "free"
        assert request.target_plan["legacy_id"] == "pro"
        assert request.api_call["method"] == "POST"
        assert submitted.status == SUBMITTED
        assert [entry["method"] for entry in writes(standin)] == ["POST"]
        assert client.zone()[1].legacy_id == "pro"

    def test_pro_zone_to_business_is_an_update(self, api, standin):
        client = api()
        submit_request(client, prepare(client, "pro"))

        request = prepare(client)
        submitted = submit_request(client, request)

        assert request.target_plan["legacy_id"] == "business"
        assert request.api_call["method"] == "PUT"
        assert submitted.status == SUBMITTED
        assert [entry["method"] for entry in writes(standin)] == ["POST", "PUT"]

    def test_plan_changed_before_approval_sends_nothing(self, api, standin):
        client = api()
        request = prepare(client)
        submit_request(client, prepare(client, "business"))

        result = submit_request(client, request)

        assert result.status == SUPERSEDED
        assert "moved from free to business" in result.status_reason
        assert len(writes(standin)) == 1

    def test_preparing_sends_no_write(self, api, standin):
        prepare(api())

        assert writes(standin) == []

    def test_submitted_request_is_not_sent_again(self, api, standin):
        client = api()
        request = submit_request(client, prepare(client))

        with pytest.raises(UpgradeError, match="not pending"):
            submit_request(client, request)
        assert len(writes(standin)) == 1

    def test_unknown_target_names_available_plans(self, api):
        with pytest.raises(UpgradeError, match="free, pro, business, enterprise"):
            prepare(api(), "platinum")

    def test_failed_purchase_is_not_retried(self, api, standin):
        client = api()
        request = prepare(client)
        standin.add_fault("POST", SUBSCRIPTION_PATH, "server_error", status=503)

        result = submit_request(client, request)

        assert result.status == FAILED
        assert "nothing is retried" in result.status_reason
        assert len(writes(standin)) == 1

    def test_rate_limited_purchase_is_not_retried(self, api, standin):
        client = api()
        request = prepare(client)
        standin.add_fault("POST", SUBSCRIPTION_PATH, "rate_limit", retry_after=1)

        result = submit_request(client, request)

        assert result.status == FAILED
        assert len(writes(standin)) == 1
        assert request.status != PENDING


class TestBadAnswers:
    def test_unknown_token_names_the_fix(self, api):
        with pytest.raises(CloudflareAPIError, match="CLOUDFLARE_API_TOKEN") as caught:
            api(token="wrong-token").verify_token()

        assert caught.value.status == 401
        assert not caught.value.temporary

    def test_missing_permission_is_named(self, api, standin):
        standin.add_fault("GET", f"/zones/{ZONE_ID}/available_plans", "permission_denied")

        with pytest.raises(CloudflareAPIError, match="Zone > Billing: Read") as caught:
            api().available_plans()

        assert 10000 in caught.value.codes
        assert [entry["path"].endswith("available_plans") for entry in standin.recorded_requests()].count(True) == 1

    def test_unknown_zone_is_not_found(self, api):
        with pytest.raises(CloudflareAPIError, match="check cloudflare.zone_id") as caught:
            api(zone_id=lab_id("zone missing.example")).zone()

        assert caught.value.status == 404

    def test_retry_after_is_honoured_and_bounded(self, api, standin):
        standin.add_fault("GET", f"/zones/{ZONE_ID}", "rate_limit", retry_after=7)
        started = time.monotonic()

        with structlog.testing.capture_logs() as events:
            name, plan = api(max_retry_wait=0.5).zone()

        assert plan.legacy_id == "free"
        assert 0.4 <= time.monotonic() - started < 3
        retries = [event for event in events if event["event"] == "cloudflare_call_retrying"]
        assert len(retries) == 1
        assert "10100" in retries[0]["error"]
        assert retries[0]["wait_s"] == 0.5

    @pytest.mark.parametrize("options", [{}, {"body": "html"}], ids=["no_retry_after", "html_body"])
    def test_rate_limit_without_retry_after_backs_off(self, api, standin, options):
        standin.add_fault("GET", f"/zones/{ZONE_ID}", "rate_limit", count=2, **options)

        with structlog.testing.capture_logs() as events:
            api().zone()

        assert [event["event"] for event in events].count("cloudflare_call_retrying") == 2

    def test_rate_limit_gives_up_after_attempts(self, api, standin):
        standin.add_fault("GET", f"/zones/{ZONE_ID}", "rate_limit", count=10)

        with pytest.raises(CloudflareAPIError, match="HTTP 429") as caught:
            api(read_attempts=3).zone()

        assert caught.value.temporary
        assert len([entry for entry in standin.recorded_requests() if entry["path"].endswith(f"/zones/{ZONE_ID}")]) == 3

    def test_code_10000_is_never_retried(self, api, standin):
        standin.add_fault("GET", f"/zones/{ZONE_ID}", "permission_denied", count=5)

        with pytest.raises(CloudflareAPIError, match="10000"):
            api().zone()

        assert len([entry for entry in standin.recorded_requests() if entry["path"].endswith(f"/zones/{ZONE_ID}")]) == 1

    def test_server_error_is_retried(self, api, standin):
        standin.add_fault("GET", f"/zones/{ZONE_ID}", "server_error", status=502)

        assert api().zone()[1].legacy_id == "free"

    def test_timeout_is_temporary(self, api, standin):
        standin.add_fault("GET", f"/zones/{ZONE_ID}", "delay", seconds=5, count=5)

        with pytest.raises(CloudflareAPIError, match="timed out") as caught:
            api(timeout=0.3, read_attempts=2).zone()

        assert caught.value.temporary

    def test_html_body_with_200_is_reported(self, api, standin):
        standin.add_fault("GET", f"/zones/{ZONE_ID}", "html_200", count=5)

        with pytest.raises(CloudflareAPIError, match="not a JSON object"):
            api(read_attempts=2).zone()


class TestEvidence:
    def test_pool_health_and_edge_errors_read(self, api, standin):
        standin.update_scenario(lambda scenario: scenario["zones"][0].update(edge_status_counts={"502": 41, "503": 2}))

        evidence = gather(api(), None)

        assert evidence.pools[POOL_ID] == {"127.0.0.11": True, "127.0.0.12": True, "127.0.0.13": True}
        assert evidence.edge_errors == {502: 41, 503: 2}
        assert evidence.notes == []

    def test_graphql_errors_become_a_note(self, api, standin):
        standin.add_fault("POST", "/graphql", "graphql_errors")

        evidence = gather(api(), None)

        assert evidence.edge_errors is None
        assert "edge error analytics unavailable" in evidence.notes[0]
        assert evidence.pools[POOL_ID]

    def test_no_client_says_why(self):
        evidence = gather(None, "no Cloudflare token")

        assert evidence.summary() == "no Cloudflare token"
