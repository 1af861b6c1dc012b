"""Drive a host's Docker engine through the Docker SDK, over cfheal's own SSH session.

The SDK's ``ssh://`` transport would build its own paramiko client from ~/.ssh/config, with
no key path from cfheal's configuration and no connect timeout. ``engine_client`` instead
hands the SDK channels of the session cfheal opened, with strict host keys, bounded connects,
and the session's limit of ``ssh.max_sessions`` channels shared with cfheal's own commands.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import docker
import paramiko
import requests
import urllib3
from docker.transport.basehttpadapter import BaseHTTPAdapter

from .errors import ContainerError, HostError
from .hosts import SSHSession, channel_wait_timed_out

# The lowest API version cfheal needs (Docker Engine 20.10); fixing it skips a version
# round trip on every connection.
DOCKER_API_VERSION = "1.41"


class _SessionConnection(urllib3.connection.HTTPConnection):
    """One HTTP connection to the engine: a session channel running ``docker system dial-stdio``."""

    def __init__(self, session: SSHSession, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._session = session
        self._channel_timeout = timeout
        self._channel: paramiko.Channel | None = None

    def connect(self) -> None:
        # open_channel bounds the wait for a free channel, the channel open and the exec reply.
        # urllib3 then sets each request's read timeout on the channel.
        self._channel = self._session.open_channel("docker system dial-stdio", timeout=self._channel_timeout)
        self.sock = self._channel

    def close(self) -> None:
        channel, self._channel = self._channel, None
        try:
            super().close()
        finally:
            if channel is not None:
                self._session.close_channel(channel)


class _SessionPool(urllib3.connectionpool.HTTPConnectionPool):
    """At most ``maxsize`` requests at once; an extra request waits up to ``timeout`` seconds."""

    def __init__(self, session: SSHSession, timeout: float, maxsize: int) -> None:
        super().__init__("localhost", timeout=timeout, maxsize=maxsize, block=True)
        self._session = session
        self._wait = timeout
        self._idle_kept = False
        self._idle_lock = threading.Lock()

    def _new_conn(self) -> _SessionConnection:
        return _SessionConnection(self._session, self._wait)

    def _put_conn(self, conn) -> None:
        # One idle channel is kept: a new one costs a remote shell and a docker CLI start (about
        # 0.1 s each on the lab), paid on every readiness poll otherwise. More idle channels
        # would hold places against sshd's MaxSessions that cfheal's own commands may need.
        with self._idle_lock:
            if conn is not None and (self._idle_kept or conn.sock is None):
                conn.close()
                conn = None
            elif conn is not None:
                self._idle_kept = True
        super()._put_conn(conn)

    def _get_conn(self, timeout: float | None = None):
        # requests passes no pool timeout, and a blocking pool would otherwise wait for good.
        # The EmptyPoolError raised after the wait must stay urllib3's own: urlopen relies on
        # it to know that no connection was taken from the pool.
        conn = super()._get_conn(timeout=self._wait if timeout is None else timeout)
        if conn is not None and conn.sock is not None:
            with self._idle_lock:
                self._idle_kept = False
        return conn


class _SessionAdapter(BaseHTTPAdapter):
    """Sends the SDK's requests over channels of a session that cfheal already connected."""

    def __init__(self, session: SSHSession, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout
        self.max_pool_size = session.target.max_sessions
        self._pool = _SessionPool(session, timeout, self.max_pool_size)

    def get_connection(self, url, proxies=None) -> _SessionPool:
        # One pool for every URL: the SDK's own adapter keeps one per URL, which would
        # multiply max_pool_size by the number of endpoints used.
        return self._pool

    def close(self) -> None:
        # The SSH connection belongs to cfheal's session and outlives this client.
        super().close()
        self._pool.close()


def engine_client(session: SSHSession, *, timeout: float) -> docker.APIClient:
    """Return a low-level Docker API client that talks over ``session``."""
    # use_ssh_client=True makes the constructor build a shell-out adapter without connecting;
    # it is replaced before any request is sent.
    client = docker.APIClient(base_url=f"ssh://{session.target.address}", version=DOCKER_API_VERSION, timeout=timeout, use_ssh_client=True)
    adapter = _SessionAdapter(session, timeout)
    client._custom_adapter = adapter
    client.mount("http+docker://ssh", adapter)
    return client


@dataclass(frozen=True)
class ContainerState:
    status: str
    running: bool
    restart_count: int
    started_at: str
    health: str | None

    @property
    def healthy_or_unchecked(self) -> bool:
        return self.health in (None, "healthy")


class Engine:
    """One host's Docker engine, reached through an SSH session."""

    def __init__(self, session: SSHSession, *, timeout: float) -> None:
        self.host = session.target.name
        self._target = session.target
        self._timeout = timeout
        self._api = engine_client(session, timeout=timeout)

    def close(self) -> None:
        self._api.close()

    def state(self, container: str) -> ContainerState:
        document = self._call(container, "inspect", self._api.inspect_container, container)
        state = document["State"]
        return ContainerState(
            status=state["Status"],
            # dockerd reports Running: true while a container waits out its restart policy's
            # back-off (Status "restarting"), so a crash loop would pass for running.
            running=bool(state["Running"]) and not state.get("Restarting", False),
            restart_count=int(document.get("RestartCount", 0)),
            started_at=state.get("StartedAt", ""),
            health=(state.get("Health") or {}).get("Status"),
        )

    def restart(self, container: str, *, grace_period: float, confirm_within: float = 30.0) -> ContainerState | None:
        """Stop ``container`` (SIGTERM, then SIGKILL after ``grace_period``) and start it again.

        The request is sent once. dockerd 20.10 finishes a restart after its client stops
        waiting, so a second request would stop the container again. When the response times
        out, the container is inspected for up to ``confirm_within`` seconds instead, and a
        moved StartedAt counts as the restart. Returns that state, or None when the engine
        responded.
        """
        before = self.state(container)
        seconds = max(1, round(grace_period))
        try:
            self._call(container, "restart", self._api.restart, container, timeout=seconds)
            return None
        except ContainerError as error:
            if not _timed_out(error):
                raise
            timed_out = error

        # NOTE: an engine that cancels the restart when its client disconnects leaves the
        # container stopped. That shows up here as an unchanged StartedAt and is reported.
        deadline = time.monotonic() + confirm_within
        last_seen = f"status {before.status}"
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                state = self.state(container)
            except ContainerError as error:
                # dockerd holds the container's lock while a stop is stuck, so inspect waits too.
                if not _timed_out(error):
                    raise
                last_seen = "inspect timed out too"
                continue
            if state.started_at != before.started_at:
                return state
            last_seen = f"status {state.status}"
        raise ContainerError(
            f"restart of {container!r} on {self._target.where}: the engine's response timed out, "
            f"and the container's start time had not changed {confirm_within:g}s later ({last_seen}). "
            f"cfheal sent no second restart. Check the container with docker inspect on the host before running cfheal again",
            host=self.host,
            container=container,
        ) from timed_out

    def _call(self, container: str, verb: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except HostError:
            # Already names the host, its address and port, and the limit or timeout that was hit.
            raise
        except urllib3.exceptions.EmptyPoolError as error:
            raise channel_wait_timed_out(self._target, self._timeout) from error
        except docker.errors.NotFound as error:
            raise ContainerError(f"container {container!r} not found on {self._target.where}", host=self.host, container=container) from error
        except docker.errors.APIError as error:
            raise ContainerError(f"Docker engine on {self._target.where} failed to {verb} {container!r}: {error.explanation or error}", host=self.host, container=container) from error
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, paramiko.SSHException, OSError) as error:
            raise ContainerError(f"lost contact with the Docker engine on {self._target.where} during {verb} of {container!r}: {error}", host=self.host, container=container) from error


def _timed_out(error: ContainerError) -> bool:
    """Return whether the request was sent but its response did not arrive in time."""
    return isinstance(error.__cause__, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError))
