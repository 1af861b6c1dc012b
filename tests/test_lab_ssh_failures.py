"""SSH failure kinds met in the field, each against real sshd, dockerd and sockets on loopback.

Most tests drive an extra sshd that this file starts on 127.0.0.31 with tight limits
(MaxStartups 2:100:2, MaxSessions 3) and backend-1's Docker engine behind it. The lab's
own hosts are used unchanged, and every container started here is removed afterwards.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import paramiko
import pytest
import yaml
from structlog.testing import capture_logs

from cfheal.config import Config, load_config
from cfheal.containers import Engine
from cfheal.errors import CfhealError, HostError, HostKeyRejected, HostUnreachable, RemoteCommandFailed
from cfheal.hosts import HostTarget, SSHSession
from cfheal.verify import LogScanSettings, verify_host, verify_hosts
from conftest import LAB_CONFIG, REPO, cfheal, lab, start_times

pytestmark = pytest.mark.lab

LAB_SSH = Path("/var/lib/cfheal-lab/ssh")
CLIENT_KEY = LAB_SSH / "id_ed25519"
AUTHORIZED_KEYS = LAB_SSH / "authorized_keys"
BACKEND_1_ENGINE = "unix:///run/cfheal-lab/backend-1/docker.sock"
BACKEND_1_HOST_KEY = Path("/var/lib/cfheal-lab/backend-1/ssh/ssh_host_ed25519_key.pub")
LAB_IMAGE = "cfheal-lab/base:1"
SSHD = "/usr/sbin/sshd"

LIMITED_ADDRESS = "127.0.0.31"
LIMITED_PORT = 2299
SILENT_ADDRESS = "127.0.0.32"
STALLING_ADDRESS = "127.0.0.33"

ERROR_PATTERNS = [r"\bERROR\b", r"\bFATAL\b", r"Traceback \(most recent call last\)"]


# --- helpers -------------------------------------------------------------------------------


def write_config(directory: Path, hosts: list[dict], **ssh) -> Path:
    """Write a cfheal configuration with the lab's edge and SSH defaults; return its path."""
    document = yaml.safe_load(LAB_CONFIG.read_text())
    document.pop("cloudflare", None)
    document["playbook"] = str(REPO / "playbooks" / "restart-backends.yaml")
    document["state_dir"] = str(directory / "state")
    document["ssh"].update(ssh)
    document["hosts"] = hosts
    path = directory / "cfheal.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def host_entry(name: str, address: str, port: int, containers: list[str]) -> dict:
    return {
        "name": name,
        "address": address,
        "port": port,
        "containers": [{"name": container, "origin": "ws://127.0.0.11:8099/ws/"} for container in containers],
    }


def target_for(config: Config, index: int = 0) -> HostTarget:
    return HostTarget.from_config(config, config.hosts[index])


def scan_settings(window: float = 600, patterns: list[str] | None = None, max_line_bytes: int = 16384) -> LogScanSettings:
    import re

    return LogScanSettings(window, [re.compile(pattern) for pattern in patterns or ERROR_PATTERNS], max_line_bytes)


def events_named(events: list[dict], name: str) -> list[dict]:
    return [event for event in events if event["event"] == name]


