"""Unattended self-healing: evaluate on an interval, act only inside the safety envelope.

The loop here decides *when* to act; the Controller decides *what* a run does. Before any
remediation the envelope is checked: the pause switch, the breaker, the cooldown of each
target and the budget of actions per window. A remediation that fails, does not recover or
escalates opens the breaker, and nothing more is done until a person runs cfheal resume.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import structlog

from .config import Config
from .controller import Controller, RunReport, start_report
from .diagnosis import DiagnosisKind
from .errors import CfhealError
from .metrics import Metrics
from .notify import Notifier
from .policy import Plan, Playbook
from .state import LockHeld, Store, run_lock

log = structlog.get_logger("cfheal.watch")

BREAKER, PAUSE, RESUMED = "breaker", "pause", "resumed"
# Outcomes after which acting again without a person would risk a restart loop.
_OPENS_BREAKER = frozenset({"aborted", "not_recovered", "escalated", "escalation_failed", "interrupted"})


@dataclass
class Streak:
    """Consecutive evaluations that found the edge connection limit."""

    count: int = 0
    since: float | None = None

    def update(self, limited: bool, now: float) -> None:
        if limited:
            self.count += 1
            self.since = self.since if self.since is not None else now
        else:
            self.count, self.since = 0, None


def envelope_blocker(plan: Plan, store: Store, config: Config, now: float) -> str | None:
    """Return why the safety envelope withholds this plan, or None when it may proceed."""
    paused = store.get_switch(PAUSE)
    if paused:
        return f"paused since {paused['since']} ({paused.get('reason') or 'no reason given'}); run cfheal resume to let watch act"
    breaker = store.get_switch(BREAKER)
    if breaker:
        return f"breaker open since {breaker['since']} after run {breaker.get('run_id')} ({breaker.get('reason')}); check the hosts, then run cfheal resume"

    settings = config.watch
    # cfheal resume is a person taking responsibility: actions before it no longer count.
    resumed = store.get_switch(RESUMED)
    floor = max(now - settings.action_window, resumed["at"] if resumed else 0.0)
    recent = store.actions_since(floor)
    runs = {action["run_id"] for action in recent}
    if len(runs) >= settings.max_actions:
        return f"budget used: {len(runs)} remediations in the last {settings.action_window:g}s (max_actions {settings.max_actions})"

    if plan.kind == "rollout":
        cooling = sorted({action["target"] for action in recent if action["kind"] == "restart" and action["at"] >= now - settings.cooldown})
        planned = {target.label for batch in plan.batches for target in batch}
        blocked = [target for target in cooling if target in planned]
        if blocked:
            return f"cooldown: {', '.join(blocked)} restarted less than {settings.cooldown:g}s ago"
    return None


class Watcher:
    """The watch loop: evaluate, settle, and remediate through the Controller."""

    def __init__(self, config: Config, playbook: Playbook, *, store: Store, notifier: Notifier, metrics: Metrics, stop: threading.Event) -> None:
        self.config = config
        self.playbook = playbook
        self.store = store
        self.notifier = notifier
        self.metrics = metrics
        self.stop = stop
        self.wake = threading.Event()
        self.streak = Streak()
        self.evaluations = 0
        self._controller = Controller(config, playbook)
        self._last_withheld: str | None = None
        self._last_withheld_notice: str | None = None

    def request_evaluation(self, source: str) -> None:
        self.wake.set()

    def status(self) -> dict:
        return {
            "evaluations": self.evaluations,
            "fault_streak": self.streak.count,
            "paused": self.store.get_switch(PAUSE),
            "breaker": self.store.get_switch(BREAKER),
        }

    def run_forever(self, *, max_evaluations: int | None = None) -> None:
        self._report_dead_runs()
        log.info("watch_started", interval_s=self.config.watch.interval, settle_evaluations=self.config.watch.settle_evaluations, settle_time_s=self.config.watch.settle_time)
        try:
            while not self.stop.is_set():
                try:
                    self.evaluate_once()
                except CfhealError as error:
                    # One failed evaluation must not end unattended healing; the next may succeed.
                    log.error("evaluation_failed", error=str(error))
                if max_evaluations is not None and self.evaluations >= max_evaluations:
                    break
                self._sleep(self.config.watch.interval)
        finally:
            self._controller.close()
            log.info("watch_stopped", evaluations=self.evaluations)

    def evaluate_once(self) -> None:
        # Each remediation binds its run id; an evaluation outside a run must not carry the last one.
        structlog.contextvars.clear_contextvars()
        diagnosis = self._controller.detect()
        self.evaluations += 1
        self.metrics.observe_diagnosis(diagnosis)
        self._refresh_switch_gauges()

        now = time.monotonic()
        self.streak.update(diagnosis.kind is DiagnosisKind.EDGE_CONNECTION_LIMIT, now)
        self.metrics.streak.set(self.streak.count)
        if self.streak.count == 0:
            return

        settle = self.config.watch
        held_for = now - self.streak.since
        if self.streak.count < settle.settle_evaluations or held_for < settle.settle_time:
            log.info("fault_settling", streak=self.streak.count, needed=settle.settle_evaluations, held_s=round(held_for, 1), settle_time_s=settle.settle_time)
            return

        self.remediate()
        self.streak = Streak()

    def remediate(self) -> RunReport | None:
        """Run the playbook once, inside the envelope and under the single-actor lock."""
        # The pause and the breaker withhold every plan, so no run starts while either is set.
        # Cooldown and budget depend on the plan, so the guard inside the run checks those.
        blocker = self._switch_blocker()
        if blocker:
            if blocker != self._last_withheld:
                log.warning("remediation_withheld", reason=blocker)
                self._last_withheld = blocker
            return None
        self._last_withheld = None
        try:
            with run_lock(self.config.state_dir):
                return self._remediate_locked()
        except LockHeld as error:
            # Another controller is acting on these hosts; it owns this incident.
            log.info("remediation_skipped", reason=str(error))
            return None

    def _remediate_locked(self) -> RunReport:
        report = start_report("watch")
        self.store.start_run(report.run_id, report.command, report.started_at)
        self.notifier.send("detection", f"edge connection limit held for {self.streak.count} evaluations; remediating", run_id=report.run_id)

        def announce(plan: Plan) -> bool:
            self.notifier.send("action", plan.reason, run_id=report.run_id)
            return True

        try:
            self._controller.run(
                report,
                dry_run=False,
                confirm=announce,
                should_stop=self.stop.is_set,
                guard=lambda plan: envelope_blocker(plan, self.store, self.config, time.time()),
            )
        finally:
            self._record(report)
        return report

    def _record(self, report: RunReport) -> None:
        self.store.record_run(report.to_dict())
        if report.rollout is not None and report.rollout.restarted:
            self.store.record_actions(report.run_id, "restart", report.rollout.restarted)
        if report.upgrade_request is not None and report.outcome == "escalated":
            self.store.record_actions(report.run_id, "plan_upgrade", [report.upgrade_request["id"]])
        self.metrics.observe_run(report.outcome or "unknown", report.timings_ms)

        if report.outcome == "withheld":
            # Withheld evaluations repeat every interval while the limit holds; people hear of it once per reason.
            if report.reason != self._last_withheld_notice:
                self.notifier.send("outcome", f"withheld: {report.reason}", run_id=report.run_id, outcome=report.outcome)
                self._last_withheld_notice = report.reason
            return
        self._last_withheld_notice = None
        self.notifier.send("outcome", f"{report.outcome}: {report.reason}", run_id=report.run_id, outcome=report.outcome)
        if report.upgrade_request is not None:
            self.notifier.send("escalation", report.reason, run_id=report.run_id, request_id=report.upgrade_request["id"])
        if report.outcome in _OPENS_BREAKER:
            self.store.set_switch(BREAKER, {"run_id": report.run_id, "reason": f"{report.outcome}: {report.reason}"})
            log.error("breaker_opened", outcome=report.outcome, reason=report.reason)
            self.notifier.send("breaker", f"watch stopped acting after run {report.run_id} ({report.outcome}); a person must check and run cfheal resume", run_id=report.run_id)
        self._refresh_switch_gauges()

    def _switch_blocker(self) -> str | None:
        paused = self.store.get_switch(PAUSE)
        if paused:
            return f"paused since {paused['since']} ({paused.get('reason') or 'no reason given'}); run cfheal resume to let watch act"
        breaker = self.store.get_switch(BREAKER)
        if breaker:
            return f"breaker open since {breaker['since']} after run {breaker.get('run_id')} ({breaker.get('reason')}); check the hosts, then run cfheal resume"
        return None

    def _report_dead_runs(self) -> None:
        for run in self.store.recover_dead_runs():
            log.error("run_found_interrupted", dead_run_id=run["run_id"], command=run["command"], started_at=run["started_at"])
            self.notifier.send("outcome", f"run {run['run_id']} was interrupted: its process died", run_id=run["run_id"], outcome="interrupted")

    def _refresh_switch_gauges(self) -> None:
        self.metrics.breaker_open.set(1 if self.store.get_switch(BREAKER) else 0)
        self.metrics.paused.set(1 if self.store.get_switch(PAUSE) else 0)

    def _sleep(self, seconds: float) -> None:
        # A trigger wakes the loop early; SIGTERM wakes it to stop.
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.wake.wait(timeout=min(0.2, deadline - time.monotonic())):
                self.wake.clear()
                return
