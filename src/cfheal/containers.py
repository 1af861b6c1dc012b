"""Drive a host's Docker engine through the Docker SDK, over cfheal's own SSH session.

The SDK's ``ssh://`` transport would build its own paramiko client from ~/.ssh/config, with
no key path from cfheal's configuration and no connect timeout. ``engine_client`` instead
hands the SDK the session cfheal opened, with strict host keys and bounded connects.
"""

from __future__ import annotations

from dataclasses import dataclass

import docker
import paramiko
import requests
from docker.transport.sshconn import SSHHTTPAdapter

from .errors import ContainerError, HostUnreachable
from .hosts import SSHSession

# The lowest API version cfheal needs (Docker Engine 20.10); fixing it skips a version
# round trip on every connection.
DOCKER_API_VERSION = "1.41"


class _SessionAdapter(SSHHTTPAdapter):
    """The SDK's SSH adapter, bound to a paramiko client that cfheal already connected."""

    def __init__(self, session: SSHSession, timeout: float) -> None:
        self._session = session
        super().__init__("ssh://cfheal-session", timeout=timeout, shell_out=False)

    def _create_paramiko_client(self, base_url: str) -> None:
        self.ssh_client = self._session.client
        self.ssh_params = {}

    def _connect(self) -> None:
        # The SDK reconnects here with its own settings, or falls back to the ssh binary when
        # there is no transport; cfheal's session must stay the only way in.
        transport = self.ssh_client.get_transport()
        if transport is None or not transport.is_active():
            target = self._session.target
            raise HostUnreachable(f"SSH connection to {target.where} was lost", host=target.name, address=target.address, port=target.port)


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
        self._api = engine_client(session, timeout=timeout)

    def close(self) -> None:
        self._api.close()

    def state(self, container: str) -> ContainerState:
        document = self._call(container, "inspect", self._api.inspect_container, container)
        state = document["State"]
        return ContainerState(
            status=state["Status"],
            running=bool(state["Running"]),
            restart_count=int(document.get("RestartCount", 0)),
            started_at=state.get("StartedAt", ""),
            health=(state.get("Health") or {}).get("Status"),
        )

    def restart(self, container: str, *, grace_period: float) -> None:
        """Stop ``container`` (SIGTERM, then SIGKILL after ``grace_period``) and start it again."""
        self._call(container, "restart", self._api.restart, container, timeout=max(1, round(grace_period)))

    def _call(self, container: str, verb: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except docker.errors.NotFound as error:
            raise ContainerError(f"container {container!r} not found on {self.host}", host=self.host, container=container) from error
        except docker.errors.APIError as error:
            raise ContainerError(f"Docker engine on {self.host} failed to {verb} {container!r}: {error.explanation or error}", host=self.host, container=container) from error
        except (requests.exceptions.RequestException, paramiko.SSHException, OSError) as error:
            raise ContainerError(f"lost contact with the Docker engine on {self.host} during {verb} of {container!r}: {error}", host=self.host, container=container) from error
