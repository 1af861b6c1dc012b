"""SSH sessions to backend hosts: strict host keys, bounded connects, channels and commands.

Every host key is checked against the configured known_hosts file and never added on the
fly. Only temporary faults (refused or timed-out connects, a dropped banner) are retried;
a rejected host key or login fails at once.

Sessions to the same address, port and login share one SSH connection, opened by one
session at a time, and at most ``ssh.max_sessions`` channels are open on it at once. That
keeps cfheal within the host sshd's MaxStartups (connections still authenticating) and
MaxSessions (channels per connection), however often the configuration lists the host.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import structlog
from tenacity import RetryCallState, retry, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from .config import Config, HostSettings
from .errors import AuthenticationFailed, HostError, HostKeyRejected, HostUnreachable, RemoteCommandFailed, SSHLimitReached

log = structlog.get_logger("cfheal.hosts")

_READ_CHUNK = 64 * 1024
_TAIL_CHARS = 2000
# run() is for commands with small output (docker inspect); larger output is an error, not
# something to hold in memory. Logs and connection lists go through stream_lines().
_MAX_OUTPUT_BYTES = 4 * 1024 * 1024
# Only the end of stderr is kept: callers use it for error messages.
_STDERR_KEPT_BYTES = 64 * 1024
# How long one read waits for stdout before draining stderr, so neither stream can fill the
# channel window while cfheal waits on the other.
_POLL_SECONDS = 0.05
# sshd drops a connection past MaxStartups right after accepting it, before its banner.
_CLOSED_EARLY = (EOFError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


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
    max_sessions: int = 4

    @property
    def where(self) -> str:
        return f"{self.name} ({self.user}@{self.address}:{self.port})"

    @property
    def endpoint(self) -> tuple:
        """The key under which sessions share one SSH connection."""
        return (self.address, self.port, self.user, self.key_file, self.known_hosts)

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
            max_sessions=config.ssh.max_sessions,
        )

    def where_fields(self) -> dict:
        return dict(host=self.name, address=self.address, port=self.port)


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str


class _RejectUnknownHostKey(paramiko.MissingHostKeyPolicy):
    """Reject hosts absent from known_hosts, naming the host, its port and the file to fix."""

    def __init__(self, target: HostTarget) -> None:
        self._target = target

    def missing_host_key(self, client, hostname, key) -> None:
        target = self._target
        raise HostKeyRejected(
            f"{target.name}: host key for {target.address}:{target.port} ({key.get_name()} {_fingerprint(key)}) "
            f"is not in {target.known_hosts}; check that fingerprint on the host (ssh-keygen -lf on its host key) "
            f"and add the key as {hostname}, because cfheal never adds host keys on its own",
            **target.where_fields(),
        )


@dataclass(eq=False)
class _Connection:
    """One authenticated SSH connection, shared by every session to its endpoint."""

    client: paramiko.SSHClient
    max_channels: int
    channel_places: threading.BoundedSemaphore
    users: int = 1
    # Channels open on this connection by every session sharing it, by channel id.
    open_channels: dict[int, paramiko.Channel] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()


@dataclass(eq=False)
class _Endpoint:
    connect_lock: threading.Lock = field(default_factory=threading.Lock)
    connection: _Connection | None = None
    failure: HostError | None = None
    failed_at: float = 0.0


# Guards the endpoints and their connections' users and open channels, and is held only briefly.
_registry_lock = threading.Lock()
_endpoints: dict[tuple, _Endpoint] = {}


class SSHSession:
    """One host's share of an authenticated SSH connection; use as a context manager."""

    def __init__(self, target: HostTarget) -> None:
        self.target = target
        self._connection: _Connection | None = None
        # The connection each open channel took its place on, by channel id. The place goes
        # back there exactly once, even when this session closed first.
        self._channel_connections: dict[int, _Connection] = {}

    def __enter__(self) -> "SSHSession":
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def client(self) -> paramiko.SSHClient:
        if self._connection is None:
            raise RuntimeError("SSHSession.connect() must be called first")
        return self._connection.client

    def connect(self) -> None:
        """Join the endpoint's connection, or open it, retrying only temporary faults."""
        target = self.target
        with _registry_lock:
            endpoint = _endpoints.setdefault(target.endpoint, _Endpoint())
        requested = time.monotonic()

        # One connect per endpoint at a time: sshd's MaxStartups counts every connection
        # that has not authenticated yet, and the sessions waiting here share the result.
        with endpoint.connect_lock:
            with _registry_lock:
                connection = endpoint.connection
                if connection is not None and connection.active:
                    connection.users += 1
                    self._connection = connection
                    return
                failure = endpoint.failure if endpoint.failed_at >= requested else None
            if failure is not None:
                raise failure.shared_with(target.name)

            try:
                client = self._connect_with_retries()
            except HostError as error:
                with _registry_lock:
                    endpoint.failure, endpoint.failed_at = error, time.monotonic()
                raise
            connection = _Connection(client, target.max_sessions, threading.BoundedSemaphore(target.max_sessions))
            with _registry_lock:
                endpoint.connection, endpoint.failure = connection, None
            self._connection = connection

    def _connect_with_retries(self) -> paramiko.SSHClient:
        target = self.target
        retrying = retry(
            retry=retry_if_exception(lambda error: isinstance(error, HostError) and error.temporary),
            stop=stop_after_attempt(target.connect_attempts),
            # 0.5 s, 1 s, 2 s ... up to 5 s, plus up to 1 s of jitter.
            wait=wait_exponential(multiplier=0.5, max=5.0) + wait_random(0, 1.0),
            before_sleep=lambda state: _log_connect_retry(target, state),
            reraise=True,
        )
        return retrying(_open_client)(target)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        with _registry_lock:
            connection.users -= 1
            last = connection.users == 0
            endpoint = _endpoints.get(self.target.endpoint)
            if last and endpoint is not None and endpoint.connection is connection:
                endpoint.connection = None
        if last:
            connection.client.close()

    def open_channel(self, command: str, *, timeout: float, combine_stderr: bool = False) -> paramiko.Channel:
        """Open a session channel running ``command``, all within ``timeout`` seconds.

        The channel takes one of the connection's ``max_sessions`` places, waiting for one if
        needed; pass it to ``close_channel`` to give the place back.
        """
        deadline = time.monotonic() + timeout
        connection = self._live_connection(command)
        if not connection.channel_places.acquire(timeout=timeout):
            raise _no_free_channel(self.target, connection.max_channels, repr(command), timeout)
        try:
            channel = self._start_channel(connection, command, deadline, combine_stderr)
        except BaseException:
            connection.channel_places.release()
            raise
        with _registry_lock:
            connection.open_channels[id(channel)] = channel
            self._channel_connections[id(channel)] = connection
        return channel

    def close_channel(self, channel: paramiko.Channel) -> None:
        """Close ``channel`` and give its place back; closing it again does nothing."""
        channel.close()
        with _registry_lock:
            connection = self._channel_connections.pop(id(channel), None)
            if connection is not None:
                connection.open_channels.pop(id(channel))
        if connection is not None:
            connection.channel_places.release()

    def run(self, command: str, *, timeout: float | None = None) -> CommandResult:
        """Run ``command`` and return its exit status and output; fail if it outlives ``timeout``.

        Raises RemoteCommandFailed when stdout exceeds 4 MiB; only the last 64 KiB of stderr is kept.
        """
        timeout = timeout or self.target.command_timeout
        deadline = time.monotonic() + timeout
        channel = self.open_channel(command, timeout=timeout)
        stdout, stderr = bytearray(), bytearray()
        try:
            for chunk in _receive(channel, deadline, self.target, command, stderr):
                stdout += chunk
                if len(stdout) > _MAX_OUTPUT_BYTES:
                    raise self._output_too_large(command)
            status = _wait_exit_status(channel, deadline, self.target, command)
        finally:
            self.close_channel(channel)
        return CommandResult(status, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"))

    def check(self, command: str, *, timeout: float | None = None) -> CommandResult:
        """Run ``command`` and raise RemoteCommandFailed unless it exits 0."""
        result = self.run(command, timeout=timeout)
        if result.exit_status != 0:
            raise RemoteCommandFailed(
                f"{command!r} on {self.target.where} exited {result.exit_status}: "
                f"{result.stderr.strip()[-300:] or result.stdout.strip()[-300:]}",
                **self.target.where_fields(),
                command=command,
                exit_status=result.exit_status,
                stdout_tail=result.stdout[-_TAIL_CHARS:],
                stderr_tail=result.stderr[-_TAIL_CHARS:],
            )
        return result

    def stream_lines(
        self,
        command: str,
        *,
        timeout: float | None = None,
        max_line_bytes: int = 16384,
        combine_stderr: bool = True,
    ) -> Iterator[bytes]:
        """Yield the output of ``command`` line by line as raw bytes, without holding it all.

        Lines longer than ``max_line_bytes`` are cut there (at a UTF-8 character boundary), so
        one huge line cannot exhaust memory. With ``combine_stderr`` false, only stdout is
        yielded and the end of stderr goes into the error. Raises RemoteCommandFailed when the
        command exits non-zero or outlives ``timeout``.
        """
        timeout = timeout or self.target.command_timeout
        deadline = time.monotonic() + timeout
        channel = self.open_channel(command, timeout=timeout, combine_stderr=combine_stderr)
        stderr = bytearray()
        tail: deque[bytes] = deque(maxlen=5)
        try:
            for line in _split_lines(_receive(channel, deadline, self.target, command, stderr), max_line_bytes):
                tail.append(line)
                yield line
            status = _wait_exit_status(channel, deadline, self.target, command)
        finally:
            self.close_channel(channel)
        if status != 0:
            output = (stderr or b"\n".join(tail)).decode("utf-8", "replace")
            raise RemoteCommandFailed(
                f"{command!r} on {self.target.where} exited {status}: {output.strip()[-300:]}",
                **self.target.where_fields(),
                command=command,
                exit_status=status,
                stdout_tail=b"\n".join(tail).decode("utf-8", "replace")[-_TAIL_CHARS:],
                stderr_tail=stderr.decode("utf-8", "replace")[-_TAIL_CHARS:],
            )

    def _live_connection(self, command: str) -> _Connection:
        connection = self._connection
        if connection is None:
            raise RuntimeError("SSHSession.connect() must be called first")
        if not connection.active:
            raise HostUnreachable(
                f"SSH connection to {self.target.where} was lost before running {command!r}; "
                "check that the host and its sshd are up, then run cfheal again",
                **self.target.where_fields(),
            )
        return connection

    def _start_channel(self, connection: _Connection, command: str, deadline: float, combine_stderr: bool) -> paramiko.Channel:
        target = self.target
        transport = connection.client.get_transport()
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            channel = transport.open_session(timeout=remaining)
        except paramiko.ChannelException as error:
            raise self._channel_rejected(connection, command, error.code, error.text) from error
        except (paramiko.SSHException, OSError) as error:
            # paramiko stores one rejection per connection and returns it to the first thread
            # that calls get_exception(), so threads rejected at the same moment get this message.
            if transport.is_active() and str(error) == "Unable to open channel.":
                raise self._channel_rejected(connection, command, paramiko.common.OPEN_FAILED_CONNECT_FAILED, "Connect failed") from error
            raise HostUnreachable(
                f"opening an SSH channel on {target.where} for {command!r} failed: {str(error) or type(error).__name__}; "
                "the host or its sshd is not answering",
                **target.where_fields(),
            ) from error

        try:
            channel.set_combine_stderr(combine_stderr)
            _exec_before(channel, command, deadline, target)
        except BaseException:
            channel.close()
            raise
        return channel

    def _channel_rejected(self, connection: _Connection, command: str, code: int, reason: str) -> HostError:
        target = self.target
        with _registry_lock:
            open_channels = len(connection.open_channels)
        if code != paramiko.common.OPEN_FAILED_CONNECT_FAILED:
            return HostUnreachable(f"{target.where} rejected an SSH channel for {command!r}: {reason}", **target.where_fields())
        # OpenSSH 9.2 rejects a session channel past MaxSessions with "Connect failed" and logs
        # "no more sessions". Other rejections use that code too, so the message says "probably".
        log.warning("sshd_limit_reached", limit="MaxSessions", **target.where_fields(), open_channels=open_channels, max_sessions=connection.max_channels)
        return SSHLimitReached(
            f"{target.where} rejected another SSH channel (Connect failed) while cfheal had {open_channels} open on "
            f"its connection: the host's sshd MaxSessions is probably below ssh.max_sessions ({connection.max_channels}); "
            "lower ssh.max_sessions, or raise MaxSessions in the host's sshd_config",
            **target.where_fields(),
            limit="MaxSessions",
        )

    def _output_too_large(self, command: str) -> RemoteCommandFailed:
        return RemoteCommandFailed(
            f"{command!r} on {self.target.where} printed more than {_MAX_OUTPUT_BYTES // 2**20} MiB on stdout, "
            "the most cfheal reads from one command, so it stopped reading; narrow the command's output",
            **self.target.where_fields(),
            command=command,
            exit_status=None,
        )


def channel_wait_timed_out(target: HostTarget, waited: float) -> SSHLimitReached:
    """Return the error for a Docker API request that found no free channel on ``target`` in time."""
    return _no_free_channel(target, target.max_sessions, "a Docker API request", waited)


def _no_free_channel(target: HostTarget, max_sessions: int, purpose: str, waited: float) -> SSHLimitReached:
    log.warning("ssh_channel_wait_timed_out", limit="max_sessions", **target.where_fields(), max_sessions=max_sessions, waited_s=round(waited, 3))
    return SSHLimitReached(
        f"no free SSH channel on {target.where} for {purpose} within {waited:g}s: all {max_sessions} allowed by "
        "ssh.max_sessions were in use by other cfheal work; raise ssh.max_sessions if the host's sshd MaxSessions "
        "allows more",
        **target.where_fields(),
        limit="max_sessions",
    )


def _exec_before(channel: paramiko.Channel, command: str, deadline: float, target: HostTarget) -> None:
    """Send the exec request for ``command`` and wait for the reply until ``deadline``."""
    # paramiko waits for the reply to an exec request without a timeout, so a host that stops
    # responding would block this thread for good. Closing the channel ends that wait.
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        channel.close()

    remaining = max(deadline - time.monotonic(), 0.001)
    timer = threading.Timer(remaining, expire)
    timer.daemon = True
    timer.start()
    try:
        channel.exec_command(command)
    except (paramiko.SSHException, OSError) as error:
        if not expired.is_set():
            raise HostUnreachable(f"{target.where} rejected the request to run {command!r}: {error}", **target.where_fields()) from error
    finally:
        timer.cancel()
    if expired.is_set():
        raise HostUnreachable(
            f"request to run {command!r} on {target.where} timed out after {remaining:.3g}s with no response; "
            "the host or its sshd is overloaded or hung, so check it and run cfheal again",
            **target.where_fields(),
        )
    channel.settimeout(max(deadline - time.monotonic(), 0.001))


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
        # paramiko stops waiting for the handshake when its own timeout passes, and the banner
        # timeout may not have fired yet, so whether a banner came is checked here.
        transport = client.get_transport()
        got_banner = transport is not None and bool(transport.remote_version)
        client.close()
        translated = _translate_connect_error(target, error, got_banner=got_banner)
        if isinstance(translated, SSHLimitReached):
            log.warning("sshd_limit_reached", limit=translated.limit, **target.where_fields())
        raise translated from error
    return client


def _translate_connect_error(target: HostTarget, error: Exception, *, got_banner: bool) -> HostError:
    where = target.where_fields()
    if isinstance(error, paramiko.BadHostKeyException):
        return HostKeyRejected(
            f"{target.name}: host key for {target.address}:{target.port} does not match {target.known_hosts} "
            f"(the host offered {error.key.get_name()} {_fingerprint(error.key)}); the host was reinstalled "
            "or someone is intercepting the connection: verify the new key on the host before updating known_hosts",
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
            f"connecting to {target.where} timed out after {target.connect_timeout:g}s; "
            "check that the host is up and that nothing filters the port",
            **where,
        )
    if _closed_before_banner(error):
        return SSHLimitReached(
            f"{target.where} closed the connection before sending an SSH banner; sshd does that when its "
            "MaxStartups limit of connections still authenticating is reached, so cfheal retries; if it persists, "
            "raise MaxStartups in the host's sshd_config or find what else connects to it",
            **where,
            limit="MaxStartups",
        )
    if isinstance(error, paramiko.SSHException) and not got_banner:
        return HostUnreachable(
            f"{target.where} accepted TCP but sent no SSH banner within {target.connect_timeout:g}s; "
            "the port is not sshd, or sshd is hung",
            **where,
        )
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        return HostUnreachable(f"cannot connect to {target.where}: {reason}; is sshd running there?", **where)
    if isinstance(error, (paramiko.SSHException, EOFError)):
        return HostUnreachable(f"SSH negotiation with {target.where} failed: {str(error) or type(error).__name__}", **where)
    return HostUnreachable(f"connecting to {target.where} failed: {type(error).__name__}: {error}", **where)


def _closed_before_banner(error: Exception) -> bool:
    # paramiko reports a closed connection while reading the banner as an SSHException
    # raised while handling the EOFError or connection reset.
    if isinstance(error, paramiko.SSHException) and "banner" in str(error).lower():
        return isinstance(error.__context__, _CLOSED_EARLY)
    return False


def _fingerprint(key: paramiko.PKey) -> str:
    """Return the key's fingerprint in OpenSSH's form, as ``ssh-keygen -lf`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _log_connect_retry(target: HostTarget, state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning(
        "ssh_connect_retrying",
        **target.where_fields(),
        attempt=state.attempt_number,
        of=target.connect_attempts,
        error=str(error),
    )


def _receive(channel: paramiko.Channel, deadline: float, target: HostTarget, command: str, stderr: bytearray) -> Iterator[bytes]:
    """Yield stdout chunks until EOF, keeping only the end of stderr in ``stderr``.

    Both streams share one flow-control window: stderr left unread would stop stdout, and
    stdout left unread would stop stderr, until the timeout. So both are read as they come.
    """
    while True:
        _drain_stderr(channel, stderr)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _command_timed_out(target, command)
        channel.settimeout(min(remaining, _POLL_SECONDS))
        try:
            data = channel.recv(_READ_CHUNK)
        except socket.timeout:
            continue
        if not data:
            _drain_stderr(channel, stderr)
            return
        yield data


def _drain_stderr(channel: paramiko.Channel, stderr_tail: bytearray) -> None:
    while channel.recv_stderr_ready():
        stderr_tail += channel.recv_stderr(_READ_CHUNK)
        del stderr_tail[:-_STDERR_KEPT_BYTES]


def _split_lines(chunks: Iterator[bytes], max_line_bytes: int) -> Iterator[bytes]:
    # Lines are split on raw bytes and decoded by the caller only when whole, so a multi-byte
    # character cut across two reads is never decoded in halves.
    pending, overlong = b"", False
    for chunk in chunks:
        *lines, rest = chunk.split(b"\n")
        for line in lines:
            yield pending if overlong else _cut(pending + line, max_line_bytes)
            pending, overlong = b"", False
        if not overlong:
            pending += rest
            if len(pending) > max_line_bytes:
                # The rest of this line is dropped up to its newline.
                pending, overlong = _cut(pending, max_line_bytes), True
    if pending:
        yield pending


def _cut(line: bytes, limit: int) -> bytes:
    """Cut ``line`` to at most ``limit`` bytes without splitting a UTF-8 character."""
    if len(line) <= limit:
        return line
    end = limit
    # UTF-8 continuation bytes are 0b10xxxxxx; a character has at most three of them.
    while end > limit - 3 and end > 0 and line[end] & 0xC0 == 0x80:
        end -= 1
    return line[:end]


def _command_timed_out(target: HostTarget, command: str) -> RemoteCommandFailed:
    return RemoteCommandFailed(
        f"{command!r} on {target.where} did not finish within its timeout",
        **target.where_fields(),
        command=command,
        exit_status=None,
    )


def _wait_exit_status(channel: paramiko.Channel, deadline: float, target: HostTarget, command: str) -> int:
    while not channel.exit_status_ready():
        if time.monotonic() > deadline:
            raise _command_timed_out(target, command)
        time.sleep(0.01)
    return channel.recv_exit_status()
