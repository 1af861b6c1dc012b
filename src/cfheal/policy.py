"""Playbooks and the plan they produce. Plain functions over plain data: no I/O here.

A playbook says which diagnosis it answers, what verification must show before acting,
and the remediation steps. ``build_plan`` applies it to one run's evidence and returns
either a plan to execute or the reason nothing will be done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from datetime import datetime
from typing import Annotated, Any, Literal, Union

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


class PlanUpgrade(StrictModel):
    """Escalation when restarts cannot hold: prepare a request to move the zone to a higher plan."""

    action: Literal["plan_upgrade"]
    # not_recovered: the restart in this run did not bring the edge back.
    # limit_returned: the limit is back within limit_returned_within of the last restart.
    # Named "triggers", not "on": YAML 1.1 reads a bare on as the boolean true.
    triggers: Annotated[list[Literal["not_recovered", "limit_returned"]], Field(min_length=1)] = ["not_recovered", "limit_returned"]
    limit_returned_within: Duration = 900.0
    # "next_tier" (the cheapest plan above the current one) or a plan's legacy_id, id or name.
    target: Annotated[str, Field(min_length=1)] = "next_tier"
    frequency: Literal["weekly", "monthly", "quarterly", "yearly"] | None = None
    # manual: a person runs cfheal approve. auto: cfheal submits the request it prepared.
    submit: Literal["manual", "auto"] = "manual"


Step = Annotated[Union[RollingRestart, PlanUpgrade], Field(discriminator="action")]


class Confirmation(StrictModel):
    delay: Duration = 2.0
    timeout: Duration = 30.0
    interval: Duration = 2.0


class Playbook(StrictModel):
    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    when: Literal["edge_connection_limit"] = "edge_connection_limit"
    verify: Verification = Verification()
    steps: Annotated[list[Step], Field(min_length=1)]
    confirm: Confirmation = Confirmation()

    @model_validator(mode="after")
    def _ladder_order(self) -> "Playbook":
        actions = [step.action for step in self.steps]
        for action in set(actions):
            if actions.count(action) > 1:
                raise ValueError(f"steps: {action} appears {actions.count(action)} times; keep one")
        if actions == ["plan_upgrade", "rolling_restart"]:
            raise ValueError("steps: rolling_restart must come before plan_upgrade, which escalates from it")
        return self

    @property
    def rollout(self) -> RollingRestart | None:
        return next((step for step in self.steps if isinstance(step, RollingRestart)), None)

    @property
    def upgrade(self) -> PlanUpgrade | None:
        return next((step for step in self.steps if isinstance(step, PlanUpgrade)), None)


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
    # "rollout" restarts the backends; "plan_upgrade" prepares a plan-upgrade request instead.
    kind: str = "rollout"
    # True when the diagnosis called for action but verification stopped it.
    blocked: bool = False
    batches: list[list[RestartTarget]] = field(default_factory=list)
    step: RollingRestart | None = None
    confirm: Confirmation | None = None


def build_plan(diagnosis: Diagnosis, reports: list[HostReport], playbook: Playbook, config: Config, *, last_rollout: dict[str, Any] | None = None, now: datetime | None = None) -> Plan:
    """Decide whether to act on this evidence, and how.

    ``last_rollout`` is the most recent earlier run that restarted the backends; when the limit
    is back soon after it, restarting again would only start a loop, so the plan escalates.
    """
    if diagnosis.kind != DiagnosisKind(playbook.when):
        return Plan(False, f"playbook {playbook.name!r} answers {playbook.when}, diagnosis is {diagnosis.kind}", playbook.name)

    blocker = _verification_blocker(reports, playbook)
    if blocker:
        return Plan(False, blocker, playbook.name, blocked=True)

    returned = _limit_returned_after(last_rollout, playbook.upgrade, now)
    if returned is not None or playbook.rollout is None:
        why = f"the limit is back {returned:.0f}s after the restart in run {last_rollout['run_id']}" if returned is not None else "the playbook has no rollout step"
        reason = f"{diagnosis.kind}: {why}; preparing a plan-upgrade request instead of restarting"
        return Plan(True, reason, playbook.name, kind="plan_upgrade")

    step = playbook.rollout
    targets = [
        RestartTarget(host.name, container.name, container.origin)
        for host in config.hosts
        for container in host.containers
    ]
    batches = [targets[start : start + step.max_unavailable] for start in range(0, len(targets), step.max_unavailable)]
    reason = f"{diagnosis.kind}: every host verified; rolling restart of {len(targets)} container(s) in {len(batches)} batch(es)"
    return Plan(True, reason, playbook.name, batches=batches, step=step, confirm=playbook.confirm)


def _limit_returned_after(last_rollout: dict[str, Any] | None, upgrade: PlanUpgrade | None, now: datetime | None) -> float | None:
    """Return seconds since the last restart when that counts as the limit returning, else None."""
    if last_rollout is None or upgrade is None or "limit_returned" not in upgrade.triggers:
        return None
    finished = last_rollout.get("finished_at")
    if not finished:
        return None
    now = now or datetime.now(datetime.fromisoformat(finished).tzinfo)
    elapsed = (now - datetime.fromisoformat(finished)).total_seconds()
    return elapsed if 0 <= elapsed <= upgrade.limit_returned_within else None


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