def descendants(pid: int) -> list[int]:
    """Return the ids of every process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def established_connections(address: str, port: int) -> int:
    """Count established TCP connections from this machine to ``address:port``."""
    octets = address.split(".")
    remote = "".join(f"{int(octet):02X}" for octet in reversed(octets)) + f":{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == remote and fields[3] == "01":
            count += 1
    return count


class ConnectionSampler:
    """Record the maximum number of TCP connections to one address and port open at once."""

    def __init__(self, address: str, port: int) -> None:
        self.address, self.port = address, port
        self.max_connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "ConnectionSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.max_connections = max(self.max_connections, established_connections(self.address, self.port))
            self._stop.wait(0.005)


def call_with_watchdog(function: Callable[[], object], limit: float) -> tuple[object, float]:
    """Call ``function`` on a thread; return its result or exception and the seconds it took.

    Fails the test when the call is still running after ``limit`` seconds.
    """
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(function())
        except BaseException as error:  # noqa: BLE001 - the test inspects whatever was raised
            outcome.append(error)

    started = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(limit)
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), f"call still running after {limit:g}s: it has no timeout"
    return outcome[0], elapsed


# --- the extra sshd with tight limits ------------------------------------------------------


class LimitedSSHD:
    """An OpenSSH server on 127.0.0.31 with MaxStartups 2:100:2 and MaxSessions 3."""

    def __init__(self, directory: Path) -> None:
        self.address, self.port = LIMITED_ADDRESS, LIMITED_PORT
        self.directory = directory
        self.host_key = directory / "ssh_host_ed25519_key"
        self.config = directory / "sshd_config"
        self.log = directory / "sshd.log"
        self.known_hosts = directory / "known_hosts"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cfheal-test-limited", "-f", str(self.host_key)], check=True, stdin=subprocess.DEVNULL)
        self.config.write_text("\n".join([
            f"ListenAddress {self.address}",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {AUTHORIZED_KEYS}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PrintMotd no",
            # VERBOSE logs one "Connection from" line per TCP connection, which the tests count.
            "LogLevel VERBOSE",
            "MaxStartups 2:100:2",
            "MaxSessions 3",
            f"SetEnv DOCKER_HOST={BACKEND_1_ENGINE}",
            "",
        ]))
        public_key = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[{self.address}]:{self.port} {public_key[0]} {public_key[1]}\n")
        self.process = subprocess.Popen([SSHD, "-D", "-f", str(self.config), "-E", str(self.log)], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._responds():
            assert self.process.poll() is None, f"sshd exited {self.process.returncode}: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"sshd on {self.address}:{self.port} sent no banner within 10s"
            time.sleep(0.05)

    def _responds(self) -> bool:
        try:
            with socket.create_connection((self.address, self.port), timeout=1) as connection:
                return connection.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        for pid in [*descendants(self.process.pid), self.process.pid]:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def connections(self) -> int:
        """Count TCP connections sshd accepted since start, from its VERBOSE log."""
        return self.log_text().count("Connection from ")

    def wait_for_connections(self, count: int, timeout: float = 3) -> int:
        deadline = time.monotonic() + timeout
        while self.connections() < count and time.monotonic() < deadline:
            time.sleep(0.05)
        # A late extra connection would show up within this pause.
        time.sleep(0.3)
        return self.connections()


@pytest.fixture
def limited_sshd(lab_up, tmp_path) -> Iterator[LimitedSSHD]:
    server = LimitedSSHD(tmp_path / "limited-sshd")
    server.directory.mkdir()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def limited_config(tmp_path: Path, server: LimitedSSHD, *, hosts: int = 1, containers: list[str] | None = None, **ssh) -> Config:
    entries = [host_entry(f"limited-{index}", server.address, server.port, containers or ["ws-backend"]) for index in range(1, hosts + 1)]
    ssh.setdefault("known_hosts", str(server.known_hosts))
    return load_config(write_config(tmp_path, entries, **ssh))


# --- containers on backend-1's engine ------------------------------------------------------


@pytest.fixture
def backend_1_containers(lab_up) -> Iterator[Callable[..., docker.models.containers.Container]]:
    """Start extra containers on backend-1's engine; every one is removed after the test."""
    client = docker.DockerClient(base_url=BACKEND_1_ENGINE)
    started: list[str] = []

    def start(name: str, command: str, *, files: dict[str, bytes] | None = None, log_driver: str = "json-file"):
        _remove_container(client, name)
        container = client.containers.create(
            LAB_IMAGE,
            ["sh", "-c", command],
            name=name,
            network_mode="host",
            log_config=docker.types.LogConfig(type=log_driver),
        )
        started.append(name)
        if files:
            container.put_archive("/", _tar_of(files))
        container.start()
        return container

    yield start
    for name in started:
        _remove_container(client, name)
    client.close()


def _remove_container(client: docker.DockerClient, name: str) -> None:
    try:
        client.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass


