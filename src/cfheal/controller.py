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
from . import evidence as cloudflare_evidence
from .cloudflare import CloudflareAPI, CloudflareAPIError, read_token
from .config import Config
from .containers import Engine
from .diagnosis import Diagnosis, DiagnosisKind, diagnose, summarize_probes
from .errors import CfhealError
from .hosts import HostTarget, SSHSession
from .policy import Plan, Playbook, build_plan
from .probes import ProbeResult, origin_targets, probe_edge, probe_origins
from .rollout import RolloutResult, execute_rollout
from .state import Store
from .upgrades import PENDING, UpgradeError, list_requests, prepare_request, save_request, submit_request
from .verify import HostReport, LogScanSettings, verify_hosts

log = structlog.get_logger("cfheal.controller")

Notify = Callable[[str], None]
Confirm = Callable[[Plan], bool]
Guard = Callable[[Plan], "str | None"]


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
    cloudflare: cloudflare_evidence.CloudflareEvidence | None = None
    upgrade_request: dict[str, Any] | None = None
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
        self._cloudflare: CloudflareAPI | None = None
        self.cloudflare_problem: str | None = None

    def close(self) -> None:
        if self._cloudflare is not None:
            self._cloudflare.close()

    def cloudflare(self) -> CloudflareAPI | None:
        """Return a Cloudflare client whose token verified, or None with the reason kept."""
        if self._cloudflare is not None or self.cloudflare_problem is not None:
            return self._cloudflare
        settings = self.config.cloudflare
        if settings is None:
            self.cloudflare_problem = "no cloudflare section in the configuration"
            return None
        try:
            token = read_token(settings)
        except CfhealError as error:
            self.cloudflare_problem = str(error)
            return None
        if token is None:
            self.cloudflare_problem = "no Cloudflare token: set CLOUDFLARE_API_TOKEN or cloudflare.api_token_file"
            return None

        api = CloudflareAPI(settings, token)
        try:
            status = api.verify_token()
        except CloudflareAPIError as error:
            api.close()
            self.cloudflare_problem = f"Cloudflare token check failed: {error}"
            log.warning("cloudflare_token_rejected", error=str(error))
            return None
        log.info("cloudflare_token_verified", status=status)
        self._cloudflare = api
        return api

    def detect(self) -> Diagnosis:
        """Probe the edge and every origin, then diagnose."""
        edge = self.config.edge
        targets = origin_targets(self.config.hosts)
        edge_results, origin_results = map_in_threads(
            lambda probe: probe(),
            [
                lambda: probe_edge(edge.url, count=edge.probes, spacing=edge.spacing, timeout=edge.connect_timeout, edge_server=edge.server),
                lambda: probe_origins(targets, timeout=self.config.origins.connect_timeout),
            ],
            max_workers=2,
            name="detect",
        )

        _log_probes(edge_results, origin_results)
        diagnosis = diagnose(edge_results, origin_results, quorum=edge.quorum)
        log.info("diagnosis_made", diagnosis=str(diagnosis.kind), reason=diagnosis.reason)
        return diagnosis

    def gather_evidence(self) -> cloudflare_evidence.CloudflareEvidence | None:
        if self.config.cloudflare is None:
            return None
        api = self.cloudflare()
        found = cloudflare_evidence.gather(api, self.cloudflare_problem)
        log.info("cloudflare_evidence_gathered", summary=found.summary())
        return found

    def verify(self) -> list[HostReport]:
        logs = self.playbook.verify.logs
        return verify_hosts(self.config, LogScanSettings(logs.window, logs.compiled(), logs.max_line_bytes))

    def check(self, report: RunReport) -> None:
        """Detect and verify, filling ``report``; acts on nothing."""
        started = time.monotonic()
        self.notify("Probing the edge and every origin")
        report.diagnosis = self.detect()
        report.cloudflare = self.gather_evidence()
        report.timings_ms["detect"] = _since(started)
        self.notify(f"Diagnosis: {report.diagnosis.kind} ({report.diagnosis.reason})")
        if report.cloudflare is not None:
            self.notify(f"Cloudflare: {report.cloudflare.summary()}")

        started = time.monotonic()
        self.notify(f"Verifying {len(self.config.hosts)} host(s) over SSH")
        report.hosts = self.verify()
        report.timings_ms["verify"] = _since(started)

    def run(self, report: RunReport, *, dry_run: bool, confirm: Confirm, should_stop: Callable[[], bool], guard: Guard | None = None) -> None:
        """Check, plan, and unless ``dry_run``, act and confirm. Sets outcome and reason.

        ``guard`` may withhold an actionable plan (watch's safety envelope) before anything is done.
        """
        report.dry_run = dry_run
        self.check(report)
        previous = Store(self.config.state_dir).last_rollout()
        report.plan = build_plan(report.diagnosis, report.hosts, self.playbook, self.config, last_rollout=previous)
        log.info("plan_built", act=report.plan.act, reason=report.plan.reason, batches=[[t.label for t in batch] for batch in report.plan.batches])

        if not report.plan.act:
            self._finish(report, "aborted" if report.plan.blocked else "no_action", report.plan.reason)
            return
        withheld = guard(report.plan) if guard is not None and not dry_run else None
        if withheld:
            log.warning("remediation_withheld", reason=withheld)
            self._finish(report, "withheld", withheld)
            return
        if report.plan.kind == "plan_upgrade":
            self._escalate(report, dry_run=dry_run, evidence_from=previous)
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
        upgrade = self.playbook.upgrade
        if report.outcome == "not_recovered" and upgrade is not None and "not_recovered" in upgrade.triggers:
            reason = report.reason
            self._escalate(report, dry_run=False, evidence_from=None)
            self._finish(report, "not_recovered", f"{reason}; {report.reason}")

    def _escalate(self, report: RunReport, *, dry_run: bool, evidence_from: dict[str, Any] | None) -> None:
        """Prepare (and with submit: auto, send) a plan-upgrade request; a dry run stores nothing."""
        upgrade = self.playbook.upgrade
        api = self.cloudflare()
        if api is None:
            self._finish(report, "escalation_failed", f"cannot prepare a plan-upgrade request: {self.cloudflare_problem}; a person must raise the zone's plan")
            return

        existing = self._pending_request()
        if existing is not None:
            report.upgrade_request = existing
            outcome, prefix = ("planned", "dry run: ") if dry_run else ("escalated", "")
            self._finish(report, outcome, f"{prefix}plan-upgrade request {existing['id']} is already pending, so no other is prepared; approve it with cfheal approve {existing['id']}")
            return

        try:
            request = prepare_request(api, target=upgrade.target, frequency=upgrade.frequency, run_id=report.run_id, evidence=self._upgrade_evidence(report, evidence_from))
        except (UpgradeError, CloudflareAPIError) as error:
            self._finish(report, "escalation_failed", f"cannot prepare a plan-upgrade request: {error}")
            return

        if dry_run:
            request.status = "draft"
            report.upgrade_request = request.to_dict()
            self._finish(report, "planned", f"dry run: would prepare plan-upgrade request to {request.target_plan['name']}; nothing stored or sent")
            return

        save_request(self.config.state_dir, request)
        if upgrade.submit == "auto":
            request = submit_request(api, request)
            save_request(self.config.state_dir, request)
        report.upgrade_request = request.to_dict()
        if request.status == PENDING:
            reason = f"plan-upgrade request {request.id} prepared ({request.current_plan['name']} -> {request.target_plan['name']}); review it and run cfheal approve {request.id}"
        else:
            reason = f"plan-upgrade request {request.id} {request.status}: {request.status_reason}"
        self._finish(report, "escalated", reason)

    def _pending_request(self) -> dict[str, Any] | None:
        for request in list_requests(self.config.state_dir):
            if request.status == PENDING and request.zone_id == self.config.cloudflare.zone_id:
                return request.to_dict()
        return None

    def _upgrade_evidence(self, report: RunReport, previous: dict[str, Any] | None) -> dict[str, Any]:
        """Collect what an approver needs: what was seen, what was restarted, how soon it came back."""
        diagnosis = report.diagnosis
        if report.rollout is not None:
            rollout = report.rollout.restarted
        elif previous is not None:
            rollout = _restarted(previous)
        else:
            rollout = []
        return {
            "diagnosis": str(diagnosis.kind),
            "reason": diagnosis.reason,
            "edge_probes": summarize_probes(diagnosis.edge),
            "confirmation_probes": summarize_probes(report.confirmation) if report.confirmation else None,
            "established_connections": {
                f"{host.host}/{container.name}": container.established_connections
                for host in report.hosts
                for container in host.containers
            },
            "restarted": rollout,
            "restart_run": report.run_id if report.rollout else (previous or {}).get("run_id"),
            "restart_finished_at": report.finished_at if report.rollout else (previous or {}).get("finished_at"),
            "cloudflare": report.cloudflare.summary() if report.cloudflare else None,
        }

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
            # A stop request (Ctrl-C, SIGTERM) lets the batch in flight finish, so the run is
            # recorded as interrupted rather than as a failed rollout.
            outcome = "interrupted" if should_stop() else "aborted"
            self._finish(report, outcome, report.rollout.reason)

    def _open_engines(self, hosts: set[str], stack: ExitStack) -> dict[str, Engine]:
        targets = [HostTarget.from_config(self.config, host) for host in self.config.hosts if host.name in hosts]
        sessions = [stack.enter_context(SSHSession(target)) for target in targets]
        engines = {}
        for session in sessions:
            timeout = session.target.command_timeout + self.playbook.rollout.stop_grace_period
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
            results = probe_edge(edge.url, count=edge.probes, spacing=edge.spacing, timeout=edge.connect_timeout, edge_server=edge.server)
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
        log.info(event, outcome=str(result.outcome), status=result.status, duration_ms=result.duration_ms, detail=_one_line(result.detail))
    for label, result in origins.items():
        event = "origin_probe_succeeded" if result.ok else "origin_probe_failed"
        log.info(event, origin=label, outcome=str(result.outcome), status=result.status, duration_ms=result.duration_ms, detail=_one_line(result.detail))


def _one_line(detail: str) -> str | None:
    # A probe's detail may be the start of an HTML error page; logs get one short line of it.
    return " ".join(detail.split())[:120] or None


def _restarted(report: dict[str, Any]) -> list[str]:
    return [label for batch in report["rollout"]["batches"] for label in batch.get("restarted", [])]


def _since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def is_fault(diagnosis: Diagnosis | None) -> bool:
    return diagnosis is not None and diagnosis.kind is not DiagnosisKind.HEALTHY
