"""Turn probe results into a diagnosis. Plain functions over plain data: no I/O here."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from .probes import FailureSide, ProbeOutcome, ProbeResult, cloudflare_error_meaning


class DiagnosisKind(StrEnum):
    HEALTHY = "healthy"
    EDGE_CONNECTION_LIMIT = "edge_connection_limit"
    ORIGIN_FAILURE = "origin_failure"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Diagnosis:
    kind: DiagnosisKind
    reason: str
    edge: list[ProbeResult] = field(default_factory=list)
    origins: dict[str, ProbeResult] = field(default_factory=dict)


def diagnose(edge: list[ProbeResult], origins: dict[str, ProbeResult], *, quorum: int) -> Diagnosis:
    """Decide what the probes show.

    A failing origin explains a failing edge, so origin failures are checked first. Those seen
    directly come first, then those that a quorum of edge handshakes blamed on the origin side:
    Cloudflare's 52x codes, or a 502/503 from a proxy behind the edge. The edge counts as limited
    only when a quorum of its handshakes got 502 or 503 from the edge itself.
    """
    failing = {label: result for label, result in origins.items() if not result.ok}
    if failing:
        return Diagnosis(DiagnosisKind.ORIGIN_FAILURE, _describe_failing_origins(failing), edge, origins)

    # ORIGIN_FAILURE, not INCONCLUSIVE, because the edge reports a definite failure behind it.
    # The fix lies on the origin side (firewall, DNS record, tunnel, TLS, a proxy), even though
    # cfheal's own direct probes reached every origin.
    behind_edge = [result for result in edge if result.side is FailureSide.ORIGIN]
    if len(behind_edge) >= quorum:
        return Diagnosis(DiagnosisKind.ORIGIN_FAILURE, _describe_failures_behind_edge(behind_edge, len(edge), len(origins)), edge, origins)

    outcomes = Counter(result.outcome for result in edge)
    limited = outcomes[ProbeOutcome.LIMIT_SUSPECTED]
    passed = outcomes[ProbeOutcome.OK]

    if limited >= quorum:
        statuses = sorted({result.status for result in edge if result.outcome is ProbeOutcome.LIMIT_SUSPECTED})
        reason = (
            f"{limited} of {len(edge)} edge handshakes answered "
            f"{'/'.join(map(str, statuses))} while all {len(origins)} origins answered 101"
        )
        return Diagnosis(DiagnosisKind.EDGE_CONNECTION_LIMIT, reason, edge, origins)

    if passed >= quorum:
        reason = f"{passed} of {len(edge)} edge handshakes and all {len(origins)} origins answered 101"
        return Diagnosis(DiagnosisKind.HEALTHY, reason, edge, origins)

    reason = f"no edge outcome reached the quorum of {quorum}: {summarize_probes(edge)}"
    return Diagnosis(DiagnosisKind.INCONCLUSIVE, reason, edge, origins)


def summarize_probes(results: list[ProbeResult]) -> str:
    """Summarize probes as e.g. "3x 502 (limit_suspected), 2x 101 (ok)"."""
    counts = Counter((result.status, result.outcome) for result in results)
    parts = []
    for (status, outcome), count in counts.most_common():
        shown = status if status is not None else "no status"
        parts.append(f"{count}x {shown} ({outcome})")
    return ", ".join(parts) or "no probes"


def _describe_failing_origins(failing: dict[str, ProbeResult]) -> str:
    parts = []
    for label, result in sorted(failing.items()):
        answer = f"HTTP {result.status}" if result.status is not None else result.detail or str(result.outcome)
        parts.append(f"{label} ({answer})")
    return f"{len(failing)} origin(s) failed the handshake: {', '.join(parts)}"


def _describe_failures_behind_edge(results: list[ProbeResult], probes: int, origins: int) -> str:
    """Describe edge handshakes that failed behind the edge, e.g. "5x 522 (connection timed out)"."""
    cloudflare = Counter(result.status for result in results if result.outcome is ProbeOutcome.CLOUDFLARE_ERROR)
    proxies = Counter((result.status, result.server) for result in results if result.outcome is ProbeOutcome.PROXY_ERROR)
    parts = []
    if cloudflare:
        answers = ", ".join(f"{count}x {status} ({cloudflare_error_meaning(status)})" for status, count in cloudflare.most_common())
        rays = sorted({result.cf_ray for result in results if result.cf_ray})
        parts.append(f"the origin side failed according to Cloudflare: {answers}" + (f", CF-RAY {rays[0]}" if rays else ""))
    if proxies:
        answers = ", ".join(f"{count}x {status} from {server}" for (status, server), count in proxies.most_common())
        parts.append(f"a proxy behind the edge answered instead of the edge: {answers}")
    return (
        f"{len(results)} of {probes} edge handshakes failed behind the edge, not at its connection limit: "
        f"{'; '.join(parts)}. All {origins} origins answered 101 when probed directly, "
        f"so check the path from the edge to the origins (firewall, DNS record, tunnel, TLS, proxy)"
    )