def _tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def wait_for_log_line(container, text: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in container.logs(tail=3):
            return
        time.sleep(0.2)
    raise AssertionError(f"container {container.name} did not log {text!r} within {timeout:g}s")


def backend_1_target(tmp_path: Path, containers: list[str], **ssh) -> tuple[HostTarget, Config]:
    config = load_config(write_config(tmp_path, [host_entry("backend-1", "127.0.0.11", 2222, containers)], **ssh))
    return target_for(config), config


# --- 4. sshd's own limits ------------------------------------------------------------------


def test_repeated_host_stays_within_sshd_limits(limited_sshd, tmp_path):
    # Four entries for one sshd with three containers each: opened at once, they would need
    # four connections (MaxStartups allows two unauthenticated) and twelve channels (MaxSessions 3).
    config = limited_config(tmp_path, limited_sshd, hosts=4, containers=["ws-backend"] * 3, max_sessions=2)

    with capture_logs() as events, ConnectionSampler(limited_sshd.address, limited_sshd.port) as sampler:
        reports = verify_hosts(config, scan_settings())

    assert [report.error for report in reports] == [None] * 4
    assert [len(report.containers) for report in reports] == [3] * 4
    assert events_named(events, "ssh_connect_retrying") == []
    assert sampler.max_connections == 1
    sshd_log = limited_sshd.log_text()
    assert "past MaxStartups" not in sshd_log
    assert "session open failed" not in sshd_log.lower()


def test_engine_and_commands_share_channel_limit(limited_sshd, tmp_path):
    config = limited_config(tmp_path, limited_sshd, max_sessions=2)
    target = target_for(config)

    with SSHSession(target) as session:
        engine = Engine(session, timeout=10)
        jobs = [lambda: engine.state("ws-backend").running] * 6 + [lambda: session.run("sleep 0.3; echo ok").stdout.strip()] * 6
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(job) for job in jobs]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result())
                except CfhealError as error:
                    outcomes.append(f"failed: {error}")
        engine.close()
        after_engine_closed = session.run("echo still-open").stdout.strip()

    assert outcomes == [True] * 6 + ["ok"] * 6
    assert after_engine_closed == "still-open"
    assert "session open failed" not in limited_sshd.log_text().lower()


def test_session_limit_hit_names_max_sessions(limited_sshd, tmp_path):
    # cfheal allowed more channels than this sshd's MaxSessions 3: sshd refuses the excess.
    config = limited_config(tmp_path, limited_sshd, max_sessions=6)
    target = target_for(config)

    with SSHSession(target) as session, capture_logs() as events:
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(session.run, "sleep 1") for _ in range(6)]
            failures = []
            for future in futures:
                try:
                    future.result()
                except HostError as error:
                    failures.append(error)

    assert failures, "sshd accepted six sessions on one connection despite MaxSessions 3"
    for failure in failures:
        assert "MaxSessions" in str(failure)
        assert f"{LIMITED_ADDRESS}:{LIMITED_PORT}" in str(failure)
    limit_events = events_named(events, "sshd_limit_reached")
    assert limit_events
    assert {event["limit"] for event in limit_events} == {"MaxSessions"}
    assert {event["port"] for event in limit_events} == {LIMITED_PORT}


def test_startup_limit_hit_names_max_startups(limited_sshd, tmp_path):
    config = limited_config(tmp_path, limited_sshd, connect_attempts=1, connect_timeout="3s")
    # Two connections that never authenticate fill MaxStartups 2:100:2, so sshd drops the next.
    holders = [socket.create_connection((limited_sshd.address, limited_sshd.port), timeout=3) for _ in range(2)]
    try:
        for holder in holders:
            assert holder.recv(8).startswith(b"SSH-")
        with capture_logs() as events, pytest.raises(HostUnreachable) as raised:
            SSHSession(target_for(config)).connect()
    finally:
        for holder in holders:
            holder.close()

    message = str(raised.value)
    assert "MaxStartups" in message
    assert f"{LIMITED_ADDRESS}:{LIMITED_PORT}" in message
    limit_events = events_named(events, "sshd_limit_reached")
    assert [event["limit"] for event in limit_events] == ["MaxStartups"]
    assert "past MaxStartups" in limited_sshd.log_text()


# --- 5. host keys --------------------------------------------------------------------------


def _assert_rejected_at_once(server: LimitedSSHD, config: Config, known_hosts: Path) -> HostKeyRejected:
    content, modified = known_hosts.read_bytes(), known_hosts.stat().st_mtime_ns
    connections = server.connections()

    started = time.monotonic()
    with capture_logs() as events, pytest.raises(HostKeyRejected) as raised:
        SSHSession(target_for(config)).connect()
    elapsed = time.monotonic() - started

    assert elapsed < 3
    assert events_named(events, "ssh_connect_retrying") == []
    assert server.wait_for_connections(connections + 1) == connections + 1
    assert known_hosts.read_bytes() == content
    assert known_hosts.stat().st_mtime_ns == modified
    message = str(raised.value)
    assert "limited-1" in message
    assert f"{LIMITED_ADDRESS}:{LIMITED_PORT}" in message
    return raised.value


