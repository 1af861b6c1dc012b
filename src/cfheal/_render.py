"""Render a run report for a person at a terminal (rich) or for a program (one JSON object)."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from .controller import RunReport
from .policy import Plan

_OUTCOME_STYLE = {
    "recovered": "bold green",
    "planned": "bold cyan",
    "no_action": "bold yellow",
    "declined": "bold yellow",
    "not_recovered": "bold red",
    "aborted": "bold red",
}
_DIAGNOSIS_STYLE = {"healthy": "bold green", "edge_connection_limit": "bold red", "origin_failure": "bold red", "inconclusive": "bold yellow"}


def print_json(report: RunReport) -> None:
    print(json.dumps(report.to_dict(), indent=2))


def render_report(console: Console, report: RunReport) -> None:
    console.print(f"[bold]cfheal {report.command}[/]  run {report.run_id}")
    _render_diagnosis(console, report)
    _render_hosts(console, report)
    # An executed plan was already shown before the confirmation; the rollout table replaces it.
    if report.plan is not None and report.rollout is None:
        render_plan(console, report.plan)
    if report.rollout is not None:
        _render_rollout(console, report)
    if report.upgrade_request is not None:
        _render_upgrade_request(console, report.upgrade_request)
    if report.outcome is not None:
        style = _OUTCOME_STYLE.get(report.outcome, "bold")
        console.print(f"\nOutcome: [{style}]{report.outcome}[/]: {report.reason}")
    if report.timings_ms:
        console.print("Timings: " + ", ".join(f"{phase} {ms / 1000:.1f}s" for phase, ms in report.timings_ms.items()))


def _render_diagnosis(console: Console, report: RunReport) -> None:
    diagnosis = report.diagnosis
    if diagnosis is None:
        return
    style = _DIAGNOSIS_STYLE.get(str(diagnosis.kind), "bold")
    console.print(f"\nDiagnosis: [{style}]{diagnosis.kind}[/]: {diagnosis.reason}")

    table = Table(title="Handshakes", title_justify="left")
    for column in ("target", "url", "answer", "ms", "detail"):
        table.add_column(column)
    for result in diagnosis.edge + list(diagnosis.origins.values()):
        answer = str(result.status) if result.status is not None else str(result.outcome)
        table.add_row(result.target, result.url, answer, str(result.duration_ms), " ".join((result.detail or "").split())[:40])
    console.print(table)
    if report.cloudflare is not None:
        console.print(f"Cloudflare: {report.cloudflare.summary()}")


def _render_hosts(console: Console, report: RunReport) -> None:
    if not report.hosts:
        return
    table = Table(title="Hosts (verified over SSH)", title_justify="left")
    for column in ("host", "container", "state", "restarts", "started (UTC)", "log errors", "connections", "verified"):
        table.add_column(column)
    for host in report.hosts:
        if host.error:
            table.add_row(host.host, "-", "-", "-", "-", "-", "-", f"[red]no: {host.error}[/]")
            continue
        for container in host.containers:
            connections = "?" if container.established_connections is None else str(container.established_connections)
            errors = f"[red]{container.log_errors}[/]" if container.log_errors else "0"
            table.add_row(host.host, container.name, container.state, str(container.restart_count), container.started_at[11:19], errors, connections, "[green]yes[/]")
    console.print(table)


def render_plan(console: Console, plan: Plan) -> None:
    if not plan.act:
        console.print(f"\nPlan ({plan.playbook}): nothing to do: {plan.reason}")
        return
    if plan.kind == "plan_upgrade":
        console.print(f"\nPlan ({plan.playbook}): {plan.reason}")
        return
    step = plan.step
    gate = step.readiness
    console.print(f"\nPlan ({plan.playbook}): {plan.reason}")
    for index, batch in enumerate(plan.batches, start=1):
        console.print(f"  batch {index}: restart {', '.join(target.label for target in batch)}")
    console.print(
        f"  each batch: stop grace {step.stop_grace_period:g}s; gate: running, restart count stable for {gate.stable_for:g}s"
        f"{', origin answers 101' if gate.origin_must_answer else ''}, within {gate.timeout:g}s; "
        f"pause {step.pause_between_batches:g}s between batches; abort at the first failed gate"
    )
    console.print(f"  then: probe the edge until a quorum answers 101, for up to {plan.confirm.timeout:g}s")


def _render_rollout(console: Console, report: RunReport) -> None:
    table = Table(title="Rollout", title_justify="left")
    for column in ("batch", "containers", "outcome", "seconds", "reason"):
        table.add_column(column)
    for batch in report.rollout.batches:
        style = {"passed": "green", "failed": "red"}.get(batch.outcome, "dim")
        table.add_row(str(batch.index), ", ".join(batch.targets), f"[{style}]{batch.outcome}[/]", f"{batch.duration_ms / 1000:.1f}", batch.reason)
    console.print(table)


def _render_upgrade_request(console: Console, request: dict) -> None:
    call = request["api_call"]
    console.print(
        f"\nPlan-upgrade request {request['id']} ({request['status']}): {request['zone_name']} "
        f"{request['current_plan']['name']} -> {request['target_plan']['name']} "
        f"({request['target_plan']['price']:g} {request['target_plan']['currency']} {request['frequency']})"
    )
    console.print(f"  call on approval: {call['method']} {call['path']} {json.dumps(call['body'])}")


def render_history(console: Console, runs: list[dict]) -> None:
    if not runs:
        console.print("no runs recorded yet")
        return
    table = Table(title="Runs, newest first", title_justify="left")
    for column in ("run", "command", "started (UTC)", "diagnosis", "outcome", "reason"):
        table.add_column(column)
    for run in runs:
        diagnosis = (run.get("diagnosis") or {}).get("kind", "-")
        outcome = run.get("outcome") or "running"
        style = _OUTCOME_STYLE.get(outcome, "")
        table.add_row(run["run_id"], run["command"], run["started_at"][:19], diagnosis, f"[{style}]{outcome}[/]" if style else outcome, (run.get("reason") or "")[:80])
    console.print(table)


def render_stored_run(console: Console, run: dict) -> None:
    diagnosis = run.get("diagnosis") or {}
    console.print(f"[bold]run {run['run_id']}[/] ({run['command']}), started {run['started_at']}, finished {run.get('finished_at') or 'never'}")
    console.print(f"Diagnosis: {diagnosis.get('kind', '-')}: {diagnosis.get('reason', '')}")
    for host in run.get("hosts") or []:
        state = host["error"] or ", ".join(f"{c['name']} {c['state']} (log errors {c['log_errors']}, connections {c['established_connections']})" for c in host["containers"])
        console.print(f"  host {host['host']}: {state}")
    plan = run.get("plan") or {}
    if plan:
        console.print(f"Plan: {plan.get('reason')}")
    for batch in (run.get("rollout") or {}).get("batches") or []:
        console.print(f"  batch {batch['index']}: {', '.join(batch['targets'])}: {batch['outcome']} in {batch['duration_ms'] / 1000:.1f}s {batch['reason']}")
    if run.get("upgrade_request"):
        request = run["upgrade_request"]
        console.print(f"Plan-upgrade request {request['id']}: {request['status']}")
    style = _OUTCOME_STYLE.get(run.get("outcome") or "", "bold")
    console.print(f"Outcome: [{style}]{run.get('outcome') or 'running'}[/]: {run.get('reason') or ''}")
    if run.get("timings_ms"):
        console.print("Timings: " + ", ".join(f"{phase} {ms / 1000:.1f}s" for phase, ms in run["timings_ms"].items()))
