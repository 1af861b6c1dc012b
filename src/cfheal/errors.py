"""Errors that cfheal raises, one hierarchy so the command line can report any of them.

    CfhealError                    base: every error an operator can meet
    ├── ConfigError                a configuration or playbook file is invalid
    ├── HostError                  a backend host could not be verified or driven
    │   ├── HostUnreachable        TCP connect, SSH banner or session timed out or failed (temporary)
    │   ├── HostKeyRejected        known_hosts has no key, or a different key, for host and port (permanent)
    │   ├── AuthenticationFailed   the host refused the login (permanent)
    │   └── RemoteCommandFailed    a command on the host exited non-zero or timed out
    ├── ContainerError             the Docker engine on a host refused or failed a request
    └── RolloutAborted             a batch failed its readiness gate; later batches were not started

Third-party exceptions (paramiko, docker, websockets) are translated where cfheal calls those
libraries and chained with ``from``, so callers only handle these classes.
"""

from __future__ import annotations


class CfhealError(Exception):
    """Base class for every error cfheal reports to an operator."""


class ConfigError(CfhealError):
    """A configuration or playbook file is missing, unreadable or invalid."""


class HostError(CfhealError):
    """A backend host could not be verified or driven.

    ``temporary`` says whether trying again later can help; permanent errors are never retried.
    """

    temporary = False

    def __init__(self, message: str, *, host: str, address: str, port: int) -> None:
        super().__init__(message)
        self.host = host
        self.address = address
        self.port = port


class HostUnreachable(HostError):
    temporary = True


class HostKeyRejected(HostError):
    pass


class AuthenticationFailed(HostError):
    pass


class RemoteCommandFailed(HostError):
    """A remote command failed; carries the command, exit status and the end of both streams."""

    def __init__(
        self,
        message: str,
        *,
        host: str,
        address: str,
        port: int,
        command: str,
        exit_status: int | None,
        stdout_tail: str = "",
        stderr_tail: str = "",
    ) -> None:
        super().__init__(message, host=host, address=address, port=port)
        self.command = command
        self.exit_status = exit_status
        self.stdout_tail = stdout_tail
        self.stderr_tail = stderr_tail


class ContainerError(CfhealError):
    def __init__(self, message: str, *, host: str, container: str) -> None:
        super().__init__(message)
        self.host = host
        self.container = container


class RolloutAborted(CfhealError):
    pass
