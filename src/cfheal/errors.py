"""Errors that cfheal raises, one hierarchy so the command line can report any of them.

    CfhealError                    base: every error an operator can meet
    ├── ConfigError                a configuration or playbook file is invalid
    ├── HostError                  a backend host could not be verified or driven
    │   ├── HostUnreachable        TCP connect, SSH banner or session timed out or failed (temporary)
    │   │   └── SSHLimitReached    sshd's MaxStartups or MaxSessions, or cfheal's ssh.max_sessions, was hit
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
    ``fault`` is the kind of failure as one snake_case word, for reports and log events.
    """

    temporary = False
    fault = "host_error"

    def __init__(self, message: str, *, host: str, address: str, port: int) -> None:
        super().__init__(message)
        self.host = host
        self.address = address
        self.port = port

    def shared_with(self, host: str) -> "HostError":
        """Return this error as met by ``host``, another configured host at the same address and port."""
        error = type(self).__new__(type(self))
        error.__dict__.update(self.__dict__)
        error.args = (f"{host}: same address and port as {self.host}, whose connect failed just now: {self}",)
        error.host = host
        error.__cause__ = self
        return error


class HostUnreachable(HostError):
    temporary = True
    fault = "unreachable"


class SSHLimitReached(HostUnreachable):
    """A connection or channel was refused because a limit was reached.

    ``limit`` names it: sshd's ``MaxStartups`` or ``MaxSessions``, or cfheal's own
    ``ssh.max_sessions``.
    """

    fault = "ssh_limit_reached"

    def __init__(self, message: str, *, host: str, address: str, port: int, limit: str) -> None:
        super().__init__(message, host=host, address=address, port=port)
        self.limit = limit


class HostKeyRejected(HostError):
    fault = "host_key_rejected"


class AuthenticationFailed(HostError):
    fault = "authentication_failed"


class RemoteCommandFailed(HostError):
    """A remote command failed; carries the command, exit status and the end of both streams."""

    fault = "command_failed"

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
