"""The configuration file: the edge, the backend hosts and their containers, SSH settings.

Relative paths in the file are resolved against the directory that holds it, so a committed
configuration works from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ._yaml import Duration, StrictModel, load_model
from .errors import ConfigError


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    base_dir = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(os.path.normpath(Path(base_dir) / path))
    return path


def _check_websocket_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("expected a WebSocket URL such as wss://example.com/ws/")
    return value


class EdgeSettings(StrictModel):
    url: str
    probes: Annotated[int, Field(ge=1, le=50)] = 5
    quorum: Annotated[int, Field(ge=1)] = 3
    connect_timeout: Duration = 5.0
    spacing: Duration = 0.2
    # The product in the Server header of the edge's own responses ("nginx" matches
    # "nginx/1.22.1"). A 502 or 503 with another Server header and no Cloudflare page came from
    # a proxy behind the edge, so it is not the edge's connection limit.
    server: Annotated[str, Field(min_length=1, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+(/\S*)?$")] = "cloudflare"

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_websocket_url(value)

    @model_validator(mode="after")
    def _quorum_fits(self) -> "EdgeSettings":
        if self.quorum > self.probes:
            raise ValueError(f"quorum ({self.quorum}) cannot exceed probes ({self.probes})")
        return self


class OriginSettings(StrictModel):
    connect_timeout: Duration = 5.0


class SSHSettings(StrictModel):
    user: str = "root"
    key_file: Path | None = None
    known_hosts: Path
    connect_timeout: Duration = 10.0
    command_timeout: Duration = 30.0
    connect_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    # Maximum channels (remote commands and Docker API connections) that cfheal keeps open at
    # once on a host's single SSH connection. Keep it at or below the MaxSessions of the host's
    # sshd (OpenSSH's default is 10), which rejects any channel beyond that.
    max_sessions: Annotated[int, Field(ge=1, le=64)] = 4

    @field_validator("key_file", "known_hosts")
    @classmethod
    def _resolve_paths(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)


class ContainerSettings(StrictModel):
    name: Annotated[str, Field(min_length=1)]
    origin: str
    # Local address and port the backend listens on, for counting its established connections
    # with ss on the host. Without it, every connection to the origin URL's port is counted.
    listen: Annotated[str | None, Field(pattern=r"^[0-9A-Fa-f.:\[\]]*:\d{1,5}$")] = None

    @field_validator("origin")
    @classmethod
    def _check_origin(cls, value: str) -> str:
        return _check_websocket_url(value)

    @property
    def origin_port(self) -> int:
        parts = urlsplit(self.origin)
        return parts.port or (443 if parts.scheme == "wss" else 80)


class HostSettings(StrictModel):
    name: Annotated[str, Field(min_length=1)]
    address: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    user: str | None = None
    key_file: Path | None = None
    containers: Annotated[list[ContainerSettings], Field(min_length=1)]

    @field_validator("key_file")
    @classmethod
    def _resolve_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)


class CloudflareSettings(StrictModel):
    zone_id: str
    account_id: str | None = None
    # The token is read from this file, or else from CLOUDFLARE_API_TOKEN; never from this configuration.
    api_token_file: Path | None = None
    base_url: str | None = None
    timeout: Duration = 10.0
    pools: list[str] = []
    analytics_window: Duration = 600.0
    read_attempts: Annotated[int, Field(ge=1, le=10)] = 4
    max_retry_wait: Duration = 30.0

    @field_validator("api_token_file")
    @classmethod
    def _resolve_token_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)


class WatchSettings(StrictModel):
    interval: Duration = 15.0
    # The fault must be seen this many times in a row, and for at least settle_time, before
    # watch acts: one failed probe or a burst of normal closes never triggers anything.
    settle_evaluations: Annotated[int, Field(ge=1)] = 3
    settle_time: Duration = 30.0
    # Address of the HTTP endpoint for webhooks, cfheal trigger and /metrics; loopback by default.
    listen: Annotated[str, Field(pattern=r"^[^\s:]+:\d{1,5}$")] = "127.0.0.1:9470"
    # Shared secret that Cloudflare Notifications send in the cf-webhook-auth header.
    webhook_secret_file: Path | None = None
    # Bearer token Alertmanager sends (http_config.authorization); without it, the endpoint is open.
    alertmanager_token_file: Path | None = None
    cooldown: Duration = 600.0
    max_actions: Annotated[int, Field(ge=1)] = 3
    action_window: Duration = 3600.0

    @field_validator("webhook_secret_file", "alertmanager_token_file")
    @classmethod
    def _resolve_secret_files(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listen.rsplit(":", 1)
        return host, int(port)


class NotifySettings(StrictModel):
    url: Annotated[str, Field(pattern=r"^https?://")]
    # slack: {"text": ...} for Slack-compatible incoming webhooks; json: the event as a JSON object.
    format: Literal["slack", "json"] = "json"
    timeout: Duration = 5.0


class Config(StrictModel):
    playbook: Path
    state_dir: Path
    edge: EdgeSettings
    origins: OriginSettings = OriginSettings()
    ssh: SSHSettings
    hosts: Annotated[list[HostSettings], Field(min_length=1)]
    cloudflare: CloudflareSettings | None = None
    watch: WatchSettings = WatchSettings()
    notify: list[NotifySettings] = []

    @field_validator("playbook", "state_dir")
    @classmethod
    def _resolve_paths(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)

    @model_validator(mode="after")
    def _host_names_unique(self) -> "Config":
        names = [host.name for host in self.hosts]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"host names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def user_for(self, host: HostSettings) -> str:
        return host.user or self.ssh.user

    def key_file_for(self, host: HostSettings) -> Path | None:
        return host.key_file or self.ssh.key_file


def load_config(path: str | Path) -> Config:
    """Load and validate a configuration file, including that the files it names exist."""
    path = Path(path)
    config = load_model(path, Config, context={"base_dir": path.resolve().parent})
    _check_files_exist(path, config)
    return config


def _check_files_exist(path: Path, config: Config) -> None:
    required = [("playbook", config.playbook), ("ssh.known_hosts", config.ssh.known_hosts)]
    if config.ssh.key_file is not None:
        required.append(("ssh.key_file", config.ssh.key_file))
    for index, host in enumerate(config.hosts):
        if host.key_file is not None:
            required.append((f"hosts[{index}].key_file", host.key_file))

    for key, file in required:
        if not file.is_file():
            raise ConfigError(f"{path}: {key}: file {file} not found; create it or correct the path")
