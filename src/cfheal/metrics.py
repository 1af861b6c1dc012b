"""Prometheus metrics of watch: probes, diagnoses, actions, durations, breaker and pause."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .diagnosis import Diagnosis


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.evaluations = Counter("cfheal_evaluations_total", "Evaluations of the edge and origins.", registry=self.registry)
        self.probes = Counter("cfheal_probes_total", "WebSocket handshake probes by target and outcome.", ["target", "outcome"], registry=self.registry)
        self.diagnoses = Counter("cfheal_diagnoses_total", "Diagnoses made, by kind.", ["kind"], registry=self.registry)
        self.runs = Counter("cfheal_runs_total", "Remediation runs, by outcome.", ["outcome"], registry=self.registry)
        self.phase_seconds = Histogram(
            "cfheal_phase_duration_seconds",
            "Duration of each phase of a remediation run.",
            ["phase"],
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.breaker_open = Gauge("cfheal_breaker_open", "1 while the breaker stops watch from acting.", registry=self.registry)
        self.paused = Gauge("cfheal_paused", "1 while an operator has paused watch.", registry=self.registry)
        self.streak = Gauge("cfheal_fault_streak", "Consecutive evaluations that found the edge connection limit.", registry=self.registry)

    def observe_diagnosis(self, diagnosis: Diagnosis) -> None:
        self.evaluations.inc()
        self.diagnoses.labels(str(diagnosis.kind)).inc()
        for result in diagnosis.edge:
            self.probes.labels("edge", str(result.outcome)).inc()
        for result in diagnosis.origins.values():
            self.probes.labels("origin", str(result.outcome)).inc()

    def observe_run(self, outcome: str, timings_ms: dict[str, int]) -> None:
        self.runs.labels(outcome).inc()
        for phase, milliseconds in timings_ms.items():
            self.phase_seconds.labels(phase).observe(milliseconds / 1000)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