def test_empty_known_hosts_rejects_at_once(limited_sshd, tmp_path):
    known_hosts = tmp_path / "empty_known_hosts"
    known_hosts.write_text("")
    config = limited_config(tmp_path, limited_sshd, connect_attempts=3, known_hosts=str(known_hosts))

    error = _assert_rejected_at_once(limited_sshd, config, known_hosts)

    assert "not in" in str(error)
    assert str(known_hosts) in str(error)


def test_changed_host_key_rejects_at_once(limited_sshd, tmp_path):
    known_hosts = tmp_path / "changed_known_hosts"
    other_key = BACKEND_1_HOST_KEY.read_text().split()
    known_hosts.write_text(f"[{LIMITED_ADDRESS}]:{LIMITED_PORT} {other_key[0]} {other_key[1]}\n")
    config = limited_config(tmp_path, limited_sshd, connect_attempts=3, known_hosts=str(known_hosts))

    error = _assert_rejected_at_once(limited_sshd, config, known_hosts)

    assert "does not match" in str(error)


# --- 6. a host that never responds ---------------------------------------------------------


class SilentListener:
    """A TCP listener that accepts connections and never sends an SSH banner."""

    def __init__(self, address: str) -> None:
        self._server = socket.create_server((address, 0))
        self.address, self.port = self._server.getsockname()
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "SilentListener":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.close()
        for connection in self.accepted:
            connection.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            self.accepted.append(connection)


def connect_deadline(connect_timeout: float, attempts: int) -> float:
    """Return the longest a connect may take: every attempt, plus tenacity's backoff with jitter."""
    backoff = sum(min(0.5 * 2**retry + 1.0, 5.0 + 1.0) for retry in range(attempts - 1))
    return connect_timeout * attempts + backoff


def test_silent_host_gives_up_within_deadline(tmp_path):
    with SilentListener(SILENT_ADDRESS) as listener:
        config = load_config(write_config(tmp_path, [host_entry("silent", listener.address, listener.port, ["ws-backend"])], connect_timeout="1s", connect_attempts=2))
        started = time.monotonic()
        with capture_logs() as events, pytest.raises(HostUnreachable) as raised:
            SSHSession(target_for(config)).connect()
        elapsed = time.monotonic() - started
        accepted = len(listener.accepted)

    assert elapsed <= connect_deadline(1.0, 2) + 0.5, f"took {elapsed:.2f}s"
    assert accepted == 2
    assert len(events_named(events, "ssh_connect_retrying")) == 1
    message = str(raised.value)
    assert f"{SILENT_ADDRESS}:{listener.port}" in message
    assert "no SSH banner" in message


def test_run_with_silent_host_restarts_nothing(healthy_lab, lab_config, tmp_path):
    with SilentListener(SILENT_ADDRESS) as listener:
        config = lab_config()
        document = yaml.safe_load(config.read_text())
        document["ssh"].update(connect_timeout="1s", connect_attempts=2)
        # The silent host's origin is backend-1's, so the diagnosis stays edge_connection_limit
        # and only the failed verification can stop the restart.
        document["hosts"].append({
            "name": "silent",
            "address": listener.address,
            "port": listener.port,
            "containers": [{"name": "ws-backend", "origin": "ws://127.0.0.11:8081/ws/"}],
        })
        config.write_text(yaml.safe_dump(document))
        lab("saturate")
        before = start_times()

        result = cfheal("run", "-c", str(config), "--yes", "--output", "json", timeout=120)
        report = json.loads(result.stdout)

    assert result.returncode == 1
    assert report["diagnosis"]["kind"] == "edge_connection_limit"
    assert report["outcome"] == "aborted"
    assert "silent" in report["reason"]
    silent = next(host for host in report["hosts"] if host["host"] == "silent")
    assert f"{SILENT_ADDRESS}:{listener.port}" in silent["error"]
    assert silent["fault"] == "unreachable"
    assert report["timings_ms"]["verify"] <= (connect_deadline(1.0, 2) + 1.0) * 1000
    assert report["rollout"] is None
    assert start_times() == before


