"""cfheal watch on the lab: unattended healing and its safety envelope, with real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest
import yaml

from cfheal.state import Store
from conftest import HOSTS, cfheal, edge_status, lab, start_times

pytestmark = pytest.mark.lab


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Watch:
    """One ``cfheal watch`` process, with its JSON log lines collected from stderr."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cfheal", "--log-format", "json", "watch", "-c", str(config), "--listen", f"127.0.0.1:{free_port()}"],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
        )

    def events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return events

    def wait_for_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if self.process.poll() is not None:
                raise AssertionError(f"watch exited {self.process.returncode} before {name}:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {name} event within {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()


@pytest.fixture
def watch_config(lab_config):
    """Write a lab configuration for watch: fast interval and settle, short gates."""

    def write(watch: dict | None = None, **playbook_changes) -> Path:
        path = lab_config(**{"steps__0__readiness__stable_for": "1s", "confirm__timeout": "8s", **playbook_changes})
        config = yaml.safe_load(path.read_text())
        config["watch"] = {"interval": "1s", "settle_evaluations": 2, "settle_time": "1s", **(watch or {})}
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@pytest.fixture
def watches(tmp_path):
    started: list[Watch] = []

    def start(config: Path) -> Watch:
        watch = Watch(config, tmp_path / f"watch-{len(started)}.log")
        started.append(watch)
        return watch

    yield start
    for watch in started:
        watch.stop()


def runs_of(config: Path) -> list[dict]:
    return Store(Path(yaml.safe_load(config.read_text())["state_dir"])).list_runs(limit=100)


def wait_for_run(config: Path, outcomes: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in runs_of(config):
            if run.get("outcome") in outcomes:
                return run
        time.sleep(0.5)
    raise AssertionError(f"no run ended {sorted(outcomes)} within {timeout}s; runs: {[(r['run_id'], r.get('outcome')) for r in runs_of(config)]}")


def restarted(runs: list[dict]) -> list[str]:
    return [label for run in runs for batch in (run.get("rollout") or {}).get("batches", []) for label in batch.get("restarted", [])]


def test_watch_heals_saturated_edge_alone(healthy_lab, watch_config, watches):
    config = watch_config()
    watch = watches(config)
    watch.wait_for_event("watch_started", 20)
    before = start_times()

    lab("saturate")
    run = wait_for_run(config, {"recovered", "not_recovered", "aborted", "interrupted"}, 120)

    assert run["outcome"] == "recovered", run["reason"]
    assert run["command"] == "watch"
    assert all(start_times()[host] != before[host] for host in HOSTS)
    assert edge_status() == 101
    assert watch.stop() == 0


def test_limit_back_after_restart_escalates_not_loops(healthy_lab, watch_config, watches):
    config = watch_config()
    watch = watches(config)
    watch.wait_for_event("watch_started", 20)

    lab("saturate", "--beyond-limit")
    wait_for_run(config, {"escalated", "not_recovered"}, 150)
    watch.wait_for_event("breaker_opened", 60)
    after_first = start_times()
    time.sleep(6)

    runs = runs_of(config)
    assert sorted(restarted(runs)) == [f"{host}/ws-backend" for host in HOSTS]
    assert any(run.get("upgrade_request") for run in runs)
    assert start_times() == after_first
    assert Store(Path(yaml.safe_load(config.read_text())["state_dir"])).get_switch("breaker") is not None


def test_two_watches_act_once(healthy_lab, watch_config, watches):
    config = watch_config()
    first, second = watches(config), watches(config)
    first.wait_for_event("watch_started", 20)
    second.wait_for_event("watch_started", 20)

    lab("saturate")
    wait_for_run(config, {"recovered"}, 120)
    time.sleep(5)

    runs = runs_of(config)
    assert sorted(restarted(runs)) == [f"{host}/ws-backend" for host in HOSTS]
    assert edge_status() == 101


def test_sigterm_mid_rollout_leaves_containers_running(healthy_lab, watch_config, watches):
    config = watch_config(steps__0__readiness__stable_for="3s")
    watch = watches(config)
    watch.wait_for_event("watch_started", 20)

    lab("saturate")
    watch.wait_for_event("container_restarted", 90)
    code = watch.stop()

    assert code == 0
    run = wait_for_run(config, {"interrupted"}, 10)
    assert run["rollout"]["batches"][0]["outcome"] == "passed"
    assert run["rollout"]["batches"][-1]["outcome"] == "not_started"
    for host in HOSTS:
        client = docker.DockerClient(base_url=f"unix:///run/cfheal-lab/{host}/docker.sock")
        assert client.api.inspect_container("ws-backend")["State"]["Running"], host
        client.close()


def test_failed_rollout_opens_breaker_until_resume(healthy_lab, watch_config, watches):
    config = watch_config(steps__0__readiness__timeout="5s")
    lab("crash-on-start", "backend-2", "on")
    watch = watches(config)
    watch.wait_for_event("watch_started", 20)

    lab("saturate")
    wait_for_run(config, {"aborted"}, 120)
    watch.wait_for_event("breaker_opened", 30)
    # Fresh containers: backend-2's crash left ERROR lines that would rightly block a restart.
    lab("reset")
    lab("saturate")
    held = start_times()
    time.sleep(6)
    still_held = start_times()
    resumed = cfheal("resume", "-c", str(config))
    recovered = wait_for_run(config, {"recovered"}, 120)

    assert still_held == held
    assert len([run for run in runs_of(config) if run["outcome"] == "aborted"]) == 1
    assert resumed.returncode == 0
    assert "breaker closed" in resumed.stdout
    assert recovered["command"] == "watch"
    assert edge_status() == 101


def test_churn_and_brief_failure_trigger_nothing(healthy_lab, watch_config, watches):
    config = watch_config(watch={"settle_evaluations": 4, "settle_time": "8s"})
    watch = watches(config)
    watch.wait_for_event("watch_started", 20)
    before = start_times()

    # A brief saturation, shorter than the settle time, and backends killed (clients see 1006).
    lab("saturate")
    lab("release")
    client = docker.DockerClient(base_url="unix:///run/cfheal-lab/backend-3/docker.sock")
    client.api.kill("ws-backend")
    client.close()
    lab("container", "backend-3", "start")
    time.sleep(10)

    assert [run for run in runs_of(config) if run["command"] == "watch"] == []
    assert start_times()["backend-1"] == before["backend-1"]
    assert start_times()["backend-2"] == before["backend-2"]
    assert any(event.get("event") == "fault_settling" for event in watch.events())


def test_killed_run_reported_interrupted(healthy_lab, lab_config):
    config = lab_config(steps__0__readiness__stable_for="3s")
    lab("saturate")
    log_path = config.parent / "run.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "cfheal", "--log-format", "json", "run", "-c", str(config), "--yes"], stderr=log, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while "container_restarted" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    result = cfheal("history", "-c", str(config), "--output", "json")
    runs = json.loads(result.stdout)

    assert result.returncode == 0
    assert runs[0]["outcome"] == "interrupted"
    assert "process died" in runs[0]["reason"]
