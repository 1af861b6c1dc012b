"""Turn the raw samples of bench.py into figures, a Markdown table, JSON and a PNG chart.

Every figure is the median of its repetitions with the minimum and maximum. A ratio is
computed per repetition from the two samples taken in that repetition, then summarized.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads


@dataclass
class Summary:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Summary | None":
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass
class Figure:
    """One row of the table: a measured value, what it is compared with, and the goal."""

    name: str
    unit: str
    measured: Summary | None
    baseline: Summary | None = None
    baseline_name: str = ""
    ratio: Summary | None = None
    goal: str = ""
    met: bool | None = None


def _values(samples: list[dict], key: str) -> list[float]:
    return [sample[key] for sample in samples]


def _ratios(numerators: list[dict], key: str, denominators: list[dict], base_key: str) -> list[float]:
    return [top[key] / bottom[base_key] for top, bottom in zip(numerators, denominators)]


def rollout_figures(count: str, section: dict) -> list[Figure]:
    samples = section.get("samples", {})
    floor, ansible = samples.get("floor", []), samples.get("ansible", [])
    figures = []
    for variant, label in (("cfheal_bench_gates", "bench gates"), ("cfheal_zero_waits", "zero waits")):
        runs = samples.get(variant, [])
        ratio = Summary.of(_ratios(runs, "rollout_s", floor, "total_s"))
        figures.append(Figure(
            f"Rollout, {count} backends, cfheal ({label}) vs floor", "s",
            Summary.of(_values(runs, "rollout_s")), Summary.of(_values(floor, "total_s")), "floor",
            ratio, "≤ 1.15", ratio is not None and ratio.median <= 1.15,
        ))
    for variant, label in (("cfheal_bench_gates", "bench gates"), ("cfheal_zero_waits", "zero waits")):
        runs = samples.get(variant, [])
        ratio = Summary.of(_ratios(runs, "phase_s", ansible, "wall_s"))
        figures.append(Figure(
            f"Rollout, {count} backends, cfheal rollout phase ({label}) vs Ansible", "s",
            Summary.of(_values(runs, "phase_s")), Summary.of(_values(ansible, "wall_s")), "ansible-playbook",
            ratio, "≤ 0.5", ratio is not None and ratio.median <= 0.5,
        ))
    if ansible and "wait_for_elapsed_s" in ansible[0]:
        figures.append(Figure(f"Rollout, {count} backends, Ansible: seconds wait_for waited, summed", "s", Summary.of(_values(ansible, "wait_for_elapsed_s"))))
    runs = samples.get("cfheal_bench_gates", [])
    figures.append(Figure(
        f"Rollout, {count} backends, whole cfheal run (bench gates) vs Ansible", "s",
        Summary.of(_values(runs, "wall_s")), Summary.of(_values(ansible, "wall_s")), "ansible-playbook",
        Summary.of(_ratios(runs, "wall_s", ansible, "wall_s")),
    ))
    return figures


def detection_figures(section: dict) -> list[Figure]:
    samples = section["samples"]
    floor = Summary.of(_values(samples, "floor_s"))
    figures = []
    for key, label in (("first_seen_s", "first evaluation that sees the limit"), ("decided_s", "watch decides (run_started)"), ("planned_s", "plan built (plan_built)"), ("healed_s", "edge answers 101 again (time to heal)")):
        figures.append(Figure(
            f"Detection: saturated → {label}", "s",
            Summary.of(_values(samples, key)), floor, "interval × settle_evaluations",
            Summary.of([sample[key] / sample["floor_s"] for sample in samples]),
        ))
    return figures


def fanout_figures(section: dict) -> list[Figure]:
    one = section["samples"].get("1", [])
    figures = []
    for count, samples in section["samples"].items():
        if count == "1":
            continue
        ratio = Summary.of(_ratios(samples, "wall_s", one, "wall_s"))
        goal = "≤ 3" if count == "50" else ""
        figures.append(Figure(
            f"cfheal check, {count} hosts vs 1 host (wall time)", "s",
            Summary.of(_values(samples, "wall_s")), Summary.of(_values(one, "wall_s")), "1 host",
            ratio, goal, (ratio.median <= 3) if goal and ratio else None,
        ))
        figures.append(Figure(
            f"cfheal check, {count} hosts vs 1 host (verify phase)", "s",
            Summary.of(_values(samples, "verify_s")), Summary.of(_values(one, "verify_s")), "1 host",
            Summary.of(_ratios(samples, "verify_s", one, "verify_s")),
        ))
    for count, samples in section["samples"].items():
        figures.append(Figure(
            f"cfheal check, {count} host(s): CPU of cfheal / of the whole machine", "CPU s",
            Summary.of(_values(samples, "cpu_s")), Summary.of(_values(samples, "machine_busy_s")), "whole machine",
            Summary.of(_ratios(samples, "cpu_s", samples, "machine_busy_s")),
        ))
        figures.append(Figure(
            f"cfheal check, {count} host(s): CPU of the hosts' SSH sessions / of the whole machine", "CPU s",
            Summary.of(_values(samples, "sshd_sessions_cpu_s")), Summary.of(_values(samples, "machine_busy_s")), "whole machine",
            Summary.of(_ratios(samples, "sshd_sessions_cpu_s", samples, "machine_busy_s")),
        ))
    every = [sample for samples in section["samples"].values() for sample in samples]
    if every:
        most = max(sample["max_connections_per_host"] for sample in every)
        figures.append(Figure(
            "cfheal check: SSH connections per host (max seen by ss, any size)", "",
            Summary.of(_values(every, "max_connections_per_host")), goal="1", met=most == 1,
        ))
        most = max(sample["max_distinct_connections_per_host"] for sample in every)
        figures.append(Figure(
            "cfheal check: distinct SSH connections per host over one check (ss samples, any size)", "",
            Summary.of(_values(every, "max_distinct_connections_per_host")), goal="1", met=most == 1,
        ))
    return figures


def watch_figures(section: dict) -> list[Figure]:
    runs = section["runs"]
    early = runs[0]["early"]["evaluations"]
    late = runs[0]["late"]["evaluations"]
    growth = Summary.of([run["rss_growth"] for run in runs])
    return [
        Figure(
            f"Watch at rest: RSS at evaluation ~{late} vs ~{early}", "MiB",
            Summary.of([run["late"]["rss_kib"] / 1024 for run in runs]), Summary.of([run["early"]["rss_kib"] / 1024 for run in runs]), f"evaluation ~{early}",
            Summary.of([1 + run["rss_growth"] for run in runs]), "< 1.05 (5% growth)", growth.max < 0.05,
        ),
        Figure("Watch at rest: CPU per evaluation (utime + stime)", "ms", Summary.of([run["cpu_per_evaluation_ms"] for run in runs])),
        Figure(f"Watch at rest: CPU per evaluation after evaluation ~{early}", "ms", Summary.of([run["cpu_per_evaluation_after_early_ms"] for run in runs])),
        Figure("Watch at rest: evaluations per second", "/s", Summary.of([run["evaluations"] / run["duration_s"] for run in runs])),
    ]


def context_figures(section: dict) -> list[Figure]:
    return [
        Figure("Context: one SSH command (true) on a lab host", "ms", Summary.of([value * 1000 for value in section["ssh_command_s"]])),
        Figure("Context: docker inspect over cfheal's SSH session vs on the engine's socket", "ms",
               Summary.of([value * 1000 for value in section["inspect_over_ssh_s"]]), Summary.of([value * 1000 for value in section["inspect_on_socket_s"]]), "socket"),
        Figure(f"Context: {section['login_shell']} -c true as sshd starts it (SSH_CLIENT set) vs without", "ms",
               Summary.of([value * 1000 for value in section["shell_as_sshd_runs_it_s"]]), Summary.of([value * 1000 for value in section["shell_without_ssh_client_s"]]), "without"),
    ]


def build_figures(results: dict) -> list[Figure]:
    figures = []
    if results.get("context"):
        figures += context_figures(results["context"])
    for count, section in results.get("rollout", {}).items():
        figures += rollout_figures(count, section)
    if results.get("detection", {}).get("samples"):
        figures += detection_figures(results["detection"])
    if results.get("fanout", {}).get("samples"):
        figures += fanout_figures(results["fanout"])
    if results.get("watch", {}).get("runs"):
        figures += watch_figures(results["watch"])
    return figures


def _format(summary: Summary | None, unit: str, digits: int = 2) -> str:
    if summary is None:
        return "—"
    suffix = f" {unit}" if unit else ""
    if summary.n == 1:
        return f"{summary.median:.{digits}f}{suffix}"
    return f"{summary.median:.{digits}f}{suffix} ({summary.min:.{digits}f}–{summary.max:.{digits}f})"


def markdown_table(figures: list[Figure]) -> str:
    lines = [
        "| Figure | Measured, median (min–max) | Compared with | Ratio, median (min–max) | Goal | Met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for figure in figures:
        baseline = f"{figure.baseline_name}: {_format(figure.baseline, figure.unit)}" if figure.baseline else ""
        met = ""
        if figure.met is not None:
            met = "yes" if figure.met else "**no**"
        lines.append(f"| {figure.name} | {_format(figure.measured, figure.unit)} | {baseline} | {_format(figure.ratio, '')} | {figure.goal} | {met} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, results: dict, figures: list[Figure]) -> None:
    document = {**results, "figures": [asdict(figure) for figure in figures]}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def _bar(axis, labels: list[str], summaries: list[Summary | None], title: str, unit: str, baselines: set[str]) -> None:
    medians = [summary.median if summary else 0 for summary in summaries]
    lower = [summary.median - summary.min if summary else 0 for summary in summaries]
    upper = [summary.max - summary.median if summary else 0 for summary in summaries]
    # cfheal's bars in blue, what they are compared with in grey.
    colors = ["#999999" if label in baselines else "#4C72B0" for label in labels]
    axis.bar(range(len(labels)), medians, yerr=[lower, upper], capsize=4, color=colors)
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel(unit)
    axis.set_title(title, fontsize=10)
    for index, value in enumerate(medians):
        top = value + upper[index]
        axis.annotate(f"{value:.2f}", (index, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)


def write_chart(path: Path, results: dict) -> None:
    """Draw the medians with min–max bars: rollouts, detection, fan-out, and watch's RSS over time."""
    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    labels, summaries = [], []
    for count, section in results.get("rollout", {}).items():
        samples = section.get("samples", {})
        for name, key in (("floor", "total_s"), ("cfheal_zero_waits", "rollout_s"), ("cfheal_bench_gates", "rollout_s"), ("cfheal_bench_gates", "phase_s"), ("ansible", "wall_s")):
            label = {"total_s": "floor", "phase_s": "cfheal phase"}.get(key, name.replace("cfheal_", "cfheal ").replace("_", " "))
            labels.append(f"{count}: {label}")
            summaries.append(Summary.of(_values(samples.get(name, []), key)))
    baselines = {label for label in labels if label.endswith(("floor", "ansible"))}
    _bar(axes[0][0], labels, summaries, "Rolling restart (rollout; cfheal phase includes SSH connect)", "seconds", baselines)

    detection = results.get("detection", {}).get("samples", [])
    keys = ("floor_s", "first_seen_s", "decided_s", "planned_s", "healed_s")
    _bar(axes[0][1], ["interval × settle", "first seen", "decided", "plan built", "healed"], [Summary.of(_values(detection, key)) for key in keys], "Detection after the edge saturates", "seconds", {"interval × settle"})

    fanout = results.get("fanout", {}).get("samples", {})
    _bar(axes[1][0], [f"{count} host(s)" for count in fanout], [Summary.of(_values(samples, "wall_s")) for samples in fanout.values()], "cfheal check wall time by host count", "seconds", {"1 host(s)"})

    run = (results.get("watch", {}).get("runs") or [None])[0]
    axis = axes[1][1]
    if run:
        # Samples taken before the first evaluation show the interpreter still importing.
        samples = [sample for sample in run["samples"] if sample["evaluations"] > 0]
        axis.plot([sample["evaluations"] for sample in samples], [sample["rss_kib"] / 1024 for sample in samples], color="#4C72B0")
        axis.axvline(run["early"]["evaluations"], color="grey", linestyle=":")
        # From zero, so that a growth of a few KiB does not look like a leak.
        axis.set_ylim(0, max(sample["rss_kib"] for sample in samples) / 1024 * 1.1)
    axis.set_xlabel("evaluations")
    axis.set_ylabel("RSS (MiB)")
    axis.set_title("cfheal watch at rest: RSS", fontsize=10)

    figure.suptitle(f"cfheal bench {results['meta']['started_at']} ({results['meta']['commit']})", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
