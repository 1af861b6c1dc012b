"""One run of cfheal: detect, verify, plan, act, confirm. The steps themselves live elsewhere.

The controller only sequences the steps, binds the run id to every log event, times each
phase and builds the report. It never prints: the command line renders the report.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from ._threads import map_in_threads
from .config import Config
from .containers import Engine
from .diagnosis import Diagnosis, DiagnosisKind, diagnose, summarize_probes
from .errors import CfhealError
from .hosts import HostTarget, SSHSession
from .policy import Plan, Playbook, build_plan
from .probes import ProbeResult, origin_targets, probe_edge, probe_origins
from .rollout import RolloutResult, execute_rollout
from .verify import HostReport, LogScanSettings, verify_hosts

log = structlog.get_logger("cfheal.controller")

Notify = Callable[[str], None]
Confirm = Callable[[Plan], bool]


@dataclass
class RunReport:
    run_id: str
    command: str
    started_at: str
    dry_run: bool = False
    diagnosis: Diagnosis | None = None
    hosts: list[HostReport] = field(default_factory=list)
    plan: Plan | None = None
    rollout: RolloutResult | None = None
    confirmation: list[ProbeResult] = field(default_factory=list)
    outcome: str | None = None
    reason: str = ""
    finished_at: str | None = None
    timings_ms: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


def _plain(value: Any) -> Any:
    """Convert dataclasses, pydantic models and enums to JSON-ready values."""
    if dataclasses.is_dataclass(value):
        return {item.name: _plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Controller:
    """Runs the phases of one remediation against one configuration and playbook."""

    def __init__(self, config: Config, playbook: Playbook, *, notify: Notify = lambda message: None) -> None:
        self.config = config
        self.playbook = playbook
        self.notify = notify

    def detect(self) -> Diagnosis:
        """Probe the edge and every origin, then diagnose."""
        edge = self.config.edge
        targets = origin_targets(self.config.hosts)
        edge_results, origin_results = map_in_threads(
            lambda probe: probe(),
            [
                lambda: probe_edge(edge.url, count=edge.probes, spacing=edge.spacing, timeout=edge.connect_timeout),
                lambda: probe_origins(targets, timeout=self.config.origins.connect_timeout),
            ],
            max_workers=2,
            name="detect",
        )

        _log_probes(edge_results, origin_results)
        diagnosis = diagnose(edge_results, origin_results, quorum=edge.quorum)
        log.info("diagnosis_made", diagnosis=str(diagnosis.kind), reason=diagnosis.reason)
        return diagnosis

    def verify(self) -> list[HostReport]:
        logs = self.playbook.verify.logs
        return verify_hosts(self.config, LogScanSettings(logs.window, logs.compiled(), logs.max_line_bytes))

    def check(self, report: RunReport) -> None:
        """Detect and verify, filling ``report``; acts on nothing."""
        started = time.monotonic()
        self.notify("Probing the edge and every origin")
        report.diagnosis = self.detect()
        report.timings_ms["detect"] = _since(started)
        self.notify(f"Diagnosis: {report.diagnosis.kind} ({report.diagnosis.reason})")

        started = time.monotonic()
        self.notify(f"Verifying {len(self.config.hosts)} host(s) over SSH")
        report.hosts = self.verify()
        report.timings_ms["verify"] = _since(started)

    def run(self, report: RunReport, *, dry_run: bool, confirm: Confirm, should_stop: Callable[[], bool]) -> None:
        """Check, plan, and unless ``dry_run``, act and confirm. Sets outcome and reason."""
        report.dry_run = dry_run
        self.check(report)
        report.plan = build_plan(report.diagnosis, report.hosts, self.playbook, self.config)
        log.info("plan_built", act=report.plan.act, reason=report.plan.reason, batches=[[t.label for t in batch] for batch in report.plan.batches])

        if not report.plan.act:
            self._finish(report, "aborted" if report.plan.blocked else "no_action", report.plan.reason)
            return
        if dry_run:
            self._finish(report, "planned", "dry run: the plan above was not executed")
            return
        if not confirm(report.plan):
            self._finish(report, "declined", "the operator declined the plan; nothing was changed")
            return

        self._act(report, should_stop)
        if report.outcome is None:
            self._confirm(report)

    def _act(self, report: RunReport, should_stop: Callable[[], bool]) -> None:
        plan = report.plan
        started = time.monotonic()
        hosts = {target.host for batch in plan.batches for target in batch}
        with ExitStack() as stack:
            # Every host's SSH session is opened before the first restart, so a host lost since
            # verification stops the run while nothing has been touched.
            try:
                engines = self._open_engines(hosts, stack)
            except CfhealError as error:
                self._finish(report, "aborted", f"before any restart: {error}")
                return

            self.notify(f"Rolling restart: {len(plan.batches)} batch(es) of at most {plan.step.max_unavailable}")
            report.rollout = execute_rollout(plan.batches, plan.step, engines, origin_timeout=self.config.origins.connect_timeout, should_stop=should_stop)
        report.timings_ms["rollout"] = _since(started)

        if report.rollout.outcome != "completed":
            self._finish(report, "aborted", report.rollout.reason)

    def _open_engines(self, hosts: set[str], stack: ExitStack) -> dict[str, Engine]:
        targets = [HostTarget.from_config(self.config, host) for host in self.config.hosts if host.name in hosts]
        sessions = [stack.enter_context(SSHSession(target)) for target in targets]
        engines = {}
        for session in sessions:
            timeout = session.target.command_timeout + self.playbook.steps[0].stop_grace_period
            engine = Engine(session, timeout=timeout)
            stack.callback(engine.close)
            engines[session.target.name] = engine
        return engines

    def _confirm(self, report: RunReport) -> None:
        """Probe the edge until a quorum answers 101 or the confirmation timeout passes."""
        confirm = report.plan.confirm
        edge = self.config.edge
        started = time.monotonic()
        self.notify(f"Confirming: probing the edge for up to {confirm.timeout:g}s")
        time.sleep(confirm.delay)

        deadline = started + confirm.delay + confirm.timeout
        while True:
            results = probe_edge(edge.url, count=edge.probes, spacing=edge.spacing, timeout=edge.connect_timeout)
            report.confirmation = results
            passed = sum(result.ok for result in results)
            if passed >= edge.quorum:
                report.timings_ms["confirm"] = _since(started)
                log.info("edge_recovered", passed=passed, probes=len(results))
                self._finish(report, "recovered", f"{passed} of {len(results)} edge handshakes answered 101 after the rollout")
                return
            if time.monotonic() + confirm.interval > deadline:
                break
            time.sleep(confirm.interval)

        report.timings_ms["confirm"] = _since(started)
        log.error("edge_not_recovered", probes=summarize_probes(results))
        self._finish(report, "not_recovered", f"edge still failing {confirm.timeout:g}s after the rollout: {summarize_probes(results)}; escalate: the live client population may exceed the plan's limit")

    def _finish(self, report: RunReport, outcome: str, reason: str) -> None:
        report.outcome = outcome
        report.reason = reason
        report.finished_at = _now()
        log.info("run_finished", outcome=outcome, reason=reason, timings_ms=report.timings_ms)


def start_report(command: str) -> RunReport:
    report = RunReport(run_id=new_run_id(), command=command, started_at=_now())
    structlog.contextvars.bind_contextvars(run_id=report.run_id)
    log.info("run_started", command=command)
    return report


def _log_probes(edge: list[ProbeResult], origins: dict[str, ProbeResult]) -> None:
    for result in edge:
        event = "edge_probe_succeeded" if result.ok else "edge_probe_failed"
        log.info(event, outcome=str(result.outcome), status=result.status, duration_ms=result.duration_ms, detail=result.detail or None)
    for label, result in origins.items():
        event = "origin_probe_succeeded" if result.ok else "origin_probe_failed"
        log.info(event, origin=label, outcome=str(result.outcome), status=result.status, duration_ms=result.duration_ms, detail=result.detail or None)


def _since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def is_fault(diagnosis: Diagnosis | None) -> bool:
    return diagnosis is not None and diagnosis.kind is not DiagnosisKind.HEALTHY
