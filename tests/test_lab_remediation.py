"""The main job end to end, on the lab's real sshd, dockerd, nginx and backends."""

from __future__ import annotations

import shutil

import pytest

from conftest import HOSTS, cfheal_json, edge_status, lab, start_times

pytestmark = pytest.mark.lab


def test_run_heals_saturated_edge(healthy_lab, lab_config):
    config = lab_config()
    lab("saturate")
    before = start_times()

    check_code, check = cfheal_json("check", "-c", str(config))
    run_code, run = cfheal_json("run", "-c", str(config), "--yes")

    assert check_code == 1
    assert check["diagnosis"]["kind"] == "edge_connection_limit"
    assert all(container["running"] for host in check["hosts"] for container in host["containers"])
    assert run_code == 0, run["reason"]
    assert run["outcome"] == "recovered"
    assert [batch["outcome"] for batch in run["rollout"]["batches"]] == ["passed"] * 3
    after = start_times()
    assert all(after[host] != before[host] for host in HOSTS)
    assert edge_status() == 101


def test_dry_run_changes_nothing(healthy_lab, lab_config):
    config = lab_config()
    lab("saturate")
    before = start_times()

    code, report = cfheal_json("run", "-c", str(config), "--dry-run")

    assert code == 0
    assert report["outcome"] == "planned"
    assert report["diagnosis"]["kind"] == "edge_connection_limit"
    assert [[t["host"] for t in batch] for batch in report["plan"]["batches"]] == [[host] for host in HOSTS]
    assert report["rollout"] is None
    assert start_times() == before
    assert edge_status() == 502


def test_origin_failure_restarts_nothing(healthy_lab, lab_config):
    config = lab_config()
    lab("origin", "backend-2", "fail")
    before = start_times()

    code, report = cfheal_json("run", "-c", str(config), "--yes")

    assert code == 1
    assert report["diagnosis"]["kind"] == "origin_failure"
    assert "backend-2/ws-backend (HTTP 503)" in report["diagnosis"]["reason"]
    assert report["outcome"] == "no_action"
    assert start_times() == before


def test_stopped_sshd_stops_run_before_any_restart(healthy_lab, lab_config):
    config = lab_config()
    lab("saturate")
    lab("sshd", "backend-3", "stop")
    before = start_times()

    code, report = cfheal_json("run", "-c", str(config), "--yes")

    assert code == 1
    assert report["outcome"] == "aborted"
    assert "backend-3" in report["reason"]
    assert "127.0.0.13:2222" in report["reason"]
    assert report["rollout"] is None
    assert start_times() == before


def test_container_that_does_not_come_back_aborts_rollout(healthy_lab, lab_config):
    config = lab_config(steps__0__readiness__timeout="8s")
    lab("saturate")
    lab("crash-on-start", "backend-2", "on")
    before = start_times()

    code, report = cfheal_json("run", "-c", str(config), "--yes")

    assert code == 1
    assert report["outcome"] == "aborted"
    assert [batch["outcome"] for batch in report["rollout"]["batches"]] == ["passed", "failed", "not_started"]
    assert "backend-2/ws-backend" in report["reason"]
    after = start_times()
    assert after["backend-1"] != before["backend-1"]
    assert after["backend-3"] == before["backend-3"]


def test_error_lines_in_logs_block_the_restart(healthy_lab, lab_config):
    config = lab_config()
    lab("saturate")
    lab("origin", "backend-1", "log-errors")
    before = start_times()

    code, report = cfheal_json("run", "-c", str(config), "--yes")

    assert code == 1
    assert report["outcome"] == "aborted"
    assert "backend-1/ws-backend" in report["reason"]
    assert report["hosts"][0]["containers"][0]["log_errors"] > 0
    assert start_times() == before


def test_changed_host_key_stops_run(healthy_lab, lab_config, tmp_path):
    config = lab_config()
    known_hosts = tmp_path / "known_hosts"
    shutil.copy("/var/lib/cfheal-lab/ssh/known_hosts", known_hosts)
    lines = known_hosts.read_text().splitlines()
    host_2 = next(line for line in lines if line.startswith("[127.0.0.12]"))
    host_1_key = next(line for line in lines if line.startswith("[127.0.0.11]")).split(" ", 1)[1]
    known_hosts.write_text("\n".join(f"[127.0.0.12]:2222 {host_1_key}" if line == host_2 else line for line in lines) + "\n")
    config.write_text(config.read_text().replace("/var/lib/cfheal-lab/ssh/known_hosts", str(known_hosts)))
    lab("saturate")
    before = start_times()

    code, report = cfheal_json("run", "-c", str(config), "--yes")

    assert code == 1
    assert report["outcome"] == "aborted"
    assert "127.0.0.12:2222 does not match" in report["reason"]
    assert start_times() == before
