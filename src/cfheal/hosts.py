"""SSH sessions to backend hosts: strict host keys, bounded connects and commands.

Every host key is checked against the configured known_hosts file and never added on the
fly. Only temporary faults (refused or timed-out connects, a dropped banner) are retried;
a rejected host key or login fails at once.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import structlog
from tenacity import RetryCallState, retry, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from .config import Config, HostSettings
from .errors import AuthenticationFailed, HostError, HostKeyRejected, HostUnreachable, RemoteCommandFailed

log = structlog.get_logger("cfheal.hosts")

_READ_CHUNK = 64 * 1024
_TAIL_CHARS = 2000


@dataclass(frozen=True)
class HostTarget:
    """Everything needed to open an SSH session to one host."""

    name: str
    address: str
    port: int
    user: str
    key_file: Path | None
    known_hosts: Path
    connect_timeout: float
    command_timeout: float
    connect_attempts: int

    @property
    def where(self) -> str:
        return f"{self.name} ({self.user}@{self.address}:{self.port})"

    @classmethod
    def from_config(cls, config: Config, host: HostSettings) -> "HostTarget":
        return cls(
            name=host.name,
            address=host.address,
            port=host.port,
            user=config.user_for(host),
            key_file=config.key_file_for(host),
            known_hosts=config.ssh.known_hosts,
            connect_timeout=config.ssh.connect_timeout,
            command_timeout=config.ssh.command_timeout,
            connect_attempts=config.ssh.connect_attempts,
        )


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str


class _RejectUnknownHostKey(paramiko.MissingHostKeyPolicy):
    """Refuse hosts absent from known_hosts, naming the host and the file to fix."""

    def __init__(self, target: HostTarget) -> None:
        self._target = target

    def missing_host_key(self, client, hostname, key) -> None:
        target = self._target
        raise HostKeyRejected(
            f"host key for {hostname} ({key.get_name()}) is not in {target.known_hosts}; "
            f"verify the host's fingerprint and add it, cfheal never adds keys on its own",
            host=target.name,
            address=target.address,
            port=target.port,
        )


class SSHSession:
    """One authenticated SSH connection to a host; use as a context manager."""

    def __init__(self, target: HostTarget) -> None:
        self.target = target
        self._client: paramiko.SSHClient | None = None

    def __enter__(self) -> "SSHSession":
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def client(self) -> paramiko.SSHClient:
        if self._client is None:
            raise RuntimeError("SSHSession.connect() must be called first")
        return self._client

    def connect(self) -> None:
        """Connect, retrying only temporary faults, up to the configured number of attempts."""
        target = self.target
        retrying = retry(
            retry=retry_if_exception(lambda error: isinstance(error, HostError) and error.temporary),
            stop=stop_after_attempt(target.connect_attempts),
            wait=wait_exponential_jitter(initial=0.5, max=5.0),
            before_sleep=lambda state: _log_connect_retry(target, state),
            reraise=True,
        )
        self._client = retrying(_open_client)(target)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        """Run ``command`` and return its exit status and output; fail if it outlives ``timeout``."""
        timeout = timeout or self.target.command_timeout
        deadline = time.monotonic() + timeout
        channel = self._open_channel(command, timeout)
        try:
            stdout = _read_stream(channel, channel.recv, deadline, self.target, command)
            stderr = _read_stream(channel, channel.recv_stderr, deadline, self.target, command)
            status = _wait_exit_status(channel, deadline, self.target, command)
        finally:
            channel.close()
        return CommandResult(status, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"))

    def check(self, command: str, *, timeout: float | None = None) -> CommandResult:
        """Run ``command`` and raise RemoteCommandFailed unless it exits 0."""
        result = self.run(command, timeout=timeout)
        if result.exit_status != 0:
            raise RemoteCommandFailed(
                f"{command!r} on {self.target.where} exited {result.exit_status}: "
                f"{result.stderr.strip()[-300:] or result.stdout.strip()[-300:]}",
                host=self.target.name,
                address=self.target.address,
                port=self.target.port,
                command=command,
                exit_status=result.exit_status,
                stdout_tail=result.stdout[-_TAIL_CHARS:],
                stderr_tail=result.stderr[-_TAIL_CHARS:],
            )
        return result

    def stream_lines(self, command: str, *, timeout: float | None = None, max_line_bytes: int = 16384) -> Iterator[bytes]:
        """Yield the combined output of ``command`` line by line, without holding it all.

        Lines longer than ``max_line_bytes`` are cut there, so one huge line cannot exhaust memory.
        Raises RemoteCommandFailed when the command exits non-zero or outlives ``timeout``.
        """
        timeout = timeout or self.target.command_timeout
        deadline = time.monotonic() + timeout
        channel = self._open_channel(command, timeout, combine_stderr=True)
        tail: deque[bytes] = deque(maxlen=5)
        try:
            for line in _split_lines(channel, deadline, self.target, command, max_line_bytes):
                tail.append(line)
                yield line
            status = _wait_exit_status(channel, deadline, self.target, command)
        finally:
            channel.close()
        if status != 0:
            output = b"\n".join(tail).decode("utf-8", "replace")
            raise RemoteCommandFailed(
                f"{command!r} on {self.target.where} exited {status}: {output[-300:]}",
                host=self.target.name,
                address=self.target.address,
                port=self.target.port,
                command=command,
                exit_status=status,
                stdout_tail=output[-_TAIL_CHARS:],
            )

    def _open_channel(self, command: str, timeout: float, *, combine_stderr: bool = False) -> paramiko.Channel:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise HostUnreachable(
                f"SSH connection to {self.target.where} was lost before running {command!r}",
                host=self.target.name,
                address=self.target.address,
                port=self.target.port,
            )
        try:
            channel = transport.open_session(timeout=timeout)
        except (paramiko.SSHException, OSError) as error:
            raise HostUnreachable(
                f"cannot open an SSH session on {self.target.where}: {error}; "
                "if this host limits sessions (sshd MaxSessions), lower cfheal's parallel work on it",
                host=self.target.name,
                address=self.target.address,
                port=self.target.port,
            ) from error
        channel.set_combine_stderr(combine_stderr)
        channel.settimeout(timeout)
        channel.exec_command(command)
        return channel


def _open_client(target: HostTarget) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(target.known_hosts))
    client.set_missing_host_key_policy(_RejectUnknownHostKey(target))
    use_key_file = target.key_file is not None
    try:
        client.connect(
            target.address,
            port=target.port,
            username=target.user,
            key_filename=str(target.key_file) if use_key_file else None,
            allow_agent=not use_key_file,
            look_for_keys=not use_key_file,
            timeout=target.connect_timeout,
            banner_timeout=target.connect_timeout,
            auth_timeout=target.connect_timeout,
            channel_timeout=target.connect_timeout,
        )
    except HostError:
        client.close()
        raise
    except Exception as error:
        client.close()
        raise _translate_connect_error(target, error) from error
    return client


def _translate_connect_error(target: HostTarget, error: Exception) -> HostError:
    where = dict(host=target.name, address=target.address, port=target.port)
    if isinstance(error, paramiko.BadHostKeyException):
        return HostKeyRejected(
            f"host key for {target.address}:{target.port} does not match {target.known_hosts} "
            f"(got {error.key.get_name()} {error.key.get_fingerprint().hex()}); the host was reinstalled "
            "or someone is intercepting the connection: verify before updating known_hosts",
            **where,
        )
    if isinstance(error, paramiko.AuthenticationException):
        return AuthenticationFailed(
            f"{target.where} refused the login as {target.user!r} with key {target.key_file}: {error}; "
            "check the user and that the key is in the host's authorized_keys",
            **where,
        )
    if isinstance(error, (socket.timeout, TimeoutError)):
        return HostUnreachable(
            f"connecting to {target.where} timed out after {target.connect_timeout:g}s", **where
        )
    if isinstance(error, paramiko.SSHException) and "banner" in str(error).lower():
        return HostUnreachable(
            f"{target.where} accepted TCP but sent no SSH banner within {target.connect_timeout:g}s "
            "(sshd overloaded, MaxStartups reached, or not an SSH server)",
            **where,
        )
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        return HostUnreachable(f"cannot connect to {target.where}: {reason}; is sshd running there?", **where)
    if isinstance(error, paramiko.SSHException):
        return HostUnreachable(f"SSH negotiation with {target.where} failed: {error}", **where)
    return HostUnreachable(f"connecting to {target.where} failed: {type(error).__name__}: {error}", **where)


def _log_connect_retry(target: HostTarget, state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning(
        "ssh_connect_retrying",
        host=target.name,
        address=target.address,
        port=target.port,
        attempt=state.attempt_number,
        of=target.connect_attempts,
        error=str(error),
    )


def _read_stream(channel: paramiko.Channel, receive, deadline: float, target: HostTarget, command: str) -> bytes:
    chunks = []
    while True:
        data = _receive_before(channel, receive, deadline, target, command)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _split_lines(channel: paramiko.Channel, deadline: float, target: HostTarget, command: str, max_line_bytes: int) -> Iterator[bytes]:
    # Lines are split on raw bytes and decoded by the caller only when whole, so a multi-byte
    # character cut across two reads is never decoded in halves.
    pending = b""
    while True:
        data = _receive_before(channel, channel.recv, deadline, target, command)
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        yield from (line[:max_line_bytes] for line in lines)
        if len(pending) > max_line_bytes:
            pending = pending[:max_line_bytes]
    if pending:
        yield pending


def _receive_before(channel: paramiko.Channel, receive, deadline: float, target: HostTarget, command: str) -> bytes:
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            raise socket.timeout()
        channel.settimeout(remaining)
        return receive(_READ_CHUNK)
    except socket.timeout:
        raise _command_timed_out(target, command) from None


def _command_timed_out(target: HostTarget, command: str) -> RemoteCommandFailed:
    return RemoteCommandFailed(
            f"{command!r} on {target.where} did not finish within its timeout",
            host=target.name,
            address=target.address,
            port=target.port,
            command=command,
            exit_status=None,
        )


def _wait_exit_status(channel: paramiko.Channel, deadline: float, target: HostTarget, command: str) -> int:
    while not channel.exit_status_ready():
        if time.monotonic() > deadline:
            raise _command_timed_out(target, command)
        time.sleep(0.01)
    return channel.recv_exit_status()
