"""The cfheal command line: check, run (with --dry-run), validate."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import click
import httpx
import structlog
from rich.console import Console

from . import __version__
from ._logging import configure_logging
from ._render import print_json, render_history, render_plan, render_report, render_stored_run
from .config import Config, load_config
from .controller import Controller, RunReport, is_fault, start_report
from .errors import CfhealError, ConfigError
from .policy import Plan, Playbook, load_playbook
from .state import LockHeld, Store, run_lock
from .metrics import Metrics
from .notify import Notifier
from .triggers import TriggerServer
from .watch import BREAKER, PAUSE, RESUMED, Watcher
from .upgrades import PENDING, SUBMITTED, list_requests, load_request, render_markdown, save_request, submit_request

EXIT_OK = 0
EXIT_FAULT = 1
EXIT_BAD_INPUT = 2

_config_option = click.option("-c", "--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Configuration file (YAML).")
_output_option = click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Result format on stdout.")


@click.group()
@click.version_option(__version__, prog_name="cfheal")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default="auto", show_default=True, help="Log lines on stderr: JSON, readable, or JSON unless stderr is a terminal.")
@click.option("--debug", is_flag=True, help="Log debug events, including those of paramiko, docker and websockets.")
def main(log_format: str, debug: bool) -> None:
    """Heal WebSocket services whose Cloudflare edge hit its concurrent-connection limit."""
    configure_logging(log_format, debug=debug)


@main.command()
@_config_option
def validate(config_path: Path) -> None:
    """Check the configuration and its playbook, and exit non-zero if either is invalid."""
    config, playbook = _load(config_path)
    click.echo(f"{config_path}: valid; playbook {playbook.name!r} ({config.playbook}); {len(config.hosts)} host(s)")


@main.command()
@_config_option
@_output_option
def check(config_path: Path, output: str) -> None:
    """Detect and verify; change nothing. Exit 1 when a fault is found."""
    config, playbook = _load(config_path)
    console = _console(output)
    report = start_report("check")

    controller = Controller(config, playbook, notify=_progress(console, output))
    try:
        _guard(lambda: controller.check(report))
    finally:
        controller.close()
    report.outcome = "checked"
    report.reason = report.diagnosis.reason
    # Without a finish time, a later history or watch would report this check as a dead run.
    report.finished_at = report.finished_at or datetime.now(UTC).isoformat(timespec="seconds")
    _save(config, report)

    _show(console, report, output)
    unverified = any(not host.verified for host in report.hosts)
    sys.exit(EXIT_FAULT if is_fault(report.diagnosis) or unverified else EXIT_OK)


@main.command()
@_config_option
@_output_option
@click.option("--dry-run", is_flag=True, help="Detect, verify and print the plan; restart nothing.")
@click.option("--yes", "-y", is_flag=True, help="Execute the plan without asking for confirmation.")
def run(config_path: Path, output: str, dry_run: bool, yes: bool) -> None:
    """Detect, verify, show the plan, and after confirmation restart the backends and confirm."""
    config, playbook = _load(config_path)
    if not dry_run and not yes and not sys.stdin.isatty():
        _fail("stdin is not a terminal, so the plan cannot be confirmed; pass --yes to execute it, or --dry-run to only see it", EXIT_BAD_INPUT)

    console = _console(output)
    report = start_report("run --dry-run" if dry_run else "run")
    controller = Controller(config, playbook, notify=_progress(console, output))
    stop = threading.Event()

    def confirm(plan: Plan) -> bool:
        # A person confirming needs the plan in front of them; --yes with --output json has no reader.
        if not (yes and output == "json"):
            render_plan(console, plan)
            console.print("[dim]Ctrl-C during the rollout stops it after the batch in flight.[/]")
        return yes or click.confirm("Execute this plan?", default=False, err=output == "json")

    store = Store(config.state_dir)
    _guard(lambda: store.start_run(report.run_id, report.command, report.started_at))
    try:
        if dry_run:
            _guard(lambda: controller.run(report, dry_run=True, confirm=confirm, should_stop=stop.is_set))
        else:
            try:
                with _stop_on_interrupt(stop, console), run_lock(config.state_dir):
                    _guard(lambda: controller.run(report, dry_run=False, confirm=confirm, should_stop=stop.is_set))
            except LockHeld as error:
                report.outcome, report.reason = "aborted", f"nothing was done: {error}"
                report.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
                _save(config, report)
                _fail(str(error), EXIT_FAULT)
    finally:
        controller.close()
    _save(config, report)

    _show(console, report, output)
    sys.exit(_run_exit_code(report))


@main.command()
@_config_option
@_output_option
def requests(config_path: Path, output: str) -> None:
    """List plan-upgrade requests, newest first."""
    config, _ = _load(config_path)
    found = _guard(lambda: list_requests(config.state_dir))
    if output == "json":
        print(json.dumps([request.to_dict() for request in found], indent=2))
        return
    if not found:
        click.echo(f"no plan-upgrade requests in {config.state_dir / 'requests'}")
        return
    for request in found:
        click.echo(f"{request.id}  {request.status:<10}  {request.zone_name}: {request.current_plan['name']} -> {request.target_plan['name']}  (run {request.run_id}, {request.created_at})")


@main.command()
@_config_option
@_output_option
@click.argument("request_id")
@click.option("--yes", "-y", is_flag=True, help="Submit without asking for confirmation.")
def approve(config_path: Path, output: str, request_id: str, yes: bool) -> None:
    """Submit plan-upgrade request REQUEST_ID to Cloudflare, once, after re-reading the zone's plan."""
    config, playbook = _load(config_path)
    if not yes and not sys.stdin.isatty():
        _fail("stdin is not a terminal, so the purchase cannot be confirmed; pass --yes to submit it", EXIT_BAD_INPUT)

    console = _console(output)
    # The lock and the status check under it make two approvers send the purchase at most once.
    with run_lock(config.state_dir):
        request = _guard(lambda: load_request(config.state_dir, request_id))
        if request.status != PENDING:
            _fail(f"request {request.id} is {request.status} ({request.status_reason or 'no detail'}); nothing was sent", EXIT_FAULT)
        if not (yes and output == "json"):
            console.print(render_markdown(request))
        if not yes and not click.confirm(f"Send {request.api_call['method']} {request.api_call['path']} to Cloudflare?", default=False, err=output == "json"):
            _fail("not approved; nothing was sent", EXIT_FAULT)

        controller = Controller(config, playbook)
        api = controller.cloudflare()
        if api is None:
            _fail(f"cannot submit: {controller.cloudflare_problem}", EXIT_FAULT)
        try:
            request = _guard(lambda: submit_request(api, request))
        finally:
            save_request(config.state_dir, request)
            controller.close()

    if output == "json":
        print(json.dumps(request.to_dict(), indent=2))
    else:
        console.print(f"Request {request.id}: [bold]{request.status}[/]: {request.status_reason}")
    sys.exit(EXIT_OK if request.status == SUBMITTED else EXIT_FAULT)


