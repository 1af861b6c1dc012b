"""Plan-upgrade requests: prepared with evidence, reviewed by a person, submitted once.

A request is a document in the state directory (JSON for programs, Markdown for people)
holding the zone, its current and target plans, the evidence, and the exact API call that
approval will send. Submitting re-reads the zone's plan first and does nothing if it changed.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from .cloudflare import CloudflareAPI, CloudflareAPIError, RatePlan
from .errors import CfhealError

log = structlog.get_logger("cfheal.upgrades")

PENDING, SUBMITTED, FAILED, SUPERSEDED = "pending", "submitted", "failed", "superseded"


class UpgradeError(CfhealError):
    """A plan-upgrade request cannot be prepared, found or submitted."""


@dataclass
class UpgradeRequest:
    id: str
    created_at: str
    run_id: str
    status: str
    zone_id: str
    zone_name: str
    current_plan: dict[str, Any]
    target_plan: dict[str, Any]
    frequency: str
    api_call: dict[str, Any]
    evidence: dict[str, Any] = field(default_factory=dict)
    submitted_at: str | None = None
    response: dict[str, Any] | None = None
    status_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_target(current: RatePlan, plans: list[RatePlan], target: str) -> RatePlan:
    """Pick the plan to move to: ``next_tier`` (the cheapest dearer plan) or one named by id."""
    open_plans = [plan for plan in plans if plan.can_subscribe and not plan.is_subscribed]
    if target == "next_tier":
        dearer = sorted((plan for plan in open_plans if plan.price > current.price), key=lambda plan: plan.price)
        if not dearer:
            raise UpgradeError(f"no plan above {current.name} ({current.legacy_id}) can be subscribed to for this zone; contact Cloudflare sales")
        return dearer[0]

    for plan in plans:
        if target in (plan.legacy_id, plan.id, plan.name):
            if not plan.can_subscribe:
                raise UpgradeError(f"plan {target!r} is listed but this zone cannot subscribe to it (can_subscribe is false)")
            if plan.legacy_id == current.legacy_id:
                raise UpgradeError(f"the zone is already on {plan.name} ({plan.legacy_id})")
            return plan
    known = ", ".join(plan.legacy_id for plan in plans) or "none"
    raise UpgradeError(f"plan {target!r} is not among the zone's available plans ({known}); correct the playbook's target")


def prepare_request(api: CloudflareAPI, *, target: str, frequency: str | None, run_id: str, evidence: dict[str, Any]) -> UpgradeRequest:
    """Read the zone, its plans and subscription, and build the request; sends no write."""
    zone_name, current = api.zone()
    plans = api.available_plans()
    subscription = api.subscription()
    chosen = choose_target(current, plans, target)
    frequency = frequency or chosen.frequency
    create = subscription is None

    path = f"/zones/{api.settings.zone_id}/subscription"
    body = {"frequency": frequency, "rate_plan": {"id": chosen.legacy_id, "public_name": chosen.name}}
    request = UpgradeRequest(
        id=f"upg-{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(2)}",
        created_at=_now(),
        run_id=run_id,
        status=PENDING,
        zone_id=api.settings.zone_id,
        zone_name=zone_name,
        current_plan=asdict(current),
        target_plan=asdict(chosen),
        frequency=frequency,
        api_call={"method": "POST" if create else "PUT", "path": path, "body": body},
        evidence=evidence,
    )
    log.info("upgrade_request_prepared", request_id=request.id, zone=zone_name, current_plan=current.legacy_id, target_plan=chosen.legacy_id)
    return request


def submit_request(api: CloudflareAPI, request: UpgradeRequest) -> UpgradeRequest:
    """Send the plan change once, unless the zone's plan changed since the request was prepared."""
    if request.status != PENDING:
        raise UpgradeError(f"request {request.id} is {request.status}, not pending; nothing was sent")

    _, current = api.zone()
    if current.legacy_id != request.current_plan["legacy_id"]:
        request.status = SUPERSEDED
        request.status_reason = f"the zone moved from {request.current_plan['legacy_id']} to {current.legacy_id} since the request was prepared; nothing was sent"
        log.warning("upgrade_request_superseded", request_id=request.id, reason=request.status_reason)
        return request

    target = RatePlan(**request.target_plan)
    create = request.api_call["method"] == "POST"
    request.submitted_at = _now()
    try:
        request.response = api.change_plan(target, frequency=request.frequency, create=create)
    except CloudflareAPIError as error:
        # Never retried: a purchase sent twice could bill twice.
        request.status = FAILED
        request.status_reason = f"{error}; nothing is retried automatically: check the zone's plan in the dashboard before approving a new request"
        log.error("upgrade_request_failed", request_id=request.id, error=str(error))
        return request

    request.status = SUBMITTED
    request.status_reason = f"Cloudflare accepted the change to {target.name}"
    log.info("upgrade_request_submitted", request_id=request.id, target_plan=target.legacy_id)
    return request


def save_request(state_dir: Path, request: UpgradeRequest) -> Path:
    directory = state_dir / "requests"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{request.id}.json"
    path.write_text(json.dumps(request.to_dict(), indent=2))
    (directory / f"{request.id}.md").write_text(render_markdown(request))
    return path


def load_request(state_dir: Path, request_id: str) -> UpgradeRequest:
    path = state_dir / "requests" / f"{Path(request_id).name}.json"
    try:
        return UpgradeRequest(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise UpgradeError(f"no request {request_id!r} in {path.parent}; list them with cfheal requests") from None
    except (ValueError, TypeError) as error:
        raise UpgradeError(f"request file {path} is unreadable: {error}") from None


def list_requests(state_dir: Path) -> list[UpgradeRequest]:
    directory = state_dir / "requests"
    if not directory.is_dir():
        return []
    requests = [load_request(state_dir, path.stem) for path in sorted(directory.glob("*.json"))]
    return sorted(requests, key=lambda request: request.created_at, reverse=True)


def render_markdown(request: UpgradeRequest) -> str:
    current, target = request.current_plan, request.target_plan
    call = request.api_call
    lines = [
        f"# Plan upgrade request {request.id}",
        "",
        f"- Status: **{request.status}**{f' ({request.status_reason})' if request.status_reason else ''}",
        f"- Zone: {request.zone_name} (`{request.zone_id}`)",
        f"- Current plan: {current['name']} (`{current['legacy_id']}`, {current['price']:g} {current['currency']} {current['frequency']})",
        f"- Target plan: {target['name']} (`{target['legacy_id']}`, {target['price']:g} {target['currency']} {request.frequency})",
        f"- Prepared by run `{request.run_id}` at {request.created_at}",
        "",
        "## Evidence",
        "",
        "```json",
        json.dumps(request.evidence, indent=2),
        "```",
        "",
        "## The call approval sends, once",
        "",
        f"`{call['method']} {call['path']}`",
        "",
        "```json",
        json.dumps(call["body"], indent=2),
        "```",
        "",
        f"Approve with `cfheal approve {request.id} -c <config>`; the zone's plan is read again first.",
    ]
    return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
