"""Execute a rolling restart: batches, readiness gates, and abort at the first failed gate.

A batch is restarted only after the previous one passed its gate, so a container that does
not come back stops the rollout with every later container untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from ._threads import map_in_threads
from .containers import ContainerState, Engine
from .errors import CfhealError
from .policy import ReadinessGate, RestartTarget, RollingRestart
from .probes import probe_handshake

log = structlog.get_logger("cfheal.rollout")


@dataclass
class BatchResult:
    index: int
    targets: list[str]
    outcome: str = "not_started"
    reason: str = ""
    duration_ms: int = 0
    restarted: list[str] = field(default_factory=list)


@dataclass
class RolloutResult:
    outcome: str
    reason: str
    batches: list[BatchResult]
    duration_ms: int = 0

    @property
    def restarted(self) -> list[str]:
        return [label for batch in self.batches for label in batch.restarted]


def execute_rollout(
    batches: list[list[RestartTarget]],
    step: RollingRestart,
    engines: dict[str, Engine],
    *,
    origin_timeout: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> RolloutResult:
    """Restart ``batches`` in order; return ``completed`` or ``aborted`` with the reason."""
    started = time.monotonic()
    results = [BatchResult(index, [target.label for target in batch]) for index, batch in enumerate(batches, start=1)]

    for batch, result in zip(batches, results):
        if should_stop():
            reason = f"stopped by operator before batch {result.index} of {len(batches)}; later batches were not started"
            return _finish("aborted", reason, results, started)

        if result.index > 1:
            time.sleep(step.pause_between_batches)

        _run_batch(batch, result, step, engines, origin_timeout)
        if result.outcome != "passed":
            reason = f"batch {result.index} of {len(batches)} failed: {result.reason}; later batches were not started"
            log.error("rollout_aborted", batch=result.index, reason=result.reason)
            return _finish("aborted", reason, results, started)

    return _finish("completed", f"all {len(batches)} batch(es) passed their readiness gates", results, started)


def _finish(outcome: str, reason: str, results: list[BatchResult], started: float) -> RolloutResult:
    return RolloutResult(outcome, reason, results, round((time.monotonic() - started) * 1000))


def _run_batch(batch: list[RestartTarget], result: BatchResult, step: RollingRestart, engines: dict[str, Engine], origin_timeout: float) -> None:
    started = time.monotonic()
    log.info("batch_started", batch=result.index, targets=result.targets)

    outcomes = map_in_threads(
        lambda target: _restart_and_gate(target, step, engines[target.host], origin_timeout),
        batch,
        max_workers=len(batch),
        name=f"batch-{result.index}",
    )

    result.restarted = [target.label for target, (restarted, _) in zip(batch, outcomes) if restarted]
    failures = [problem for _, problem in outcomes if problem]
    result.outcome = "failed" if failures else "passed"
    result.reason = "; ".join(failures)
    result.duration_ms = round((time.monotonic() - started) * 1000)
    log.info("batch_finished", batch=result.index, outcome=result.outcome, reason=result.reason or None, duration_ms=result.duration_ms)


def _restart_and_gate(target: RestartTarget, step: RollingRestart, engine: Engine, origin_timeout: float) -> tuple[bool, str | None]:
    """Restart one container and wait for its gate; return (restarted, problem or None)."""
    try:
        before = engine.state(target.container)
        started = time.monotonic()
        confirmed = engine.restart(target.container, grace_period=step.stop_grace_period, confirm_within=step.readiness.timeout)
    except CfhealError as error:
        log.error("container_restart_failed", host=target.host, container=target.container, error=str(error))
        return False, f"{target.label}: {error}"

    duration_ms = round((time.monotonic() - started) * 1000)
    if confirmed is not None:
        # A rise in the count means that the restart policy started it again after a crash.
        # The readiness gate decides whether that happened once or in a loop.
        log.warning(
            "container_restart_response_timed_out",
            host=target.host,
            container=target.container,
            started_at_before=before.started_at,
            started_at=confirmed.started_at,
            restart_count_before=before.restart_count,
            restart_count=confirmed.restart_count,
            duration_ms=duration_ms,
        )
    log.info("container_restarted", host=target.host, container=target.container, duration_ms=duration_ms, confirmed_from_state=confirmed is not None)
    problem = wait_until_ready(target, before, step.readiness, engine, origin_timeout)
    if problem:
        log.error("readiness_gate_failed", host=target.host, container=target.container, reason=problem)
        return True, f"{target.label}: {problem}"

    log.info("readiness_gate_passed", host=target.host, container=target.container, duration_ms=round((time.monotonic() - started) * 1000))
    return True, None


def wait_until_ready(target: RestartTarget, before: ContainerState, gate: ReadinessGate, engine: Engine, origin_timeout: float) -> str | None:
    """Poll until the container has restarted, stays up for ``gate.stable_for`` and its origin answers 101.

    Returns None when the gate passes, else what was last wrong when ``gate.timeout`` ran out.
    """
    deadline = time.monotonic() + gate.timeout
    stable_since: float | None = None
    baseline_restarts: int | None = None
    first_restarts: int | None = None
    last_restarts: int | None = None
    problem = "not checked yet"

    while time.monotonic() < deadline:
        state = _state_or_none(engine, target)
        if state is not None and state.started_at != before.started_at:
            first_restarts = state.restart_count if first_restarts is None else first_restarts
            last_restarts = state.restart_count
        problem = _readiness_problem(state, before, baseline_restarts)
        if problem is None and gate.origin_must_answer:
            probe = probe_handshake(target.label, target.origin, timeout=origin_timeout)
            problem = None if probe.ok else f"origin answered {probe.status or probe.outcome} ({probe.detail or 'no detail'})"

        if problem is None:
            # A crash-looping container can look running between two polls; its restart count
            # moving during the stability window is what gives it away.
            if stable_since is None:
                stable_since, baseline_restarts = time.monotonic(), state.restart_count
            elif time.monotonic() - stable_since >= gate.stable_for:
                return None
        else:
            stable_since, baseline_restarts = None, None

        time.sleep(gate.poll_interval)

    if first_restarts is not None and last_restarts > first_restarts:
        # The last problem alone can read like a slow start. The rising count shows the loop.
        problem += f"; restart count rose from {first_restarts} to {last_restarts} during the gate: crash loop"
    return f"not ready after {gate.timeout:g}s: {problem}"


def _state_or_none(engine: Engine, target: RestartTarget) -> ContainerState | None:
    try:
        return engine.state(target.container)
    except CfhealError as error:
        log.warning("container_state_unavailable", host=target.host, container=target.container, error=str(error))
        return None


def _readiness_problem(state: ContainerState | None, before: ContainerState, baseline_restarts: int | None) -> str | None:
    if state is None:
        return "state unavailable"
    if state.started_at == before.started_at:
        return "not restarted yet (start time unchanged)"
    if not state.running:
        return f"container is {state.status}"
    if baseline_restarts is not None and state.restart_count != baseline_restarts:
        return f"restart count moved from {baseline_restarts} to {state.restart_count}: crash loop"
    if not state.healthy_or_unchecked:
        return f"health check is {state.health}"
    return None
