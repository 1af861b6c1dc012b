"""Escalation to a Cloudflare plan upgrade, on the lab with its Cloudflare API stand-in.

When the live clients alone exceed the edge's limit, a restart cannot hold: cfheal restarts,
finds the edge still failing, and prepares a plan-upgrade request that a person approves.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from cloudflare_schema import CloudflareSchema
from conftest import cfheal, cfheal_json, lab

pytestmark = pytest.mark.lab

STANDIN_ADMIN = "http://127.0.0.20:8787/__standin"


def standin_writes() -> list[dict]:
    """Return the plan changes the stand-in received: POST or PUT to a zone's subscription."""
    with urllib.request.urlopen(f"{STANDIN_ADMIN}/requests", timeout=5) as response:
        document = json.load(response)
    entries = document if isinstance(document, list) else document.get("requests", [])
    return [entry for entry in entries if entry["method"] in ("POST", "PUT") and entry["path"].endswith("/subscription")]


def test_limit_beyond_plan_escalates_to_one_purchase(healthy_lab, lab_config):
    config = lab_config(confirm__timeout="6s")
    lab("saturate", "--beyond-limit")

    run_code, run = cfheal_json("run", "-c", str(config), "--yes")
    dry_code, dry = cfheal_json("run", "-c", str(config), "--dry-run")
    writes_before_approval = standin_writes()
    list_code, listed = cfheal_json("requests", "-c", str(config))
    request_id = run["upgrade_request"]["id"]
    approve_code, approved = cfheal_json("approve", request_id, "-c", str(config), "--yes")
    again = cfheal("approve", request_id, "-c", str(config), "--yes")
    writes = standin_writes()

    assert run_code == 1
    assert run["outcome"] == "not_recovered", run["reason"]
    assert [batch["outcome"] for batch in run["rollout"]["batches"]] == ["passed"] * 3
    assert run["upgrade_request"]["status"] == "pending"
    assert run["upgrade_request"]["target_plan"]["legacy_id"] == "pro"
    assert run["upgrade_request"]["evidence"]["restarted"] == [f"backend-{index}/ws-backend" for index in (1, 2, 3)]
    assert dry_code == 0
    assert dry["plan"]["kind"] == "plan_upgrade"
    assert dry["rollout"] is None
    assert dry["upgrade_request"]["id"] == run["upgrade_request"]["id"]
    assert dry["upgrade_request"]["api_call"]["method"] == "POST"
    assert writes_before_approval == []
    assert list_code == 0
    assert [request["id"] for request in listed] == [request_id]
    assert approve_code == 0
    assert approved["status"] == "submitted"
    assert again.returncode == 1
    assert "submitted" in again.stderr
    assert len(writes) == 1
    assert writes[0]["method"] == "POST"
    CloudflareSchema.load().validate_request("POST", writes[0]["path"], body=json.dumps(writes[0]["body"]).encode(), headers={"Content-Type": "application/json", "Authorization": "Bearer x"})


def test_dry_run_never_writes(healthy_lab, lab_config):
    config = lab_config()
    lab("saturate", "--beyond-limit")

    code, report = cfheal_json("run", "-c", str(config), "--dry-run")

    assert code == 0
    assert report["outcome"] == "planned"
    assert report["plan"]["kind"] == "rollout"
    assert report["rollout"] is None
    assert standin_writes() == []


def test_dry_run_escalation_drafts_without_storing(healthy_lab, lab_config):
    config = lab_config(confirm__timeout="4s", steps__1__submit="auto")
    lab("saturate", "--beyond-limit")
    cfheal_json("run", "-c", str(config), "--yes")
    state = json.loads(cfheal("requests", "-c", str(config), "--output", "json").stdout)
    writes_after_run = standin_writes()
    lab("saturate", "--beyond-limit")

    code, report = cfheal_json("run", "-c", str(config), "--dry-run")

    assert [request["status"] for request in state] == ["submitted"]
    assert len(writes_after_run) == 1
    assert code == 0
    assert report["plan"]["kind"] == "plan_upgrade"
    assert report["upgrade_request"]["status"] == "draft"
    assert report["upgrade_request"]["target_plan"]["legacy_id"] == "business"
    assert standin_writes() == writes_after_run
    assert len(json.loads(cfheal("requests", "-c", str(config), "--output", "json").stdout)) == 1
