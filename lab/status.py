"""Collect and print the state of every lab part: engines, sshds, containers, edge and swarm."""

from __future__ import annotations

from typing import Any

import edge
import engine
import sshd
from layout import (
    CONTAINER_NAME,
    EDGE_URL,
    HOSTS,
    SSH_PORT,
    SWARM_LOG,
    SWARM_PID_FILE,
    SWARM_STATUS_FILE,
    Host,
)
from probe import probe_many
from procs import LabError
from swarm import SwarmFiles, read_swarm_status, swarm_pid

SWARM_FILES = SwarmFiles(SWARM_PID_FILE, SWARM_STATUS_FILE, SWARM_LOG)


def control_state(host: Host) -> dict[str, Any]:
    try:
        mode = host.mode_file.read_text().strip() or "ok"
    except FileNotFoundError:
        mode = "ok"
    return {"mode": mode, "crash_on_start": host.crash_flag.exists()}


def container_state(host: Host, dockerd_up: bool) -> dict[str, Any] | None:
    if not dockerd_up:
        return None
    try:
        details = engine.Engine(host).inspect_container()
    except LabError as error:
        return {"state": "unknown", "error": str(error)}
    if details is None:
        return {"state": "missing"}
    state = details["State"]
    return {
        "state": state["Status"],
        "started_at": state["StartedAt"],
        "finished_at": state["FinishedAt"],
        "exit_code": state["ExitCode"],
        "restart_count": details["RestartCount"],
        "id": details["Id"][:12],
    }


def host_state(host: Host) -> dict[str, Any]:
    dockerd_pid = engine.dockerd_pid(host)
    dockerd_up = dockerd_pid is not None and engine.Engine(host).is_responding()
    sshd_pid = sshd.sshd_pid(host)
    return {
        "name": host.name,
        "address": host.address,
        "dockerd": {"up": dockerd_up, "pid": dockerd_pid, "docker_host": host.docker_host},
        "sshd": {
            "up": sshd_pid is not None and sshd.is_responding(host),
            "pid": sshd_pid,
            "port": SSH_PORT,
        },
        "container": container_state(host, dockerd_up),
        "control": control_state(host),
    }


def swarm_state() -> dict[str, Any]:
    pid = swarm_pid(SWARM_FILES)
    counts = read_swarm_status(SWARM_FILES) if pid is not None else None
    return {"running": pid is not None, "pid": pid, "counts": counts, "log": str(SWARM_LOG)}


def collect_status() -> dict[str, Any]:
    """Return the lab's state, including one handshake through the edge and one per origin."""
    hosts = [host_state(host) for host in HOSTS]
    probes = probe_many([EDGE_URL] + [host.origin_url for host in HOSTS])
    for state, result in zip(hosts, probes[1:]):
        state["origin_probe"] = result.as_dict()
    return {
        "hosts": hosts,
        "edge": {"up": edge.nginx_pid() is not None, "pid": edge.nginx_pid(),
                 "probe": probes[0].as_dict()},
        "swarm": swarm_state(),
    }


def describe_probe(probe: dict[str, Any]) -> str:
    return f"HTTP {probe['status']}" if probe["status"] is not None else probe["error"]


def describe_container(container: dict[str, Any] | None) -> str:
    if container is None:
        return "unknown (dockerd down)"
    if container["state"] in ("missing", "unknown"):
        return container["state"]
    text = f"{container['state']}, started {container['started_at'][:19]}Z"
    if container["state"] == "exited":
        text = f"exited with code {container['exit_code']} at {container['finished_at'][:19]}Z"
    return f"{text}, restart count {container['restart_count']}"


def render_status(status: dict[str, Any]) -> str:
    lines = []
    for host in status["hosts"]:
        up = {True: "up", False: "down"}
        control = host["control"]
        lines.append(f"{host['name']} ({host['address']})")
        lines.append(f"  dockerd    {up[host['dockerd']['up']]}  {host['dockerd']['docker_host']}")
        lines.append(f"  sshd       {up[host['sshd']['up']]}  port {host['sshd']['port']}")
        lines.append(f"  {CONTAINER_NAME} {describe_container(host['container'])}")
        lines.append(
            f"  control    mode {control['mode']}, "
            f"crash-on-start {'on' if control['crash_on_start'] else 'off'}"
        )
        origin_probe = host["origin_probe"]
        lines.append(f"  origin     {origin_probe['url']} -> {describe_probe(origin_probe)}")

    edge_state = status["edge"]
    lines.append(f"edge nginx   {'up' if edge_state['up'] else 'down'}  "
                 f"{edge_state['probe']['url']} -> {describe_probe(edge_state['probe'])}")

    swarm = status["swarm"]
    if not swarm["running"]:
        lines.append("swarm        not running")
    else:
        counts = swarm["counts"]
        if counts is None:
            lines.append(f"swarm        running (pid {swarm['pid']}), no counts yet")
        else:
            failures = ", ".join(f"{k} {v}" for k, v in counts["handshake_failures"].items())
            lines.append(
                f"swarm        running (pid {swarm['pid']}): "
                f"live open {counts['live']['open']}/{counts['live']['target']}, "
                f"stale open {counts['stale']['open']}/{counts['stale']['target']} "
                f"(dropped {counts['stale']['exited_after_drop']}), "
                f"reconnects {counts['reconnects']}, failed handshakes: {failures or 'none'}"
            )
    return "\n".join(lines)
