"""Collect and print the state of every lab part.

The parts are the engines, sshds, containers, edge, swarm and Cloudflare API stand-in.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import edge
import engine
import sshd
import standin
from layout import (
    CLOUDFLARE_BASE_URL,
    CLOUDFLARE_LOG,
    CLOUDFLARE_STATE_DIR,
    CLOUDFLARE_TOKEN_FILE,
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

# The requests that change a zone's plan: POST or PUT on /zones/{zone_id}/subscription. The
# stand-in routes a path with a trailing slash the same way.
PLAN_WRITE_METHODS = ("POST", "PUT")
PLAN_WRITE_PATH = re.compile(
    re.escape(urlsplit(CLOUDFLARE_BASE_URL).path) + r"/zones/[^/]+/subscription/?"
)
# The text status lists this many of the latest plan writes. status --json lists all of them.
PLAN_WRITES_SHOWN = 20
WRITE_BODY_SHOWN_CHARS = 200


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


def summarize_requests(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Count the stand-in's recorded requests and keep the full records of the plan writes."""
    writes = [
        record for record in records
        if record.get("method") in PLAN_WRITE_METHODS
        and PLAN_WRITE_PATH.fullmatch(record.get("path", ""))
    ]
    get_count = sum(1 for record in records if record.get("method") == "GET")
    return {
        "total": len(records),
        "get_count": get_count,
        "write_count": len(writes),
        "other_count": len(records) - get_count - len(writes),
        "writes": writes,
    }


def cloudflare_state() -> dict[str, Any]:
    """Return the stand-in's state, read through its administration interface while it responds.

    Otherwise the scenario and request record come from the files in its state directory,
    which show what it served last.
    """
    pid = standin.standin_pid()
    state: dict[str, Any] = {
        "up": False,
        "pid": pid,
        "base_url": CLOUDFLARE_BASE_URL,
        "state_dir": str(CLOUDFLARE_STATE_DIR),
        "token_file": str(CLOUDFLARE_TOKEN_FILE),
        "log": str(CLOUDFLARE_LOG),
        "source": "state files",
        "zones": None,
        "faults": None,
        "requests": None,
        "errors": [],
    }
    errors = state["errors"]
    scenario = records = None
    if pid is not None:
        try:
            status, scenario = standin.call_admin(
                "GET", "scenario", standin.RESPONSE_CHECK_TIMEOUT_S
            )
            state["up"] = True
            state["source"] = "stand-in"
            if status != 200:
                detail = standin.error_detail(scenario)
                errors.append(f"GET scenario returned HTTP {status}: {detail}")
                scenario = None
            status, records = standin.call_admin("GET", "requests")
            if status != 200:
                detail = standin.error_detail(records)
                errors.append(f"GET requests returned HTTP {status}: {detail}")
                records = None
        except LabError as error:
            errors.append(str(error))
    if not state["up"]:
        try:
            scenario = standin.read_scenario_file()
        except LabError as error:
            errors.append(str(error))
        try:
            records = standin.read_requests_file()
        except LabError as error:
            errors.append(str(error))

    if isinstance(scenario, dict):
        state["zones"] = standin.zone_plans(scenario)
        state["faults"] = scenario.get("faults", [])
    if isinstance(records, list):
        state["requests"] = summarize_requests(records)
    return state


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
        "cloudflare": cloudflare_state(),
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
    lines += render_cloudflare(status["cloudflare"])
    return "\n".join(lines)


def describe_write(record: dict[str, Any]) -> str:
    if "body_text" in record:
        body = record["body_text"]
    else:
        body = json.dumps(record.get("body"))
    if len(body) > WRITE_BODY_SHOWN_CHARS:
        body = body[:WRITE_BODY_SHOWN_CHARS] + "..."
    fault = f" (fault {record['fault']})" if record.get("fault") else ""
    return (f"{record.get('time')} {record.get('method')} {record.get('path')} -> "
            f"{record.get('status')}{fault} {body}")


def render_cloudflare(cloudflare: dict[str, Any]) -> list[str]:
    if cloudflare["up"]:
        lines = [f"cloudflare   up  {cloudflare['base_url']} (pid {cloudflare['pid']})"]
    else:
        lines = [f"cloudflare   down  {cloudflare['base_url']}; last state from "
                 f"{cloudflare['state_dir']}, see {cloudflare['log']}"]
    for error in cloudflare["errors"]:
        lines.append(f"  error      {error}")

    zones = cloudflare["zones"]
    if zones is None:
        lines.append("  zones      unknown, no readable scenario")
    for zone in zones or []:
        lines.append(f"  zone       {zone['name']} on {zone['plan']} ({zone['legacy_id']})")
    if cloudflare["faults"] is not None:
        faults = [
            f"{fault.get('kind')} on {fault.get('method')} {fault.get('path')} "
            f"({fault.get('count')} left)"
            for fault in cloudflare["faults"]
        ]
        lines.append(f"  faults     {', '.join(faults) or 'none'}")

    requests = cloudflare["requests"]
    if requests is None:
        return lines
    lines.append(
        f"  requests   {requests['total']} recorded: GET {requests['get_count']}, "
        f"plan writes {requests['write_count']}, other {requests['other_count']}"
    )
    writes = requests["writes"]
    if len(writes) > PLAN_WRITES_SHOWN:
        lines.append(f"  writes     {len(writes) - PLAN_WRITES_SHOWN} earlier plan writes not "
                     f"shown, see scripts/lab status --json")
    for record in writes[-PLAN_WRITES_SHOWN:]:
        lines.append(f"  write      {describe_write(record)}")
    return lines