@main.command()
@_config_option
@click.option("--listen", metavar="HOST:PORT", help="Serve webhooks, triggers and /metrics here instead of watch.listen.")
@click.option("--max-evaluations", type=click.IntRange(min=1), help="Stop after this many evaluations (for benchmarks and tests).")
def watch(config_path: Path, listen: str | None, max_evaluations: int | None) -> None:
    """Evaluate on an interval and heal unattended, inside the safety envelope.

    SIGTERM or Ctrl-C stops it; a rollout in flight finishes its batch and starts no other.
    """
    config, playbook = _load(config_path)
    if listen:
        config = _guard(lambda: _with_listen(config, listen))
    store = Store(config.state_dir)
    metrics = Metrics()
    stop = threading.Event()
    watcher = Watcher(config, playbook, store=store, notifier=Notifier(config.notify), metrics=metrics, stop=stop)
    server = _guard(lambda: TriggerServer(config.watch, request_evaluation=watcher.request_evaluation, metrics=metrics.exposition, status=watcher.status))

    def request_stop(signum: int, frame) -> None:
        structlog.get_logger("cfheal.cli").warning("stop_requested", signal=signal.Signals(signum).name, effect="a batch in flight finishes; nothing new starts")
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server.start()
    try:
        _guard(lambda: watcher.run_forever(max_evaluations=max_evaluations))
    finally:
        server.stop()


def _with_listen(config: Config, listen: str) -> Config:
    from .config import WatchSettings

    try:
        settings = WatchSettings.model_validate({**config.watch.model_dump(), "listen": listen})
    except ValueError:
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9470") from None
    return config.model_copy(update={"watch": settings})


@main.command()
@_config_option
def trigger(config_path: Path) -> None:
    """Ask the running cfheal watch to evaluate now (it still settles and checks its limits)."""
    config, _ = _load(config_path)
    url = f"http://{config.watch.listen}/trigger"
    try:
        response = httpx.post(url, timeout=5, trust_env=False)
    except httpx.HTTPError as error:
        _fail(f"no cfheal watch answers on {config.watch.listen} ({type(error).__name__}); start it with cfheal watch -c {config_path}", EXIT_FAULT)
    if response.status_code != 202:
        _fail(f"cfheal watch on {config.watch.listen} answered HTTP {response.status_code}: {response.text[:200]}", EXIT_FAULT)
    click.echo(f"evaluation requested from cfheal watch on {config.watch.listen}")


