"""Rollout failures from the field, on the lab's real sshd and Docker engines.

Each test starts its own container next to a host's ws-backend, so the failure it needs
(a stop that outlasts the HTTP read timeout, a crash loop) never touches the lab baseline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import docker
import pytest

from cfheal.config import load_config
from cfheal.containers import Engine
from cfheal.hosts import HostTarget, SSHSession
from cfheal.policy import ReadinessGate, RestartTarget, RollingRestart
from cfheal.probes import probe_handshake
from cfheal.rollout import execute_rollout
from conftest import LAB_CONFIG, start_times
from engine import runtime_mounts
from layout import IMAGE, VENV_PYTHON

pytestmark = pytest.mark.lab

HOST_ADDRESSES = {"backend-1": "127.0.0.11", "backend-2": "127.0.0.12", "backend-3": "127.0.0.13"}

# A WebSocket server that ignores SIGTERM, so a stop always waits for SIGKILL.
IGNORES_SIGTERM = """
import asyncio, signal, sys
from websockets.asyncio.server import serve
signal.signal(signal.SIGTERM, signal.SIG_IGN)
async def main():
    async with serve(lambda ws: ws.wait_closed(), sys.argv[1], int(sys.argv[2])):
        await asyncio.Future()
asyncio.run(main())
"""

# A WebSocket server that accepts handshakes for two seconds, then exits 1.
EXITS_AFTER_TWO_SECONDS = """
import asyncio, sys
from websockets.asyncio.server import serve
async def main():
    async with serve(lambda ws: ws.wait_closed(), sys.argv[1], int(sys.argv[2])):
        await asyncio.sleep(2)
    sys.exit(1)
asyncio.run(main())
"""


@pytest.fixture
def extra_container(healthy_lab, lab_engine):
    """Start a Python WebSocket server container on a lab host; return its origin URL."""
    created: list[tuple[docker.APIClient, str]] = []

    def start(host: str, name: str, script: str, port: int, *, restart_policy: str = "no") -> str:
        api = lab_engine(host)
        try:
            api.remove_container(name, force=True)
        except docker.errors.NotFound:
            pass
        address = HOST_ADDRESSES[host]
        host_config = api.create_host_config(network_mode="host", binds=runtime_mounts(), restart_policy={"Name": restart_policy})
        api.create_container(IMAGE, [str(VENV_PYTHON), "-c", script, address, str(port)], name=name, host_config=host_config)
        created.append((api, name))
        api.start(name)
        origin = f"ws://{address}:{port}/"
        deadline = time.monotonic() + 15
        while not probe_handshake(f"{host}/{name}", origin, timeout=1.0).ok:
            assert time.monotonic() < deadline, f"{name} on {host} did not answer 101 on {origin} within 15 s"
            time.sleep(0.2)
        return origin

    yield start
    for api, name in created:
        api.remove_container(name, force=True)


@pytest.fixture
def engines():
    """Open cfheal's Engine for lab hosts over real SSH sessions; return a factory ``(host, timeout)``."""
    config = load_config(LAB_CONFIG)
    with ExitStack() as stack:

        def open_engine(host: str, timeout: float) -> Engine:
            settings = next(entry for entry in config.hosts if entry.name == host)
            session = stack.enter_context(SSHSession(HostTarget.from_config(config, settings)))
            engine = Engine(session, timeout=timeout)
            stack.callback(engine.close)
            return engine

        yield open_engine


def shim_pid(api: docker.APIClient, name: str) -> int:
    """Return the PID of the containerd shim that runs the container's main process."""
    pid = api.inspect_container(name)["State"]["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])


def restart_events(api: docker.APIClient, name: str, since: float, until: float) -> list[dict]:
    events = api.events(since=int(since), until=int(until) + 1, filters={"type": "container", "container": name, "event": "restart"}, decode=True)
    return list(events)


# 9. A restart slower than the HTTP timeout.


def test_restart_slower_than_read_timeout_sent_once(extra_container, lab_engine, engines):
    name = "cfheal-test-slow-stop"
    origin = extra_container("backend-1", name, IGNORES_SIGTERM, 18091)
    api = lab_engine("backend-1")
    before = api.inspect_container(name)["State"]["StartedAt"]
    # docker-py waits client timeout + grace period for a restart, so a backend that ignores
    # SIGTERM alone never exceeds it. A stopped containerd shim delays the engine's stop signal,
    # like a hung runtime, until the timer continues it 5 s into the restart.
    engine = engines("backend-1", timeout=1.5)
    read_timeout = 1.5 + 1
    step = RollingRestart(action="rolling_restart", stop_grace_period=1, pause_between_batches=0, readiness=ReadinessGate(timeout=20, stable_for=1, poll_interval=0.3))
    shim = shim_pid(api, name)
    since = time.time()
    os.kill(shim, signal.SIGSTOP)
    resume = threading.Timer(5.0, os.kill, args=(shim, signal.SIGCONT))
    resume.start()
    try:
        result = execute_rollout([[RestartTarget("backend-1", name, origin)]], step, {"backend-1": engine}, origin_timeout=2.0)
    finally:
        resume.cancel()
        # The old shim exits once the container has restarted.
        with contextlib.suppress(ProcessLookupError):
            os.kill(shim, signal.SIGCONT)
    # The engine finishes a restart after its client gives up, so events are counted only
    # once the container has started again and a second request would have shown up.
    deadline = time.monotonic() + 15
    while api.inspect_container(name)["State"]["StartedAt"] == before and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    until = time.time()

    state = api.inspect_container(name)["State"]
    events = restart_events(api, name, since, until)
    assert len(events) == 1
    assert events[0]["timeNano"] / 1e9 - since > read_timeout
    assert state["StartedAt"] != before
    assert state["Running"]
    assert result.outcome == "completed", result.reason
    assert result.restarted == [f"backend-1/{name}"]


# 10. A crash loop that looks alive.


@pytest.mark.parametrize("origin_must_answer", [True, False], ids=["origin_gate", "state_only_gate"])
def test_crash_loop_fails_gate_and_aborts(extra_container, lab_engine, engines, origin_must_answer):
    name = "cfheal-test-crash-loop"
    origin = extra_container("backend-2", name, EXITS_AFTER_TWO_SECONDS, 18092, restart_policy="always")
    before = start_times()
    gate = ReadinessGate(timeout=22, stable_for=3, poll_interval=0.5, origin_must_answer=origin_must_answer)
    step = RollingRestart(action="rolling_restart", stop_grace_period=1, pause_between_batches=0.5, readiness=gate)
    batches = [
        [RestartTarget("backend-1", "ws-backend", "ws://127.0.0.11:8081/ws/")],
        [RestartTarget("backend-2", name, origin)],
        [RestartTarget("backend-3", "ws-backend", "ws://127.0.0.13:8081/ws/")],
    ]
    engine_map = {host: engines(host, timeout=10) for host in ("backend-1", "backend-2", "backend-3")}

    result = execute_rollout(batches, step, engine_map, origin_timeout=2.0)

    crash_loop = lab_engine("backend-2").inspect_container(name)
    after = start_times()
    assert result.outcome == "aborted"
    assert [batch.outcome for batch in result.batches] == ["passed", "failed", "not_started"]
    assert f"backend-2/{name}" in result.batches[1].reason
    assert "crash loop" in result.batches[1].reason
    assert crash_loop["RestartCount"] > 0
    assert after["backend-1"] != before["backend-1"]
    assert after["backend-3"] == before["backend-3"]
