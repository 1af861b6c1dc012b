"""The safety envelope, the trigger endpoint and notifications, without the lab."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from cfheal.config import NotifySettings, WatchSettings
from cfheal.notify import Notifier
from cfheal.policy import Plan, RestartTarget
from cfheal.state import Store
from cfheal.triggers import TriggerServer
from cfheal.watch import BREAKER, PAUSE, RESUMED, Streak, envelope_blocker


class _Config:
    """The part of Config that envelope_blocker reads."""

    def __init__(self, **watch) -> None:
        self.watch = WatchSettings(**watch)


TARGETS = [RestartTarget("backend-1", "app", "ws://127.0.0.1:1/"), RestartTarget("backend-2", "app", "ws://127.0.0.1:2/")]
ROLLOUT = Plan(True, "restart", "test", batches=[[TARGETS[0]], [TARGETS[1]]])
UPGRADE = Plan(True, "upgrade", "test", kind="plan_upgrade")


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "state")


class TestEnvelope:
    def test_clear_envelope_lets_plan_through(self, store):
        assert envelope_blocker(ROLLOUT, store, _Config(), time.time()) is None

    def test_pause_withholds_with_reason(self, store):
        store.set_switch(PAUSE, {"reason": "deploy in progress"})

        blocker = envelope_blocker(ROLLOUT, store, _Config(), time.time())

        assert "paused" in blocker
        assert "deploy in progress" in blocker
        assert "cfheal resume" in blocker

    def test_open_breaker_withholds_even_upgrades(self, store):
        store.set_switch(BREAKER, {"run_id": "r1", "reason": "aborted: batch 2 failed"})

        blocker = envelope_blocker(UPGRADE, store, _Config(), time.time())

        assert "breaker open" in blocker
        assert "r1" in blocker

    def test_recent_restart_is_in_cooldown(self, store):
        store.record_actions("r1", "restart", ["backend-2/app"])

        blocker = envelope_blocker(ROLLOUT, store, _Config(cooldown="10m"), time.time())

        assert blocker.startswith("cooldown: backend-2/app")

    def test_cooldown_ends(self, store):
        store.record_actions("r1", "restart", ["backend-2/app"])

        blocker = envelope_blocker(ROLLOUT, store, _Config(cooldown="10m"), time.time() + 601)

        assert blocker is None

    def test_cooldown_does_not_block_escalation(self, store):
        store.record_actions("r1", "restart", ["backend-1/app", "backend-2/app"])

        assert envelope_blocker(UPGRADE, store, _Config(cooldown="10m"), time.time()) is None

    def test_resume_starts_cooldown_afresh(self, store):
        store.record_actions("r1", "restart", ["backend-2/app"])
        store.set_switch(RESUMED, {"at": time.time() + 1})

        assert envelope_blocker(ROLLOUT, store, _Config(cooldown="10m"), time.time() + 2) is None

    def test_budget_counts_runs_not_targets(self, store):
        for run in ("r1", "r2"):
            store.record_actions(run, "restart", ["backend-9/app", "backend-8/app"])

        below = envelope_blocker(UPGRADE, store, _Config(max_actions=3), time.time())
        store.record_actions("r3", "plan_upgrade", ["upg-1"])
        used = envelope_blocker(UPGRADE, store, _Config(max_actions=3), time.time())

        assert below is None
        assert used.startswith("budget used: 3 remediations")


class TestStreak:
    def test_counts_consecutive_faults(self):
        streak = Streak()

        streak.update(True, 10.0)
        streak.update(True, 11.0)

        assert streak.count == 2
        assert streak.since == 10.0

    def test_one_healthy_evaluation_resets(self):
        streak = Streak()
        streak.update(True, 10.0)

        streak.update(False, 11.0)

        assert streak.count == 0
        assert streak.since is None


class TestStore:
    def test_dead_run_reported_interrupted(self, store):
        store.start_run("r-dead", "run", "2026-01-01T00:00:00+00:00")
        with store._db() as db:
            db.execute("UPDATE runs SET pid = 999999999 WHERE run_id = 'r-dead'")

        recovered = store.recover_dead_runs()

        assert [run["run_id"] for run in recovered] == ["r-dead"]
        assert store.get_run("r-dead")["outcome"] == "interrupted"

    def test_live_run_left_alone(self, store):
        store.start_run("r-live", "run", "2026-01-01T00:00:00+00:00")

        assert store.recover_dead_runs() == []
        assert store.get_run("r-live")["outcome"] is None


@pytest.fixture
def endpoint(tmp_path):
    secret = tmp_path / "cf-secret"
    secret.write_text("s3cret-value\n")
    token = tmp_path / "am-token"
    token.write_text("am-token-value")
    requested: list[str] = []
    server = TriggerServer(
        WatchSettings(listen="127.0.0.1:0", webhook_secret_file=secret, alertmanager_token_file=token),
        request_evaluation=requested.append,
        metrics=lambda: b"cfheal_evaluations_total 3.0\n",
        status=lambda: {"evaluations": 3},
    )
    server.start()
    yield f"http://{server.address}", requested
    server.stop()


class TestTriggerEndpoint:
    def test_trigger_requests_evaluation(self, endpoint):
        base, requested = endpoint

        response = httpx.post(f"{base}/trigger", trust_env=False)

        assert response.status_code == 202
        assert requested == ["operator"]

    def test_cloudflare_webhook_with_secret_accepted(self, endpoint):
        base, requested = endpoint
        body = {"name": "edge errors", "alert_type": "http_alert_edge_error", "policy_name": "ws", "text": "5xx"}

        response = httpx.post(f"{base}/webhooks/cloudflare", json=body, headers={"cf-webhook-auth": "s3cret-value"}, trust_env=False)

        assert response.status_code == 202
        assert requested == ["cloudflare"]

    @pytest.mark.parametrize("header", [{}, {"cf-webhook-auth": "wrong"}, {"cf-webhook-auth": "s3cret-valu"}])
    def test_cloudflare_webhook_without_secret_rejected(self, endpoint, header):
        base, requested = endpoint

        response = httpx.post(f"{base}/webhooks/cloudflare", json={}, headers=header, trust_env=False)

        assert response.status_code == 401
        assert requested == []

    def test_alertmanager_webhook_needs_token(self, endpoint):
        base, requested = endpoint
        body = {"alerts": [{"status": "firing", "labels": {"alertname": "WebSocketUpgradeFailing"}}]}

        rejected = httpx.post(f"{base}/webhooks/alertmanager", json=body, trust_env=False)
        accepted = httpx.post(f"{base}/webhooks/alertmanager", json=body, headers={"Authorization": "Bearer am-token-value"}, trust_env=False)

        assert rejected.status_code == 401
        assert accepted.status_code == 202
        assert requested == ["alertmanager"]

    def test_invalid_json_rejected(self, endpoint):
        base, requested = endpoint

        response = httpx.post(f"{base}/webhooks/cloudflare", content=b"<html>", headers={"cf-webhook-auth": "s3cret-value"}, trust_env=False)

        assert response.status_code == 400
        assert requested == []

    def test_metrics_served(self, endpoint):
        base, _ = endpoint

        response = httpx.get(f"{base}/metrics", trust_env=False)

        assert response.status_code == 200
        assert "cfheal_evaluations_total" in response.text


class _Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).received.append((self.path, json.loads(self.rfile.read(length))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver():
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Receiver.received
    server.shutdown()
    server.server_close()


class TestNotifier:
    def test_slack_and_json_forms(self, receiver):
        base, received = receiver
        notifier = Notifier([NotifySettings(url=f"{base}/slack", format="slack"), NotifySettings(url=f"{base}/json", format="json")])

        notifier.send("breaker", "watch stopped acting", run_id="r1")

        assert received[0] == ("/slack", {"text": "cfheal breaker: watch stopped acting"})
        assert received[1][0] == "/json"
        assert received[1][1]["event"] == "breaker"
        assert received[1][1]["run_id"] == "r1"

    def test_unreachable_sink_does_not_raise(self):
        notifier = Notifier([NotifySettings(url="http://127.0.0.1:9/hook", timeout=1)])

        notifier.send("outcome", "recovered")
