from cfheal.diagnosis import DiagnosisKind, diagnose, summarize_probes
from cfheal.probes import ProbeOutcome, ProbeResult


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


def test_summarize_probes_counts_each_answer():
    assert summarize_probes([LIMITED, LIMITED, OK]) == "2x 502 (limit_suspected), 1x 101 (ok)"
