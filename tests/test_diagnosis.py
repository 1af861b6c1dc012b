from cfheal.diagnosis import DiagnosisKind, diagnose, summarize_probes
from cfheal.probes import FailureSide, ProbeOutcome, ProbeResult


def _probe(status: int | None, outcome: ProbeOutcome, target: str = "edge") -> ProbeResult:
    return ProbeResult(target, "ws://edge.test/ws/", outcome, status, 5)


OK = _probe(101, ProbeOutcome.OK)
LIMITED = _probe(502, ProbeOutcome.LIMIT_SUSPECTED)
ORIGINS_OK = {"h1/c": _probe(101, ProbeOutcome.OK, "h1/c"), "h2/c": _probe(101, ProbeOutcome.OK, "h2/c")}


class TestDiagnose:
    def test_limit_when_quorum_of_edge_502_and_origins_ok(self):
        diagnosis = diagnose([LIMITED] * 4 + [OK], ORIGINS_OK, quorum=3)

        assert diagnosis.kind is DiagnosisKind.EDGE_CONNECTION_LIMIT
        assert "4 of 5" in diagnosis.reason
        assert "502" in diagnosis.reason

    def test_healthy_when_quorum_of_edge_101(self):
        diagnosis = diagnose([OK, OK, OK, LIMITED, LIMITED], ORIGINS_OK, quorum=3)

        assert diagnosis.kind is DiagnosisKind.HEALTHY

    def test_origin_failure_wins_over_failing_edge(self):
        origins = {**ORIGINS_OK, "h3/c": _probe(503, ProbeOutcome.LIMIT_SUSPECTED, "h3/c")}

        diagnosis = diagnose([LIMITED] * 5, origins, quorum=3)

        assert diagnosis.kind is DiagnosisKind.ORIGIN_FAILURE
        assert "h3/c (HTTP 503)" in diagnosis.reason

    def test_inconclusive_below_quorum_names_what_was_seen(self):
        edge = [LIMITED, LIMITED, OK, OK, _probe(None, ProbeOutcome.TIMEOUT)]

        diagnosis = diagnose(edge, ORIGINS_OK, quorum=3)

        assert diagnosis.kind is DiagnosisKind.INCONCLUSIVE
        assert "2x 502 (limit_suspected)" in diagnosis.reason
        assert "1x no status (timeout)" in diagnosis.reason

    def test_cloudflare_52x_is_not_the_limit(self):
        edge = [_probe(522, ProbeOutcome.CLOUDFLARE_ERROR)] * 5

        diagnosis = diagnose(edge, ORIGINS_OK, quorum=3)

        assert diagnosis.kind is DiagnosisKind.INCONCLUSIVE

    def test_cloudflare_52x_quorum_blames_origin_side(self):
        timed_out = ProbeResult("edge", "wss://edge.test/ws/", ProbeOutcome.CLOUDFLARE_ERROR, 522, 5, side=FailureSide.ORIGIN, cf_ray="8f1c-FRA")

        diagnosis = diagnose([timed_out] * 4 + [OK], ORIGINS_OK, quorum=3)

        assert diagnosis.kind is DiagnosisKind.ORIGIN_FAILURE
        assert "according to Cloudflare: 4x 522 (connection timed out)" in diagnosis.reason
        assert "CF-RAY 8f1c-FRA" in diagnosis.reason
        assert "All 2 origins answered 101" in diagnosis.reason

    def test_proxy_502_quorum_is_not_the_limit(self):
        proxied = ProbeResult("edge", "wss://edge.test/ws/", ProbeOutcome.PROXY_ERROR, 502, 5, side=FailureSide.ORIGIN, server="nginx")

        diagnosis = diagnose([proxied] * 3 + [OK, OK], ORIGINS_OK, quorum=3)

        assert diagnosis.kind is DiagnosisKind.ORIGIN_FAILURE
        assert "3x 502 from nginx" in diagnosis.reason

    def test_mixed_failures_behind_edge_reach_quorum(self):
        cloudflare = ProbeResult("edge", "wss://edge.test/ws/", ProbeOutcome.CLOUDFLARE_ERROR, 521, 5, side=FailureSide.ORIGIN)
        proxied = ProbeResult("edge", "wss://edge.test/ws/", ProbeOutcome.PROXY_ERROR, 503, 5, side=FailureSide.ORIGIN, server="envoy")

        diagnosis = diagnose([cloudflare, cloudflare, proxied, OK, OK], ORIGINS_OK, quorum=3)

        assert diagnosis.kind is DiagnosisKind.ORIGIN_FAILURE
        assert "2x 521 (web server is down)" in diagnosis.reason
        assert "1x 503 from envoy" in diagnosis.reason

    def test_failures_behind_edge_below_quorum_stay_healthy(self):
        cloudflare = ProbeResult("edge", "wss://edge.test/ws/", ProbeOutcome.CLOUDFLARE_ERROR, 524, 5, side=FailureSide.ORIGIN)

        diagnosis = diagnose([cloudflare, cloudflare, OK, OK, OK], ORIGINS_OK, quorum=3)

        assert diagnosis.kind is DiagnosisKind.HEALTHY

    def test_unknown_side_52x_is_inconclusive(self):
        unattributed = ProbeResult("edge", "wss://edge.test/ws/", ProbeOutcome.CLOUDFLARE_ERROR, 530, 5, side=FailureSide.UNKNOWN)

        diagnosis = diagnose([unattributed] * 5, ORIGINS_OK, quorum=3)

        assert diagnosis.kind is DiagnosisKind.INCONCLUSIVE
        assert "5x 530 (cloudflare_error)" in diagnosis.reason


def test_summarize_probes_counts_each_answer():
    assert summarize_probes([LIMITED, LIMITED, OK]) == "2x 502 (limit_suspected), 1x 101 (ok)"
