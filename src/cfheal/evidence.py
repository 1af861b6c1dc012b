"""Cloudflare's own view of the outage, gathered as optional evidence for a diagnosis.

Nothing here decides the diagnosis: the probes do. Pool health and edge error counts are
added beside it, and any failure to read them becomes a note instead of an error, so cfheal
still diagnoses from its probes alone without a token or when Cloudflare is unreachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from .cloudflare import CloudflareAPI, CloudflareAPIError

log = structlog.get_logger("cfheal.evidence")


@dataclass
class CloudflareEvidence:
    notes: list[str] = field(default_factory=list)
    # pool id -> origin address -> healthy in every region that reported it
    pools: dict[str, dict[str, bool]] = field(default_factory=dict)
    # edge status -> requests answered by the edge without asking the origin
    edge_errors: dict[int, int] | None = None

    def summary(self) -> str:
        parts = []
        for pool_id, origins in self.pools.items():
            healthy = sum(origins.values())
            parts.append(f"pool {pool_id[:8]}: {healthy} of {len(origins)} origins healthy at Cloudflare")
        if self.edge_errors is not None:
            total = sum(self.edge_errors.values())
            parts.append(f"{total} edge 502/503 answered without the origin in the analytics window")
        return "; ".join(parts + self.notes)


def gather(api: CloudflareAPI | None, unavailable_reason: str | None) -> CloudflareEvidence:
    """Read pool health and edge error counts; every failure becomes a note."""
    evidence = CloudflareEvidence()
    if api is None:
        evidence.notes.append(unavailable_reason or "Cloudflare evidence not configured")
        return evidence

    for pool_id in api.settings.pools:
        try:
            evidence.pools[pool_id] = origin_health(api.pool_health(pool_id))
        except CloudflareAPIError as error:
            _note_failure(evidence, f"pool {pool_id} health", error)

    try:
        evidence.edge_errors = api.edge_errors()
    except CloudflareAPIError as error:
        _note_failure(evidence, "edge error analytics", error)
    return evidence


def origin_health(health: dict[str, Any]) -> dict[str, bool]:
    """Fold the region-keyed health answer into origin address -> healthy everywhere."""
    origins: dict[str, bool] = {}
    regions = health.get("pop_health", health) if isinstance(health, dict) else {}
    for region in regions.values():
        if not isinstance(region, dict):
            continue
        for entry in region.get("origins") or []:
            for address, state in entry.items():
                healthy = bool(state.get("healthy")) if isinstance(state, dict) else False
                origins[address] = origins.get(address, True) and healthy
    return origins


def _note_failure(evidence: CloudflareEvidence, what: str, error: CloudflareAPIError) -> None:
    evidence.notes.append(f"{what} unavailable: {error}")
    log.warning("cloudflare_evidence_unavailable", what=what, error=str(error))
