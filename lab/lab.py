"""Command line of the cfheal lab: three SSH hosts with their own Docker engines behind an edge.

A local stand-in for the Cloudflare API v4 serves the zone whose plan cfheal can upgrade.

Run through scripts/lab, as root. Every command is idempotent. Errors print one line and
exit non-zero.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import edge
import engine
import sshd
import standin
from layout import (
    CFHEAL_STATE_DIR,
    BEYOND_LIMIT_LIVE_CLIENTS,
    CLOUDFLARE_BASE_URL,
    CLOUDFLARE_TOKEN_FILE,
    CONTAINER_NAME,
    EDGE_CONNECTION_LIMIT,
    EDGE_URL,
    HOSTS,
    HOSTS_BY_NAME,
    LAB_ROOT,
    LIVE_CLIENTS,
    LOCK_FILE,
    RUN_DIR,
    VENV_PYTHON,
    Host,
)
from probe import ProbeResult, probe, probe_many
from procs import LabError, find_processes, stop_processes, wait_until
from status import SWARM_FILES, collect_status, render_status
from swarm import read_swarm_status, start_swarm, stop_swarm, swarm_pid

ORIGIN_START_TIMEOUT_S = 15
EDGE_RESPONSE_TIMEOUT_S = 15
SATURATE_TIMEOUT_S = 20
LOCK_TIMEOUT_S = 120


def say(message: str) -> None:
    print(message, flush=True)


# Bringing parts up.

def wait_for_origin(host: Host) -> None:
    """Wait until the host's backend responds to a handshake.

    Raises LabError if its container exits first or no response arrives in time.
    """
    api = engine.Engine(host)

    def responded() -> bool:
        if probe(host.origin_url, timeout_s=1).status is not None:
            return True
        details = api.inspect_container()
        if details is not None and not details["State"]["Running"]:
            raise container_exit_error(host, details["State"]["ExitCode"])
        return False

    if not wait_until(responded, ORIGIN_START_TIMEOUT_S, 0.3):
        raise LabError(
            f"{CONTAINER_NAME} on {host.name} did not respond on {host.origin_url} within "
            f"{ORIGIN_START_TIMEOUT_S} s; see: "
            f"DOCKER_HOST={host.docker_host} docker logs {CONTAINER_NAME}"
        )


def container_exit_error(host: Host, exit_code: int) -> LabError:
    if host.crash_flag.exists():
        hint = f"crash-on-start is on: run scripts/lab crash-on-start {host.name} off"
    else:
        hint = f"see: DOCKER_HOST={host.docker_host} docker logs {CONTAINER_NAME}"
    return LabError(f"{CONTAINER_NAME} on {host.name} exited with code {exit_code}; {hint}")


def wait_for_edge(require_upgrade: bool) -> float:
    """Wait until the edge responds to a handshake and return the seconds waited.

    With require_upgrade, only HTTP 101 counts as a response.
    """
    started = time.monotonic()
    last: ProbeResult | None = None

    def acceptable() -> bool:
        nonlocal last
        last = probe(EDGE_URL)
        return last.upgraded if require_upgrade else last.status is not None

    if not wait_until(acceptable, EDGE_RESPONSE_TIMEOUT_S, 0.3):
        expected = "HTTP 101" if require_upgrade else "an HTTP response"
        raise LabError(
            f"edge {EDGE_URL} did not return {expected} within {EDGE_RESPONSE_TIMEOUT_S} s "
            f"(last: {last.describe() if last else 'none'}); see {edge.NGINX_ERROR_LOG}"
        )
    return time.monotonic() - started


def ensure_lab(report: Callable[[str], None]) -> int:
    """Start or repair every part that is down and return the number of repairs made.

    The three dockerds start first and in parallel because they take longest.
    """
    repairs = 0

    def note(message: str) -> None:
        nonlocal repairs
        repairs += 1
        report(message)

    for host in HOSTS:
        host.control_dir.mkdir(parents=True, exist_ok=True)
    for host in HOSTS:
        if engine.start_dockerd(host):
            note(f"{host.name}: starting dockerd")

    for action in sshd.ensure_keys():
        note(action)
    for host in HOSTS:
        if sshd.start_sshd(host):
            note(f"{host.name}: started sshd on {host.address}:{sshd.SSH_PORT}")
    if edge.start_nginx():
        note(f"edge: started nginx on {EDGE_URL}")
    if standin.start_standin():
        note(f"cloudflare: started the API stand-in on {CLOUDFLARE_BASE_URL}")
    if standin.ensure_token_file():
        note(f"cloudflare: wrote the API token to {CLOUDFLARE_TOKEN_FILE}")

    rootfs_tar = None
    for host in HOSTS:
        engine.wait_for_dockerd(host)
        if not engine.Engine(host).has_image() and rootfs_tar is None:
            rootfs_tar = engine.build_rootfs_tar()
        for action in engine.ensure_container(host, rootfs_tar):
            note(f"{host.name}: {action}")
    for host in HOSTS:
        wait_for_origin(host)
    wait_for_edge(require_upgrade=False)
    return repairs


def check_healthy(status: dict) -> None:
    """Raise LabError naming every part of the lab that is still down."""
    problems = []
    for host in status["hosts"]:
        if not host["dockerd"]["up"]:
            problems.append(f"{host['name']} dockerd down")
        if not host["sshd"]["up"]:
            problems.append(f"{host['name']} sshd down")
        container = host["container"]
        if container is not None and container["state"] != "running":
            problems.append(f"{host['name']} {CONTAINER_NAME} {container['state']}")
    if not status["edge"]["up"]:
        problems.append("edge nginx down")
    if not status["cloudflare"]["up"]:
        problems.append("cloudflare stand-in down")
    if problems:
        raise LabError(f"lab is not healthy: {', '.join(problems)}")


def command_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    repairs = ensure_lab(say)
    status = collect_status()
    say(render_status(status))
    check_healthy(status)
    elapsed = time.monotonic() - started
    if repairs:
        say(f"lab is up ({repairs} parts started or repaired in {elapsed:.1f} s)")
    else:
        say(f"lab was already up, nothing to repair (checked in {elapsed:.1f} s)")
    return 0


# Taking parts down.

def leftover_markers() -> list[str]:
    """Return command-line fragments that only lab processes contain."""
    markers = [
        str(edge.NGINX_CONFIG),
        str(SWARM_FILES.status_file),
        f"{VENV_PYTHON} /app/backend.py",
        standin.STANDIN_MARKER,
    ]
    for host in HOSTS:
        markers += [str(host.docker_exec_root), str(host.sshd_config)]
    return markers


def command_down(args: argparse.Namespace) -> int:
    stopped = []
    if stop_swarm(SWARM_FILES):
        stopped.append("swarm")
    if edge.stop_nginx():
        stopped.append("nginx")
    if standin.stop_standin():
        stopped.append("cloudflare stand-in")

    def stop_container(host: Host) -> bool:
        api = engine.Engine(host)
        if engine.dockerd_pid(host) is None or not api.is_responding():
            return False
        if api.inspect_container() is None:
            return False
        return api.stop_container()

    with ThreadPoolExecutor(len(HOSTS)) as pool:
        for host, was_running in zip(HOSTS, pool.map(stop_container, HOSTS)):
            if was_running:
                stopped.append(f"{host.name} {CONTAINER_NAME}")
    for host in HOSTS:
        if sshd.stop_sshd(host):
            stopped.append(f"{host.name} sshd")
    with ThreadPoolExecutor(len(HOSTS)) as pool:
        for host, was_running in zip(HOSTS, pool.map(engine.stop_dockerd, HOSTS)):
            if was_running:
                stopped.append(f"{host.name} dockerd")

    leftovers = find_processes(leftover_markers())
    if leftovers:
        stop_processes(leftovers, 5)
        stopped.append(f"leftover processes {', '.join(map(str, leftovers))}")

    if stopped:
        say(f"lab is down; stopped: {', '.join(stopped)}")
    else:
        say("lab was already down")
    return 0


# Load: the client swarm.

def require_edge_running() -> None:
    if edge.nginx_pid() is None:
        raise LabError(
            f"edge nginx is not running, so {EDGE_URL} cannot be reached: run scripts/lab up"
        )


def command_saturate(args: argparse.Namespace) -> int:
    require_edge_running()
    if args.beyond_limit:
        live, stale = BEYOND_LIMIT_LIVE_CLIENTS, 0
    else:
        live, stale = LIVE_CLIENTS, EDGE_CONNECTION_LIMIT - LIVE_CLIENTS

    old_pid = swarm_pid(SWARM_FILES)
    if old_pid is not None:
        stop_swarm(SWARM_FILES)
        say(f"stopped the running swarm (pid {old_pid})")
    # The edge must have free connection slots, or the new swarm cannot open its clients.
    wait_for_edge(require_upgrade=True)

    started = time.monotonic()
    pid = start_swarm(SWARM_FILES, EDGE_URL, live, stale, args.max_seconds)
    say(f"started swarm (pid {pid}): {live} live and {stale} stale clients to {EDGE_URL}")

    deadline = started + SATURATE_TIMEOUT_S
    last_probe = None
    while time.monotonic() < deadline:
        if swarm_pid(SWARM_FILES) is None:
            raise LabError(f"swarm (pid {pid}) exited; see {SWARM_FILES.log_file}")
        counts = read_swarm_status(SWARM_FILES)
        if counts and counts["live"]["open"] + counts["stale"]["open"] >= EDGE_CONNECTION_LIMIT:
            last_probe = probe(EDGE_URL)
            if last_probe.status == 502:
                break
        time.sleep(0.5)
    else:
        counts = read_swarm_status(SWARM_FILES) or {}
        raise LabError(
            f"edge did not saturate within {SATURATE_TIMEOUT_S} s (last probe: "
            f"{last_probe.describe() if last_probe else 'none, swarm not full'}; swarm counts: "
            f"{json.dumps({k: counts.get(k) for k in ('live', 'stale')})}); the swarm keeps "
            f"running, see {SWARM_FILES.log_file} and run scripts/lab release"
        )

    origins = probe_many([host.origin_url for host in HOSTS])
    say(f"edge saturated after {time.monotonic() - started:.1f} s: {EDGE_URL} -> HTTP 502")
    origin_results = [f"{host.name} {result.describe()}" for host, result in zip(HOSTS, origins)]
    say("origins: " + ", ".join(origin_results))
    say(f"swarm: live open {counts['live']['open']}/{live}, "
        f"stale open {counts['stale']['open']}/{stale}")
    return 0


def command_release(args: argparse.Namespace) -> int:
    pid = swarm_pid(SWARM_FILES)
    stop_swarm(SWARM_FILES)
    require_edge_running()
    waited = wait_for_edge(require_upgrade=True)
    if pid is None:
        say(f"no swarm was running; {EDGE_URL} -> HTTP 101")
    else:
        say(f"stopped swarm (pid {pid}); {EDGE_URL} -> HTTP 101 after {waited:.1f} s")
    return 0


# Status and control verbs.

def command_status(args: argparse.Namespace) -> int:
    status = collect_status()
    if args.json:
        say(json.dumps(status, indent=2))
    else:
        say(render_status(status))
    return 0


def command_origin(args: argparse.Namespace) -> int:
    host = HOSTS_BY_NAME[args.host]
    host.control_dir.mkdir(parents=True, exist_ok=True)
    try:
        previous = host.mode_file.read_text().strip()
    except FileNotFoundError:
        previous = "ok"
    host.mode_file.write_text(args.mode + "\n")
    say(f"{host.name}: origin mode {args.mode} (was {previous})")
    return 0


def command_crash_on_start(args: argparse.Namespace) -> int:
    host = HOSTS_BY_NAME[args.host]
    host.control_dir.mkdir(parents=True, exist_ok=True)
    if args.state == "on":
        host.crash_flag.touch()
    else:
        host.crash_flag.unlink(missing_ok=True)
    say(f"{host.name}: crash-on-start {args.state} ({host.crash_flag})")
    return 0


def command_sshd(args: argparse.Namespace) -> int:
    host = HOSTS_BY_NAME[args.host]
    if args.action == "stop":
        changed = sshd.stop_sshd(host)
        say(f"{host.name}: sshd {'stopped' if changed else 'was not running'}")
    else:
        sshd.ensure_keys()
        changed = sshd.start_sshd(host)
        say(f"{host.name}: sshd {'started' if changed else 'already running'} on "
            f"{host.address}:{sshd.SSH_PORT}")
    return 0


def command_container(args: argparse.Namespace) -> int:
    host = HOSTS_BY_NAME[args.host]
    api = engine.Engine(host)
    if engine.dockerd_pid(host) is None or not api.is_responding():
        raise LabError(f"dockerd for {host.name} is not running: run scripts/lab up")
    if api.inspect_container() is None:
        raise LabError(f"{CONTAINER_NAME} does not exist on {host.name}: run scripts/lab up")
    if args.action == "stop":
        changed = api.stop_container()
        say(f"{host.name}: {CONTAINER_NAME} {'stopped' if changed else 'was not running'}")
    else:
        changed = api.start_container()
        wait_for_origin(host)
        say(f"{host.name}: {CONTAINER_NAME} {'started' if changed else 'already running'}, "
            f"{host.origin_url} responds")
    return 0


def command_reset(args: argparse.Namespace) -> int:
    started = time.monotonic()
    actions = []
    pid = swarm_pid(SWARM_FILES)
    if stop_swarm(SWARM_FILES):
        actions.append(f"stopped swarm (pid {pid})")
    for host in HOSTS:
        host.control_dir.mkdir(parents=True, exist_ok=True)
        if host.mode_file.exists() and host.mode_file.read_text().strip() != "ok":
            actions.append(f"{host.name}: origin mode ok")
        host.mode_file.write_text("ok\n")
        if host.crash_flag.exists():
            host.crash_flag.unlink()
            actions.append(f"{host.name}: crash-on-start off")
        # A fresh container starts with empty logs, so error lines written by an earlier test
        # cannot reach the next one's log scan.
        api = engine.Engine(host)
        if engine.dockerd_pid(host) is not None and api.is_responding():
            api.remove_container()
            actions.append(f"{host.name}: recreated {CONTAINER_NAME}")
    # Before ensure_lab, because a stopped stand-in cannot start with an invalid scenario file.
    actions.append(standin.reset_standin())
    # A reset lab has no past incident: cfheal's history, breaker and requests for it go too.
    if CFHEAL_STATE_DIR.exists():
        shutil.rmtree(CFHEAL_STATE_DIR)
        actions.append(f"cleared cfheal state in {CFHEAL_STATE_DIR}")
    ensure_lab(actions.append)
    wait_for_edge(require_upgrade=True)
    summary = "; ".join(actions) if actions else "nothing to change"
    say(f"lab reset to baseline in {time.monotonic() - started:.1f} s: {summary}")
    return 0


# Command line.

class OneLineErrorParser(argparse.ArgumentParser):
    """ArgumentParser that reports a usage error in one line instead of the full usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (run scripts/lab --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="lab", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    host_names = list(HOSTS_BY_NAME)

    commands.add_parser("up", help="start or repair every part; a quick check when all runs")
    commands.add_parser(
        "down", help="stop swarm, edge, Cloudflare stand-in, containers, sshds and dockerds")
    status = commands.add_parser(
        "status",
        help="show every part, probe the edge and origins, and list the stand-in's plan writes")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    saturate = commands.add_parser(
        "saturate",
        help=f"start a client swarm that fills the edge's limit of {EDGE_CONNECTION_LIMIT}",
    )
    saturate.add_argument(
        "--beyond-limit", action="store_true",
        help=f"use {BEYOND_LIMIT_LIVE_CLIENTS} reconnecting clients and no stale ones, "
             "which a restart cannot fix")
    saturate.add_argument("--max-seconds", type=positive_int, default=3600,
                          help="the swarm stops by itself after this many seconds (default 3600)")
    commands.add_parser("release", help="stop the swarm and wait until the edge returns 101")
    commands.add_parser(
        "reset",
        help="return to the healthy baseline without down and up, with the stand-in's default "
             "scenario and an empty request record")

    origin = commands.add_parser(
        "origin", help="set a backend's mode: ok, fail (503) or log-errors")
    origin.add_argument("host", choices=host_names)
    origin.add_argument("mode", choices=["ok", "fail", "log-errors"])
    crash = commands.add_parser("crash-on-start", help="make a backend exit 1 when it starts")
    crash.add_argument("host", choices=host_names)
    crash.add_argument("state", choices=["on", "off"])
    sshd_parser = commands.add_parser("sshd", help="stop or start a host's sshd")
    sshd_parser.add_argument("host", choices=host_names)
    sshd_parser.add_argument("action", choices=["start", "stop"])
    container = commands.add_parser("container", help=f"start or stop a host's {CONTAINER_NAME}")
    container.add_argument("host", choices=host_names)
    container.add_argument("action", choices=["start", "stop"])
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": command_up,
    "down": command_down,
    "status": command_status,
    "saturate": command_saturate,
    "release": command_release,
    "reset": command_reset,
    "origin": command_origin,
    "crash-on-start": command_crash_on_start,
    "sshd": command_sshd,
    "container": command_container,
}


def acquire_lock() -> int:
    """Take the lab lock so that two commands never change the lab at the same time."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)

    def locked() -> bool:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    if not locked():
        say("waiting for another scripts/lab command to finish")
        if not wait_until(locked, LOCK_TIMEOUT_S, 0.5):
            raise LabError(
                f"timed out after {LOCK_TIMEOUT_S} s waiting for another scripts/lab command "
                f"to release {LOCK_FILE}"
            )
    return descriptor


def main() -> int:
    args = build_parser().parse_args()
    if os.geteuid() != 0:
        print("lab: must run as root (it starts dockerd, sshd and nginx)", file=sys.stderr)
        return 1
    try:
        if args.command != "status":
            LAB_ROOT.mkdir(parents=True, exist_ok=True)
            acquire_lock()
        return COMMANDS[args.command](args)
    except LabError as error:
        print(f"lab {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the contract is one line, never a traceback
        if os.environ.get("LAB_DEBUG"):
            raise
        print(f"lab {args.command}: unexpected {type(error).__name__}: {error} "
              "(set LAB_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
