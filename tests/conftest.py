"""Fixtures for tests that run against the lab: real sshd, dockerd, nginx and backends.

The lab is brought up once per session with ``scripts/lab up`` and reset to its healthy
baseline around every lab test, so each test starts from the same state.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import docker
import pytest
import yaml
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "scripts" / "lab"
LAB_CONFIG = REPO / "config" / "lab.yaml"
HOSTS = ("backend-1", "backend-2", "backend-3")
EDGE_URL = "ws://127.0.0.10:8080/ws/"
LAB_TEST_LOCK = Path("/run/cfheal-lab-tests.lock")

# The lab's modules (the Cloudflare stand-in and its schema validator) import by bare name.
sys.path.append(str(REPO / "lab"))


def lab(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(LAB), *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"scripts/lab {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def cfheal(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cfheal", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def cfheal_json(*args: str) -> tuple[int, dict]:
    result = cfheal(*args, "--output", "json")
    assert "Traceback" not in result.stderr, result.stderr
    try:
        return result.returncode, json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"cfheal {' '.join(args)} printed no JSON (exit {result.returncode}):\n{result.stdout}\n{result.stderr}") from None


def start_times() -> dict[str, str]:
    """Read each backend's StartedAt straight from its host's engine, not through cfheal."""
    times = {}
    for host in HOSTS:
        client = docker.DockerClient(base_url=f"unix:///run/cfheal-lab/{host}/docker.sock")
        try:
            times[host] = client.api.inspect_container("ws-backend")["State"]["StartedAt"]
        finally:
            client.close()
    return times


def edge_status(url: str = EDGE_URL) -> int:
    """Return the status of one handshake through the edge: 101, or the HTTP error status."""
    try:
        with connect(url, open_timeout=5, proxy=None):
            return 101
    except InvalidStatus as error:
        return error.response.status_code


@pytest.fixture(scope="session")
def lab_up():
    if os.geteuid() != 0:
        pytest.fail("lab tests need root: they start sshd, dockerd and nginx")
    # The lab is one shared set of processes: two test sessions saturating and resetting it at
    # once would break each other, so a session holds this lock from its first lab test on.
    LAB_TEST_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LAB_TEST_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lab("up")
        yield


@pytest.fixture
def healthy_lab(lab_up):
    lab("reset")
    yield
    lab("reset")


@pytest.fixture
def lab_config(tmp_path):
    """Write a copy of the lab configuration with playbook overrides; return its path."""

    def write(**playbook_changes) -> Path:
        config = yaml.safe_load(LAB_CONFIG.read_text())
        playbook = yaml.safe_load((REPO / "playbooks" / "restart-backends.yaml").read_text())
        for dotted, value in playbook_changes.items():
            _set_dotted(playbook, dotted.split("__"), value)
        (tmp_path / "playbook.yaml").write_text(yaml.safe_dump(playbook))
        config["playbook"] = str(tmp_path / "playbook.yaml")
        config["state_dir"] = str(tmp_path / "state")
        path = tmp_path / "cfheal.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


def _set_dotted(document, keys, value) -> None:
    for key in keys[:-1]:
        document = document[int(key)] if isinstance(document, list) else document[key]
    if isinstance(document, list):
        document[int(keys[-1])] = value
    else:
        document[keys[-1]] = value


@pytest.fixture
def lab_engine():
    """Return a factory for Docker API clients on a lab host's engine socket, closed afterwards."""
    clients = []

    def open_engine(host: str) -> docker.APIClient:
        client = docker.APIClient(base_url=f"unix:///run/cfheal-lab/{host}/docker.sock", version="1.41", timeout=30)
        clients.append(client)
        return client

    yield open_engine
    for client in clients:
        client.close()
