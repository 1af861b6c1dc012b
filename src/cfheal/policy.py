"""Playbooks and the plan they produce. Plain functions over plain data: no I/O here.

A playbook says which diagnosis it answers, what verification must show before acting,
and the remediation steps. ``build_plan`` applies it to one run's evidence and returns
either a plan to execute or the reason nothing will be done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from ._yaml import Duration, StrictModel, load_model
from .config import Config
from .diagnosis import Diagnosis, DiagnosisKind
from .verify import HostReport


class LogScan(StrictModel):
    window: Duration = 600.0
    error_patterns: list[str] = Field(default_factory=list)
    max_line_bytes: Annotated[int, Field(ge=256, le=1_048_576)] = 16384

    @field_validator("error_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"invalid regular expression {pattern!r}: {error}") from None
        return patterns

    def compiled(self) -> list[re.Pattern[str]]:
        return [re.compile(pattern) for pattern in self.error_patterns]


class Verification(StrictModel):
    logs: LogScan = LogScan()
    require_clean_logs: bool = True


class ReadinessGate(StrictModel):
    timeout: Duration = 60.0
    stable_for: Duration = 3.0
    poll_interval: Duration = 0.5
    origin_must_answer: bool = True


class RollingRestart(StrictModel):
    action: Literal["rolling_restart"]
    max_unavailable: Annotated[int, Field(ge=1)] = 1
    stop_grace_period: Duration = 10.0
    pause_between_batches: Duration = 2.0
    readiness: ReadinessGate = ReadinessGate()


class Confirmation(StrictModel):
    delay: Duration = 2.0
    timeout: Duration = 30.0
    interval: Duration = 2.0


class Playbook(StrictModel):
    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    when: Literal["edge_connection_limit"] = "edge_connection_limit"
    verify: Verification = Verification()
    steps: Annotated[list[RollingRestart], Field(min_length=1)]
    confirm: Confirmation = Confirmation()

    @model_validator(mode="after")
    def _one_rollout(self) -> "Playbook":
        # NOTE: only one step is executed today; a ladder of several steps needs escalation support.
        if len(self.steps) > 1:
            raise ValueError("only one step is supported; remove the extra steps")
        return self


def load_playbook(path: Path) -> Playbook:
    return load_model(path, Playbook)


@dataclass(frozen=True)
class RestartTarget:
    host: str
    container: str
    origin: str

    @property
    def label(self) -> str:
        return f"{self.host}/{self.container}"


@dataclass(frozen=True)
class Plan:
    """What a run will do: either batches of restarts, or nothing and why."""

    act: bool
    reason: str
    playbook: str
    # True when the diagnosis called for action but verification stopped it.
    blocked: bool = False
    batches: list[list[RestartTarget]] = field(default_factory=list)
    step: RollingRestart | None = None
    confirm: Confirmation | None = None


def build_plan(diagnosis: Diagnosis, reports: list[HostReport], playbook: Playbook, config: Config) -> Plan:
    """Decide whether to act on this evidence, and if so in which batches."""
    if diagnosis.kind != DiagnosisKind(playbook.when):
        return Plan(False, f"playbook {playbook.name!r} answers {playbook.when}, diagnosis is {diagnosis.kind}", playbook.name)

    blocker = _verification_blocker(reports, playbook)
    if blocker:
        return Plan(False, blocker, playbook.name, blocked=True)

    step = playbook.steps[0]
    targets = [
        RestartTarget(host.name, container.name, container.origin)
        for host in config.hosts
        for container in host.containers
    ]
    batches = [targets[start : start + step.max_unavailable] for start in range(0, len(targets), step.max_unavailable)]
    reason = f"{diagnosis.kind}: every host verified; rolling restart of {len(targets)} container(s) in {len(batches)} batch(es)"
    return Plan(True, reason, playbook.name, batches=batches, step=step, confirm=playbook.confirm)


def _verification_blocker(reports: list[HostReport], playbook: Playbook) -> str | None:
    # Never act on partial knowledge: any host that could not be verified stops the run.
    unverified = [report for report in reports if report.error]
    if unverified:
        details = "; ".join(f"{report.host}: {report.error}" for report in unverified)
        return f"not acting: {len(unverified)} host(s) could not be verified ({details})"

    stopped = [f"{report.host}/{c.name} is {c.state}" for report in reports for c in report.containers if not c.running]
    if stopped:
        return f"not acting: container(s) not running: {', '.join(stopped)}"

    if playbook.verify.require_clean_logs:
        noisy = [f"{report.host}/{c.name} ({c.log_errors} error line(s))" for report in reports for c in report.containers if c.log_errors]
        if noisy:
            return f"not acting: error lines in logs suggest an origin problem: {', '.join(noisy)}"
    return None