class _StallingServer(paramiko.ServerInterface):
    """Accepts any public key and opens sessions, then never replies to a command request."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel, command):
        self.release.wait()
        return False


@pytest.fixture
def stalling_ssh_server(tmp_path):
    """An SSH server (paramiko's) on 127.0.0.33 that stops responding once a session is open."""
    host_key_file = tmp_path / "stalling_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key_file)], check=True, stdin=subprocess.DEVNULL)
    host_key = paramiko.Ed25519Key.from_private_key_file(str(host_key_file))
    listener = socket.create_server((STALLING_ADDRESS, 0))
    address, port = listener.getsockname()
    known_hosts = tmp_path / "stalling_known_hosts"
    known_hosts.write_text(f"[{address}]:{port} {host_key.get_name()} {host_key.get_base64()}\n")
    release = threading.Event()
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(connection)
            transport.add_server_key(host_key)
            transport.start_server(server=_StallingServer(release))
            transports.append(transport)

    threading.Thread(target=serve, daemon=True).start()
    yield address, port, known_hosts
    release.set()
    listener.close()
    for transport in transports:
        transport.close()


def test_stalled_host_cannot_hang_engine_or_commands(stalling_ssh_server, tmp_path):
    address, port, known_hosts = stalling_ssh_server
    config = load_config(write_config(tmp_path, [host_entry("stalling", address, port, ["ws-backend"])], known_hosts=str(known_hosts), connect_timeout="2s", command_timeout="3s"))

    # Each on its own connection: a stalled request blocks every later one on the same connection.
    with SSHSession(target_for(config)) as session:
        command_outcome, command_seconds = call_with_watchdog(lambda: session.run("true"), limit=15)
    with SSHSession(target_for(config)) as session:
        engine = Engine(session, timeout=3)
        engine_outcome, engine_seconds = call_with_watchdog(lambda: engine.state("ws-backend"), limit=15)

    assert isinstance(command_outcome, HostError), repr(command_outcome)
    assert command_seconds < 5
    assert f"{address}:{port}" in str(command_outcome)
    assert isinstance(engine_outcome, CfhealError), repr(engine_outcome)
    assert engine_seconds < 5
    assert f"{address}:{port}" in str(engine_outcome)


# --- 7. large logs -------------------------------------------------------------------------

STDOUT_LINE = "stdout filler line for the log scan " + "x" * 80
STDERR_LINE = "stderr filler line for the log scan " + "x" * 80
# About 85,000 lines on each stream, each ending in a marker. The engine copies the two streams
# separately, so the pause lets both finish before "logs-written" ends the log.
LARGE_LOGS_COMMAND = (
    f"yes '{STDOUT_LINE}' | head -c 10000000; printf '\\nERROR stdout marker\\n'; "
    f"yes '{STDERR_LINE}' | head -c 10000000 >&2; printf '\\nERROR stderr marker\\n' >&2; "
    "sleep 1; echo logs-written; sleep 4; echo 'ERROR fresh line'; sleep 3600"
)


def test_large_logs_scan_in_bounded_memory(backend_1_containers, tmp_path):
    container = backend_1_containers("cfheal-test-large-logs", LARGE_LOGS_COMMAND)
    wait_for_log_line(container, b"logs-written", timeout=30)
    target, config = backend_1_target(tmp_path, [container.name])

    tracemalloc.start()
    started = time.monotonic()
    try:
        report = verify_host(target, config.hosts[0], scan_settings(window=600))
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert report.error is None
    scanned = report.containers[0]
    assert scanned.log_lines_scanned > 150_000
    assert scanned.log_errors >= 2
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    assert elapsed < 25, f"took {elapsed:.1f}s"
    print(f"large logs: {scanned.log_lines_scanned} lines in {elapsed:.2f}s, peak {peak / 2**20:.2f} MiB")


def test_log_scan_reads_only_window(backend_1_containers, tmp_path):
    container = backend_1_containers("cfheal-test-large-logs", LARGE_LOGS_COMMAND)
    wait_for_log_line(container, b"logs-written", timeout=30)
    wait_for_log_line(container, b"ERROR fresh line", timeout=10)
    target, config = backend_1_target(tmp_path, [container.name])

    started = time.monotonic()
    report = verify_host(target, config.hosts[0], scan_settings(window=3))
    elapsed = time.monotonic() - started

    assert report.error is None
    assert report.containers[0].log_lines_scanned == 1
    assert report.containers[0].log_errors == 1
    assert elapsed < 5, f"took {elapsed:.1f}s"


def test_command_with_large_output_fails_fast(backend_1_containers, tmp_path):
    # docker logs without 2>&1 sends 10 MB on each stream: reading one stream to its end while
    # the other fills the channel window would deadlock until the command timeout.
    container = backend_1_containers("cfheal-test-large-logs", LARGE_LOGS_COMMAND)
    wait_for_log_line(container, b"logs-written", timeout=30)
    target, _ = backend_1_target(tmp_path, [container.name], command_timeout="20s")

    with SSHSession(target) as session:
        tracemalloc.start()
        started = time.monotonic()
        try:
            with pytest.raises(RemoteCommandFailed) as raised:
                session.run(f"docker logs {container.name}")
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    assert "more than" in str(raised.value)
    assert "127.0.0.11:2222" in str(raised.value)
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert peak < 12 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


# --- 8. bytes that are not UTF-8 -----------------------------------------------------------

READ_CHUNK = 64 * 1024


def non_utf8_payload() -> bytes:
    """Log lines with invalid UTF-8, Latin-1 text, and a UTF-8 character across byte 65536."""
    lines = [
        b"\xff\xfe ERROR invalid bytes at the start of this line\n",
        b"Fehler: Gr\xf6\xdfe \xfcberschritten\n",
        b"caf\xc3\xa9 ERROR valid UTF-8 for comparison\n",
    ]
    payload = b"".join(lines)
    filler = b"filler line without errors\n"
    while len(payload) + len(filler) < READ_CHUNK - 64:
        payload += filler
    # Pad so the first byte of e-acute (0xC3 0xA9) is the last byte of the first 64 KiB read.
    straddle_prefix = b"straddling caf"
    padding = READ_CHUNK - 1 - len(payload) - len(straddle_prefix) - 1
    payload += b"p" * padding + b"\n" + straddle_prefix
    assert len(payload) == READ_CHUNK - 1
    return payload + b"\xc3\xa9 ERROR across the read boundary\n"


NON_UTF8_PATTERNS = [r"\bERROR\b", "Größe überschritten"]


def test_non_utf8_log_lines_still_match(backend_1_containers, tmp_path):
    container = backend_1_containers(
        "cfheal-test-non-utf8",
        "cat /payload.log; echo payload-written; sleep 3600",
        files={"payload.log": non_utf8_payload()},
        # The local driver keeps the bytes as written; json-file would store U+FFFD for them.
        log_driver="local",
    )
    wait_for_log_line(container, b"payload-written", timeout=20)
    target, config = backend_1_target(tmp_path, [container.name])

    report = verify_host(target, config.hosts[0], scan_settings(patterns=NON_UTF8_PATTERNS, max_line_bytes=4096))

    assert report.error is None
    scanned = report.containers[0]
    assert scanned.log_errors == 4, scanned.log_error_samples
    samples = scanned.log_error_samples
    assert "ERROR invalid bytes" in samples[0]
    assert samples[1].startswith("Fehler: Gr")
    assert "berschritten" in samples[1]
    assert samples[2].startswith("café ERROR")
    json.dumps(samples, ensure_ascii=False).encode("utf-8")


def test_multibyte_character_split_across_reads(lab_up, tmp_path):
    target, _ = backend_1_target(tmp_path, ["ws-backend"])
    # The pause makes sshd send the first 65535 bytes, ending in 0xC3, before the rest.
    command = (
        f"head -c {READ_CHUNK - 2} /dev/zero | tr '\\0' a; printf '\\n\\303'; sleep 0.5; "
        "printf '\\251 ERROR after the boundary\\n'"
    )

    with SSHSession(target) as session:
        lines = list(session.stream_lines(command, max_line_bytes=READ_CHUNK * 2))

    assert len(lines) == 2
    assert lines[1].decode("utf-8") == "é ERROR after the boundary"


def test_json_logs_stay_valid_with_non_utf8(backend_1_containers, lab_config, tmp_path):
    container = backend_1_containers(
        "cfheal-test-non-utf8",
        "cat /payload.log; echo payload-written; sleep 3600",
        files={"payload.log": non_utf8_payload()},
        log_driver="local",
    )
    wait_for_log_line(container, b"payload-written", timeout=20)
    config = lab_config(verify__logs__error_patterns=NON_UTF8_PATTERNS)
    document = yaml.safe_load(config.read_text())
    document["hosts"][0]["containers"].append({"name": container.name, "origin": "ws://127.0.0.11:8081/ws/"})
    config.write_text(yaml.safe_dump(document))

    # Text output keeps stderr for log events alone: with --output json, progress lines go there too.
    result = cfheal("check", "-c", str(config), timeout=120)

    lines = result.stderr.splitlines()
    assert lines
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"stderr line is not JSON: {line!r}") from None
    verified = [event for event in events if event["event"] == "container_verified" and event.get("container") == container.name]
    assert [event["log_errors"] for event in verified] == [4]