@main.command()
@_config_option
@click.option("--reason", default="", help="Why, for whoever runs cfheal resume.")
def pause(config_path: Path, reason: str) -> None:
    """Stop watch from acting (it keeps evaluating) until cfheal resume."""
    config, _ = _load(config_path)
    _guard(lambda: Store(config.state_dir).set_switch(PAUSE, {"reason": reason, "by": os.environ.get("SUDO_USER") or os.environ.get("USER", "unknown")}))
    click.echo(f"paused: cfheal watch with state in {config.state_dir} will not act until cfheal resume")


@main.command()
@_config_option
def resume(config_path: Path) -> None:
    """Let watch act again: clears the pause and closes the breaker."""
    config, _ = _load(config_path)
    store = Store(config.state_dir)
    breaker = _guard(lambda: store.get_switch(BREAKER))
    cleared = [name for name in (PAUSE, BREAKER) if _guard(lambda name=name: store.clear_switch(name))]
    _guard(lambda: store.set_switch(RESUMED, {"at": time.time()}))
    if not cleared:
        click.echo("nothing to resume: watch was neither paused nor stopped by the breaker; cooldowns and the action budget start afresh")
        return
    if breaker:
        click.echo(f"breaker closed (it opened after run {breaker.get('run_id')}: {breaker.get('reason')})")
    if PAUSE in cleared:
        click.echo("pause cleared")
    click.echo("cfheal watch may act again; cooldowns and the action budget start afresh")


@main.command()
@_config_option
@_output_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Number of runs to show.")
def history(config_path: Path, output: str, limit: int) -> None:
    """Show past runs, newest first; runs left unfinished by a dead process show as interrupted."""
    config, _ = _load(config_path)
    store = Store(config.state_dir)
    _guard(store.recover_dead_runs)
    runs = _guard(lambda: store.list_runs(limit=limit))
    if output == "json":
        print(json.dumps(runs, indent=2))
        return
    render_history(_console(output), runs)


@main.command()
@_config_option
@_output_option
@click.argument("run_id")
def show(config_path: Path, output: str, run_id: str) -> None:
    """Show one run: what it saw, planned and did, with timings."""
    config, _ = _load(config_path)
    store = Store(config.state_dir)
    _guard(store.recover_dead_runs)
    run = _guard(lambda: store.get_run(run_id))
    if run is None:
        _fail(f"no run {run_id!r} in {config.state_dir}; list runs with cfheal history -c {config_path}", EXIT_FAULT)
    if output == "json":
        print(json.dumps(run, indent=2))
        return
    render_stored_run(_console(output), run)


def _run_exit_code(report: RunReport) -> int:
    if report.outcome in ("recovered", "planned"):
        return EXIT_OK
    if report.outcome == "no_action" and not is_fault(report.diagnosis):
        return EXIT_OK
    return EXIT_FAULT


class _stop_on_interrupt:
    """First Ctrl-C or SIGTERM asks the rollout to stop after the batch in flight; a second Ctrl-C quits."""

    def __init__(self, stop: threading.Event, console: Console) -> None:
        self._stop = stop
        self._console = console
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_stop_on_interrupt":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self._stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop.set()
        self._console.print("[bold yellow]Stopping after the batch in flight; no new batch will start. Ctrl-C again quits at once.[/]")


def _progress(console: Console, output: str):
    # With --output json, the log events on stderr carry the progress, so stderr stays JSON lines.
    if output == "json":
        return lambda message: None
    return lambda message: console.print(f"[dim]> {message}[/]")


def _console(output: str) -> Console:
    # With --output json, stdout carries only the JSON object, so progress goes to stderr.
    stream = sys.stderr if output == "json" else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 120)


def _load(config_path: Path) -> tuple[Config, Playbook]:
    try:
        config = load_config(config_path)
        playbook = load_playbook(config.playbook)
    except ConfigError as error:
        _fail(str(error), EXIT_BAD_INPUT)
    if playbook.upgrade is not None and config.cloudflare is None:
        _fail(f"{config_path}: playbook {config.playbook} has a plan_upgrade step, but the configuration has no cloudflare section (zone_id, account_id, api_token_file)", EXIT_BAD_INPUT)
    return config, playbook


def _guard(action):
    try:
        return action()
    except CfhealError as error:
        _fail(str(error), EXIT_FAULT)


def _save(config: Config, report: RunReport) -> None:
    try:
        Store(config.state_dir).record_run(report.to_dict())
    except (CfhealError, OSError) as error:
        click.echo(f"warning: run {report.run_id} was not recorded in {config.state_dir}: {error}", err=True)


def _show(console: Console, report: RunReport, output: str) -> None:
    if output == "json":
        print_json(report)
    else:
        render_report(console, report)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)
