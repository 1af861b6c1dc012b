"""Benchmark cfheal on the lab against the floor and Ansible, and print the ratios.

Run it through bench/run, which installs the bench extras and holds the lab lock for the
whole run. bench/README.md explains each figure and its goal.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The lab's modules import each other by bare name.
sys.path.insert(0, str(REPO / "lab"))

import configs  # noqa: E402
import engine as lab_engine  # noqa: E402
import sshd as lab_sshd  # noqa: E402
from layout import HOSTS  # noqa: E402
import labparts  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402
from configs import BENCH_GATES, ZERO_WAITS  # noqa: E402
from measure import BenchError, lab  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
# Loopback ports for watch's trigger endpoint, away from its default 9470.
DETECTION_LISTEN = "127.0.0.1:9481"
AT_REST_LISTEN = "127.0.0.1:9482"
DETECTION_INTERVAL_S = 1.0
DETECTION_SETTLE = 3
ROLLOUT_METHODS = ("floor", "cfheal_bench_gates", "cfheal_zero_waits", "ansible")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def rotated(items: list, turn: int) -> list:
    """Return ``items`` rotated by ``turn``, so each method takes every position in turn."""
    shift = turn % len(items)
    return items[shift:] + items[:shift]


def describe(sample: dict) -> str:
    return ", ".join(f"{key} {value:.3f}" for key, value in sample.items() if isinstance(value, float))


# Sections. Each returns the raw samples that report.py turns into figures.

def rollout_section(count: int, repetitions: int, work: Path, section: dict) -> None:
    """Floor, cfheal (two gate settings) and Ansible, alternating, each on a saturated edge.

    Samples go into ``section`` as they are taken, so a failure keeps the earlier ones.
    """
    backends = labparts.lab_backends()
    extras = labparts.extra_backend_plan(count)
    if extras:
        say(f"rollout {count}: starting {len(extras)} extra backend containers")
        labparts.start_extra_backends(extras)
    backends += extras
    try:
        hosts = configs.host_entries(backends)
        state_dir = work / f"state-rollout-{count}"
        config = {
            gates: configs.write_config(
                work / f"rollout-{count}-{gates.name.replace(' ', '-')}.yaml",
                playbook=configs.write_playbook(work / f"playbook-{gates.name.replace(' ', '-')}.yaml", gates),
                state_dir=state_dir,
                hosts=hosts,
            )
            for gates in (BENCH_GATES, ZERO_WAITS)
        }
        inventory = configs.write_ansible_inventory(work / f"inventory-{count}.yaml", backends) if extras else None
        methods: dict[str, Callable[[], dict]] = {
            "floor": lambda: measure.floor_rollout(backends),
            "cfheal_bench_gates": lambda: measure.cfheal_rollout(config[BENCH_GATES]),
            "cfheal_zero_waits": lambda: measure.cfheal_rollout(config[ZERO_WAITS]),
            "ansible": lambda: measure.ansible_rollout(work, inventory, backends),
        }
        samples: dict[str, list[dict]] = {name: [] for name in ROLLOUT_METHODS}
        section.update(backends=[f"{b.host.name}/{b.name}" for b in backends], samples=samples, saturate_retries=[])
        for turn in range(repetitions):
            for name in rotated(list(ROLLOUT_METHODS), turn):
                measure.saturate(section["saturate_retries"])
                sample = methods[name]()
                samples[name].append(sample)
                say(f"rollout {count} #{turn + 1} {name}: {describe(sample)}")
    finally:
        if extras:
            labparts.remove_extra_backends()


def detection_section(repetitions: int, work: Path, section: dict) -> None:
    state_dir = work / "state-detection"
    config = configs.write_config(
        work / "detection.yaml",
        playbook=configs.write_playbook(work / "playbook-bench-gates.yaml", BENCH_GATES),
        state_dir=state_dir,
        hosts=configs.host_entries(labparts.lab_backends()),
        watch={"interval": f"{DETECTION_INTERVAL_S:g}s", "settle_evaluations": DETECTION_SETTLE, "settle_time": "0s", "listen": DETECTION_LISTEN},
    )
    section.update(interval_s=DETECTION_INTERVAL_S, settle_evaluations=DETECTION_SETTLE, samples=[], saturate_retries=[])
    for turn in range(repetitions):
        # A fresh state directory: no cooldown, budget or breaker left by the previous turn.
        shutil.rmtree(state_dir, ignore_errors=True)
        lab("release")
        sample = measure.detection(config, DETECTION_LISTEN, interval_s=DETECTION_INTERVAL_S, settle=DETECTION_SETTLE, retries=section["saturate_retries"])
        section["samples"].append(sample)
        say(f"detection #{turn + 1}: {describe(sample)}")


def fanout_section(sizes: list[int], repetitions: int, work: Path) -> dict:
    lab("release")
    hosts = labparts.bench_hosts(max(sizes))
    say(f"fan-out: starting {len(hosts)} sshd instances on {hosts[0].address}-{hosts[-1].address}")
    try:
        labparts.start_bench_hosts(hosts)
        playbook = configs.write_playbook(work / "playbook-bench-gates.yaml", BENCH_GATES)
        config = {
            size: configs.write_fanout_config(work / f"fanout-{size}.yaml", playbook=playbook, state_dir=work / "state-fanout", hosts=hosts[:size], backends=labparts.lab_backends())
            for size in sizes
        }
        sshd_pids = [pid for pid in map(lab_sshd.sshd_pid, hosts) if pid is not None]
        dockerd_pids = [pid for pid in map(lab_engine.dockerd_pid, HOSTS) if pid is not None]
        samples: dict[str, list[dict]] = {str(size): [] for size in sizes}
        for turn in range(repetitions):
            for size in rotated(list(sizes), turn):
                sample = measure.fanout_check(config[size], {host.address for host in hosts[:size]}, sshd_pids=sshd_pids, dockerd_pids=dockerd_pids)
                samples[str(size)].append(sample)
                say(f"fan-out {size} #{turn + 1}: {describe(sample)}, max connections per host {sample['max_connections_per_host']}")
        return {"samples": samples}
    finally:
        stopped = labparts.stop_bench_hosts(hosts)
        say(f"fan-out: stopped {len(stopped)} sshd instances")


def watch_section(evaluations: int, repetitions: int, work: Path) -> dict:
    lab("release")
    config = configs.write_config(
        work / "watch-at-rest.yaml",
        playbook=configs.write_playbook(work / "playbook-bench-gates.yaml", BENCH_GATES),
        state_dir=work / "state-watch",
        hosts=configs.host_entries(labparts.lab_backends()),
        edge={"probes": 1, "quorum": 1, "spacing": "0s"},
        watch={"interval": "0s", "listen": AT_REST_LISTEN},
    )
    runs = []
    for turn in range(repetitions):
        run = measure.watch_at_rest(config, AT_REST_LISTEN, evaluations)
        runs.append(run)
        say(f"watch at rest #{turn + 1}: {run['evaluations']} evaluations in {run['duration_s']:.1f} s, RSS {run['early']['rss_kib']} KiB at {run['early']['evaluations']} -> {run['late']['rss_kib']} KiB at {run['late']['evaluations']}, CPU {run['cpu_per_evaluation_ms']:.2f} ms per evaluation")
    return {"evaluations": evaluations, "runs": runs}


def profile_rollout(out_dir: Path, work: Path) -> dict:
    """Profile one 3-backend rollout with zero waits (see profile_rollout.py)."""
    config = configs.write_config(
        work / "profile-rollout.yaml",
        playbook=configs.write_playbook(work / "playbook-zero-waits.yaml", ZERO_WAITS),
        state_dir=work / "state-profile",
        hosts=configs.host_entries(labparts.lab_backends()),
    )
    prefix = out_dir / "profile-rollout"
    finished = measure.run_process([str(measure.VENV_BIN / "python"), str(REPO / "bench" / "profile_rollout.py"), str(config), str(prefix)])
    if finished.returncode != 0:
        raise BenchError(f"profile_rollout.py exited {finished.returncode}: {(finished.stderr or finished.stdout).strip()[-500:]}")
    say(f"profile: {finished.stdout.strip()}; call tree in {prefix}.txt")
    return {"text": str(prefix.with_suffix(".txt")), "html": str(prefix.with_suffix(".html")), "result": finished.stdout.strip()}


# Bookkeeping.

def metadata(args: argparse.Namespace) -> dict:
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], capture_output=True, text=True, cwd=REPO).stdout.strip()

    changed = git("status", "--porcelain", "--", "src")
    # Others may edit src/ in this checkout while the benchmark runs. The hash of the diff
    # distinguishes two runs on different uncommitted code.
    diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], capture_output=True, cwd=REPO).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.machine())
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD") + (f" + uncommitted src/ diff {hashlib.sha256(diff).hexdigest()[:8]}" if changed else ""),
        "machine": f"{os.cpu_count()} CPUs, {cpu}",
        "python": platform.python_version(),
        "versions": {name: version(name) for name in ("cfheal", "ansible-core", "paramiko", "docker", "websockets")},
        "repetitions": args.repetitions,
        "gates": {gates.name: vars(gates) for gates in (BENCH_GATES, ZERO_WAITS)},
    }


def clean_leftovers() -> None:
    """Remove what an interrupted earlier run may have left: extra containers, extra sshds."""
    removed = labparts.remove_extra_backends()
    stopped = labparts.stop_bench_hosts(labparts.bench_hosts(50))
    if removed or stopped:
        say(f"removed leftovers of an earlier run: {', '.join(removed + stopped)}")


def run_section(results: dict, section: dict, key: str, name: str, action: Callable[[dict], dict | None]) -> None:
    """Run one section into ``section[key]``. A failure goes to results["errors"], and the next section runs.

    ``action`` either fills the dictionary it is given as it goes or returns its samples.
    """
    started = time.monotonic()
    section[key] = {}
    try:
        returned = action(section[key])
        if returned is not None:
            section[key] = returned
    except Exception as error:  # noqa: BLE001 - one failed section must not lose the others' samples
        results.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
        say(f"{name} failed after {time.monotonic() - started:.0f} s: {type(error).__name__}: {error}")
        return
    say(f"{name}: done in {time.monotonic() - started:.0f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repetitions", type=int, default=5, help="repetitions of each rollout, detection and fan-out measurement (default 5)")
    parser.add_argument("--watch-evaluations", type=int, default=5000, help="evaluations of each watch-at-rest run (default 5000)")
    parser.add_argument("--watch-repetitions", type=int, default=3, help="watch-at-rest runs (default 3)")
    parser.add_argument("--fanout-sizes", default="1,10,50", help="host counts for cfheal check, the first being the baseline (default 1,10,50; at most 250)")
    parser.add_argument("--sections", default="rollout,detection,fanout,watch", help="comma-separated sections to run (default: all)")
    args = parser.parse_args()
    args.sizes = [int(size) for size in args.fanout_sizes.split(",")]
    args.sections = set(args.sections.split(","))
    unknown = args.sections - {"rollout", "detection", "fanout", "watch"}
    if unknown or args.repetitions < 1 or not 1 <= max(args.sizes) <= 250:
        parser.error(f"invalid --sections {sorted(unknown)}, --repetitions or --fanout-sizes")
    return args


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    results: dict = {"meta": metadata(args)}
    out_dir = RESULTS_DIR / results["meta"]["started_at"].replace(":", "").replace("+0000", "Z")
    work = out_dir / "work"
    work.mkdir(parents=True)
    say(f"bench: results in {out_dir}")

    lab("up")
    lab("reset")
    try:
        clean_leftovers()
        run_section(results, results, "context", "context", lambda _: measure.round_trips(configs.LAB_CONFIG))
        if "rollout" in args.sections:
            results["rollout"] = {}
            for count in (3, 10):
                run_section(results, results["rollout"], str(count), f"rollout {count}", lambda section, count=count: rollout_section(count, args.repetitions, work, section))
        if "detection" in args.sections:
            run_section(results, results, "detection", "detection", lambda section: detection_section(args.repetitions, work, section))
        if "fanout" in args.sections:
            run_section(results, results, "fanout", "fanout", lambda _: fanout_section(args.sizes, args.repetitions, work))
        if "watch" in args.sections:
            run_section(results, results, "watch", "watch", lambda _: watch_section(args.watch_evaluations, args.watch_repetitions, work))

        figures = report.build_figures(results)
        if any(figure.met is False and "floor" in figure.name for figure in figures):
            run_section(results, results, "profile", "profile", lambda _: profile_rollout(out_dir, work))
    finally:
        clean_leftovers()
        lab("reset")

    results["meta"]["wall_s"] = time.monotonic() - started
    table = report.markdown_table(figures)
    (out_dir / "bench.md").write_text(table)
    report.write_json(out_dir / "bench.json", results, figures)
    report.write_chart(out_dir / "bench.png", results)
    for name in ("bench.md", "bench.json", "bench.png"):
        shutil.copyfile(out_dir / name, RESULTS_DIR / f"latest-{name}")

    print()
    print(table)
    say(f"bench: done in {results['meta']['wall_s']:.0f} s; {out_dir}/bench.json, bench.md, bench.png")
    for name, message in results.get("errors", {}).items():
        say(f"bench: section {name} failed: {message}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
