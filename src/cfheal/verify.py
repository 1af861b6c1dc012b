"""Verify backend hosts over SSH: container state, log errors, established connections.

Each host is verified on its own SSH session, all hosts in parallel; a host that fails is
reported with the reason instead of raising, so one run always shows every host. Hosts
listed more than once at one address and port share one SSH connection (see hosts.py).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import dataclass, field

import structlog

from .config import Config, ContainerSettings, HostSettings
from .errors import CfhealError, HostError, RemoteCommandFailed
from ._threads import map_in_threads
from .hosts import HostTarget, SSHSession

log = structlog.get_logger("cfheal.verify")

_MAX_SAMPLES = 3
_SAMPLE_CHARS = 200


@dataclass(frozen=True)
class ContainerReport:
    name: str
    state: str
    running: bool
    restart_count: int
    started_at: str
    health: str | None
    log_lines_scanned: int = 0
    log_errors: int = 0
    log_error_samples: list[str] = field(default_factory=list)
    established_connections: int | None = None


@dataclass(frozen=True)
class HostReport:
    host: str
    address: str
    port: int
    containers: list[ContainerReport] = field(default_factory=list)
    error: str | None = None
    # Kind of failure when ``error`` is set: unreachable, ssh_limit_reached, host_key_rejected,
    # authentication_failed, command_failed, host_error, or error for any other cfheal error.
    fault: str | None = None
    duration_ms: int = 0

    @property
    def verified(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class LogScanSettings:
    window: float
    patterns: list[re.Pattern[str]]
    max_line_bytes: int


def verify_hosts(config: Config, scan: LogScanSettings) -> list[HostReport]:
    """Verify every configured host in parallel; one report per host, in configuration order."""
    return map_in_threads(
        lambda host: verify_host(HostTarget.from_config(config, host), host, scan),
        config.hosts,
        max_workers=16,
        name="verify",
    )


def verify_host(target: HostTarget, host: HostSettings, scan: LogScanSettings) -> HostReport:
    started = time.monotonic()
    try:
        with SSHSession(target) as session:
            containers = [_verify_container(session, container, scan) for container in host.containers]
    except CfhealError as error:
        duration_ms = _elapsed_ms(started)
        fault = error.fault if isinstance(error, HostError) else "error"
        log.error("host_verification_failed", host=host.name, address=target.address, port=target.port, fault=fault, error=str(error), duration_ms=duration_ms)
        return HostReport(host.name, target.address, target.port, error=str(error), fault=fault, duration_ms=duration_ms)

    duration_ms = _elapsed_ms(started)
    for container in containers:
        log.info(
            "container_verified",
            host=host.name,
            container=container.name,
            state=container.state,
            restart_count=container.restart_count,
            log_errors=container.log_errors,
            established_connections=container.established_connections,
        )
    log.info("host_verified", host=host.name, duration_ms=duration_ms)
    return HostReport(host.name, target.address, target.port, containers, duration_ms=duration_ms)


def _verify_container(session: SSHSession, container: ContainerSettings, scan: LogScanSettings) -> ContainerReport:
    state = inspect_container_state(session, container.name)
    errors, samples, scanned = _scan_logs(session, container.name, scan)
    connections = _count_established(session, container)
    return ContainerReport(
        name=container.name,
        state=state["Status"],
        # A container in restart back-off reports Running; it is not serving.
        running=bool(state.get("Running")) and not state.get("Restarting"),
        restart_count=int(state.get("RestartCount", 0)),
        started_at=state.get("StartedAt", ""),
        health=(state.get("Health") or {}).get("Status"),
        log_lines_scanned=scanned,
        log_errors=errors,
        log_error_samples=samples,
        established_connections=connections,
    )


def inspect_container_state(session: SSHSession, name: str) -> dict:
    """Return the container's State from ``docker inspect``, plus its RestartCount."""
    command = f"docker inspect --type container -- {shlex.quote(name)}"
    result = session.run(command)
    if result.exit_status != 0:
        raise HostError(_describe_inspect_failure(session, name, result.exit_status, result.stderr), host=session.target.name, address=session.target.address, port=session.target.port)

    try:
        document = json.loads(result.stdout)[0]
    except (ValueError, IndexError, KeyError) as error:
        raise HostError(f"cannot parse 'docker inspect {name}' output on {session.target.where}: {error}", host=session.target.name, address=session.target.address, port=session.target.port) from error
    return {**document["State"], "RestartCount": document.get("RestartCount", 0)}


def _describe_inspect_failure(session: SSHSession, name: str, status: int, stderr: str) -> str:
    where = session.target.where
    if "no such" in stderr.lower():
        return f"container {name!r} not found on {where}; check hosts[].containers[].name in the configuration"
    if status == 127:
        return f"the docker command is not installed or not on PATH for {session.target.user} on {where}"
    return f"'docker inspect {name}' on {where} exited {status}: {stderr.strip()[-300:]}"


def _scan_logs(session: SSHSession, name: str, scan: LogScanSettings) -> tuple[int, list[str], int]:
    """Count log lines in the window matching any error pattern, keeping a few samples."""
    command = f"docker logs --since {int(scan.window)}s -- {shlex.quote(name)} 2>&1"
    errors, scanned, samples = 0, 0, []
    for raw in session.stream_lines(command, max_line_bytes=scan.max_line_bytes):
        scanned += 1
        readings = _readings(raw)
        if any(pattern.search(text) for pattern in scan.patterns for text in readings):
            errors += 1
            if len(samples) < _MAX_SAMPLES:
                samples.append(readings[0][:_SAMPLE_CHARS])
    return errors, samples, scanned


def _readings(raw: bytes) -> tuple[str, ...]:
    """Return the texts a log line is matched as: its UTF-8 text, or two readings if not UTF-8."""
    try:
        return (raw.decode("utf-8"),)
    except UnicodeDecodeError:
        # Invalid bytes become U+FFFD, which no word pattern matches, so "\xff\xfeERROR" still
        # matches \bERROR\b. A legacy 8-bit line is also read as Latin-1, so a pattern with
        # accented letters can match it. Samples use the first reading, valid in any JSON.
        return (raw.decode("utf-8", "replace"), raw.decode("latin-1"))


def _count_established(session: SSHSession, container: ContainerSettings) -> int | None:
    selector = f"src {container.listen}" if container.listen else f"sport = :{container.origin_port}"
    # Streamed and counted, never held: a saturated backend can have 100,000 connections.
    command = f"ss -Htn state established {shlex.quote(selector)}"
    try:
        return sum(1 for line in session.stream_lines(command, combine_stderr=False) if line.strip())
    except RemoteCommandFailed as error:
        if error.exit_status is None:
            raise
        # A host without ss still gets verified; the count is evidence, not a gate.
        log.warning("connection_count_unavailable", host=session.target.name, container=container.name, error=(error.stderr_tail or str(error)).strip()[-200:])
        return None


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
