"""Single measurements on the lab. Each function drives the lab once and returns seconds.

The caller holds the lab lock and repeats these. Nothing here retries a failed measurement.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import engine as lab_engine
from layout import EDGE_URL, HOSTS
from probe import probe
from procs import find_processes, stop_processes

from labparts import Backend

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
LAB_SCRIPT = REPO / "scripts" / "lab"
ANSIBLE_DIR = REPO / "bench" / "ansible"
CFHEAL = [str(VENV_BIN / "python"), "-m", "cfheal", "--log-format", "json"]
# Polling intervals of the floor and of the bench's own edge probes: short enough that
# polling adds at most about 10 ms (restart floor) or 50 ms (edge) to a figure.
FLOOR_POLL_S = 0.01
EDGE_POLL_S = 0.05
READY_TIMEOUT_S = 30
RUN_TIMEOUT_S = 300
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A measurement could not be taken. The message names the measurement and the cause."""


@dataclass
class Finished:
    """A child process that ran to its end, with its output, wall time and CPU time."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float


def run_process(command: list[str], *, timeout: float = RUN_TIMEOUT_S, env: dict | None = None) -> Finished:
    """Run ``command`` to its end. CPU time covers the process and the children it waited for."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        killer = threading.Timer(timeout, process.kill)
        killer.start()
        try:
            # os.wait4 instead of Popen.wait, because it also returns the resource usage.
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            killer.cancel()
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        finished = Finished(process.returncode, stdout.read(), stderr.read(), wall, usage.ru_utime + usage.ru_stime)
    if process.returncode == -signal.SIGKILL:
        raise BenchError(f"{' '.join(command[:6])} ... did not finish within {timeout:g} s and was killed")
    return finished


def lab(*args: str) -> str:
    """Run scripts/lab with ``args`` and return its output. Raise BenchError if it fails."""
    result = subprocess.run([str(LAB_SCRIPT), *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise BenchError(f"scripts/lab {' '.join(args)} exited {result.returncode}: {(result.stderr or result.stdout).strip()[-500:]}")
    return result.stdout


def saturate(retries: list[str] | None = None) -> float:
    """Fill the edge's connection limit and return the wall-clock time when the edge returned 502.

    When the swarm exits while saturate waits for it, saturate runs once more and the first
    error is appended to ``retries``. A process outside the lab lock that stops the swarm
    causes that; a second failure raises BenchError.
    """
    # The swarm stops by itself after 10 minutes should the benchmark die before its reset.
    try:
        lab("saturate", "--max-seconds", "600")
    except BenchError as error:
        if retries is None or "swarm" not in str(error) or "exited" not in str(error):
            raise
        retries.append(str(error))
        lab("saturate", "--max-seconds", "600")
    return time.time()


def log_events(stderr: str) -> list[dict]:
    """Parse cfheal's JSON log lines and skip the lines of other libraries."""
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def event_time(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


# 1. Rollout against the floor, and 2. against Ansible.

def floor_rollout(backends: list[Backend]) -> dict:
    """Restart each container straight through its engine's socket and poll its origin for 101.

    The sum over the batches (one container each) is the floor: no SSH, no checks, no waits.
    """
    batches = []
    for backend in backends:
        api = lab_engine.Engine(backend.host)
        started = time.monotonic()
        api.request_ok("POST", f"/containers/{backend.name}/restart", query={"t": "2"}, timeout=60)
        restarted = time.monotonic()
        while not probe(backend.origin, timeout_s=1).upgraded:
            if time.monotonic() - restarted > READY_TIMEOUT_S:
                raise BenchError(f"floor: {backend.name} on {backend.host.name} did not return 101 within {READY_TIMEOUT_S} s of its restart")
            time.sleep(FLOOR_POLL_S)
        ready = time.monotonic()
        batches.append({"restart_s": restarted - started, "ready_s": ready - restarted})
    return {
        "total_s": sum(batch["restart_s"] + batch["ready_s"] for batch in batches),
        "restart_s": sum(batch["restart_s"] for batch in batches),
        "ready_s": sum(batch["ready_s"] for batch in batches),
    }


def cfheal_rollout(config: Path) -> dict:
    """Run ``cfheal run --yes`` on a saturated edge and take the rollout's times from its report."""
    finished = run_process([*CFHEAL, "run", "-c", str(config), "--yes", "--output", "json"])
    try:
        report = json.loads(finished.stdout)
    except ValueError:
        raise BenchError(f"cfheal run exited {finished.returncode} without a JSON report: {finished.stderr.strip()[-500:]}") from None
    rollout = report.get("rollout") or {}
    if report.get("outcome") != "recovered" or rollout.get("outcome") != "completed":
        raise BenchError(f"cfheal run ended {report.get('outcome')} (rollout {rollout.get('outcome')}): {report.get('reason')}")

    # Per batch, batch_started -> container_restarted is the restart request with the state
    # read before it, and container_restarted -> readiness_gate_passed is the readiness gate.
    marks: dict[str, dict[int, float]] = defaultdict(dict)
    batch = 0
    for event in log_events(finished.stderr):
        name = event.get("event")
        if name == "batch_started":
            batch = event["batch"]
        if name in ("batch_started", "container_restarted", "readiness_gate_passed"):
            marks[name][batch] = event_time(event)
    restart = sum(marks["container_restarted"][index] - marks["batch_started"][index] for index in marks["batch_started"])
    gate = sum(marks["readiness_gate_passed"][index] - marks["container_restarted"][index] for index in marks["batch_started"])
    return {
        "rollout_s": rollout["duration_ms"] / 1000,
        "batches_s": sum(batch["duration_ms"] for batch in rollout["batches"]) / 1000,
        "restart_s": restart,
        "gate_s": gate,
        "phase_s": report["timings_ms"]["rollout"] / 1000,
        "timings_s": {phase: value / 1000 for phase, value in report["timings_ms"].items()},
        "wall_s": finished.wall_s,
        "cpu_s": finished.cpu_s,
    }


def ansible_rollout(work: Path, extra_inventory: Path | None, backends: list[Backend]) -> dict:
    """Run the bench playbook with ansible-playbook, with SSH connections of its own."""
    control_dir = Path(tempfile.mkdtemp(prefix="ansible-cp-", dir=work))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir),
        "ANSIBLE_HOME": str(work / "ansible-home"),
        "ANSIBLE_NOCOLOR": "1",
    }
    # -v prints each task's result as one JSON line, which has wait_for's wait.
    command = [str(VENV_BIN / "ansible-playbook"), "-v", "-i", str(ANSIBLE_DIR / "inventory.yaml")]
    if extra_inventory is not None:
        command += ["-i", str(extra_inventory)]
    command.append(str(ANSIBLE_DIR / "restart-backends.yaml"))
    try:
        finished = run_process(command, env=env)
    finally:
        # ControlPersist keeps one SSH master per host alive after the run. Their command
        # lines name the control directory, which belongs to this run alone.
        masters = find_processes([str(control_dir)])
        if masters:
            stop_processes(masters, 5)
    if finished.returncode != 0:
        raise BenchError(f"ansible-playbook exited {finished.returncode}: {finished.stdout.strip()[-800:]} {finished.stderr.strip()[-300:]}")
    # wait_for reports in "elapsed" the whole seconds it waited for the port.
    waits = []
    for line in finished.stdout.splitlines():
        if line.startswith("ok: [") and " => {" in line:
            result = json.loads(line.split(" => ", 1)[1])
            if "elapsed" in result and "port" in result:
                waits.append(result["elapsed"])
    if len(waits) != len(backends):
        raise BenchError(f"ansible-playbook output has {len(waits)} wait_for results for {len(backends)} containers")
    return {"wall_s": finished.wall_s, "cpu_s": finished.cpu_s, "wait_for_elapsed_s": float(sum(waits))}


# 3. Detection latency and time to heal.

class LogFollower:
    """Reads a child's JSON log lines from stderr on a thread and keeps the events."""

    def __init__(self, stream) -> None:
        self.events: list[dict] = []
        self.changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self.changed:
                self.events.append(event)
                self.changed.notify_all()

    def wait_for(self, predicate, timeout: float) -> dict | None:
        """Wait until an event matches ``predicate``, and return the first match or None."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = next((event for event in self.events if predicate(event)), None)
                remaining = deadline - time.monotonic()
                if found is not None or remaining <= 0:
                    return found
                self.changed.wait(remaining)


def stop_child(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def detection(config: Path, listen: str, *, interval_s: float, settle: int, retries: list[str]) -> dict:
    """Start watch on a healthy lab, saturate the edge, and time the decision and the heal.

    Times count from the moment saturate returned, when the edge had returned 502.
    """
    process = subprocess.Popen([*CFHEAL, "watch", "-c", str(config), "--listen", listen], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=REPO)
    follower = LogFollower(process.stderr)
    try:
        if follower.wait_for(lambda event: event.get("event") == "diagnosis_made" and event.get("diagnosis") == "healthy", 30) is None:
            raise BenchError("detection: watch made no healthy evaluation within 30 s of starting")
        refused_at = saturate(retries)

        while not probe(EDGE_URL, timeout_s=1).upgraded:
            if time.time() - refused_at > 120:
                raise BenchError("detection: the edge did not return 101 within 120 s of saturating")
            time.sleep(EDGE_POLL_S)
        healed_at = time.time()

        finished = follower.wait_for(lambda event: event.get("event") == "run_finished", 60)
        if finished is None or finished.get("outcome") != "recovered":
            raise BenchError(f"detection: watch's remediation ended {finished and finished.get('outcome')}: {finished and finished.get('reason')}")
    finally:
        stop_child(process)

    def first(name: str, **fields) -> float:
        event = next((event for event in follower.events if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()) and event_time(event) >= refused_at), None)
        if event is None:
            raise BenchError(f"detection: no {name} event after the edge was saturated")
        return event_time(event) - refused_at

    return {
        "first_seen_s": first("diagnosis_made", diagnosis="edge_connection_limit"),
        "decided_s": first("run_started", command="watch"),
        "planned_s": first("plan_built", act=True),
        "healed_s": healed_at - refused_at,
        "floor_s": interval_s * settle,
    }


# 4. Fan-out of cfheal check.

class ConnectionSampler:
    """Samples established client connections to port 2222 with ss, per destination address."""

    def __init__(self, addresses: set[str], period_s: float = 0.05) -> None:
        self.addresses = addresses
        self.period_s = period_s
        self.max_concurrent: dict[str, int] = defaultdict(int)
        self.distinct: dict[str, set[str]] = defaultdict(set)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ConnectionSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            output = subprocess.run(["ss", "-Htn", "state", "established", "( dport = :2222 )"], capture_output=True, text=True).stdout
            counts: dict[str, int] = defaultdict(int)
            for line in output.splitlines():
                fields = line.split()
                if len(fields) < 4:
                    continue
                local, peer = fields[2], fields[3]
                address = peer.rsplit(":", 1)[0]
                if address in self.addresses:
                    counts[address] += 1
                    self.distinct[address].add(local)
            for address, count in counts.items():
                self.max_concurrent[address] = max(self.max_concurrent[address], count)
            self._stop.wait(self.period_s)


def fanout_check(config: Path, addresses: set[str], *, sshd_pids: list[int], dockerd_pids: list[int]) -> dict:
    """Run ``cfheal check`` once and count its SSH connections per host while it runs.

    CPU time is split three ways. The first part is cfheal itself. The second is the hosts'
    sshd listeners with the session processes they reaped (sshd, the login shell, the docker
    CLI). The third is the Docker engines.
    """
    busy_before = _cpu_busy_ticks()
    sshd_before, dockerd_before = _process_cpu(sshd_pids), _process_cpu(dockerd_pids)
    with ConnectionSampler(addresses) as sampler:
        finished = run_process([*CFHEAL, "check", "-c", str(config), "--output", "json"])
    # A host's sshd adds its sessions' CPU time once it has reaped them, just after cfheal exits.
    time.sleep(0.2)
    busy_after = _cpu_busy_ticks()
    sshd_after, dockerd_after = _process_cpu(sshd_pids), _process_cpu(dockerd_pids)
    try:
        report = json.loads(finished.stdout)
    except ValueError:
        raise BenchError(f"cfheal check exited {finished.returncode} without a JSON report: {finished.stderr.strip()[-500:]}") from None
    unverified = [host["host"] for host in report["hosts"] if host.get("error")]
    if finished.returncode != 0 or unverified:
        raise BenchError(f"cfheal check exited {finished.returncode}; diagnosis {report['diagnosis']['kind']}; unverified hosts: {', '.join(unverified) or 'none'}")
    seen = [sampler.max_concurrent.get(address, 0) for address in addresses]
    return {
        "wall_s": finished.wall_s,
        "detect_s": report["timings_ms"]["detect"] / 1000,
        "verify_s": report["timings_ms"]["verify"] / 1000,
        "cpu_s": finished.cpu_s,
        # Busy time of all processes (cfheal, sshd, docker CLI, dockerd) over the check, in CPU seconds.
        "machine_busy_s": (busy_after - busy_before) / CLOCK_TICKS,
        "sshd_sessions_cpu_s": sshd_after - sshd_before,
        "dockerd_cpu_s": dockerd_after - dockerd_before,
        "max_connections_per_host": max(seen),
        "hosts_seen_connected": sum(1 for count in seen if count),
        "max_distinct_connections_per_host": max((len(ports) for ports in sampler.distinct.values()), default=0),
    }


def _process_cpu(pids: list[int]) -> float:
    """Return the CPU seconds of these processes and of the children they waited for."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime and cstime: the 12th to 15th fields after the command name.
        total += sum(int(value) for value in fields[11:15])
    return total / CLOCK_TICKS


def _cpu_busy_ticks() -> int:
    """Return the machine's CPU time spent not idle (idle and iowait excluded), in clock ticks."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


# Context: the cost of one round trip on each path that the figures above use.

def round_trips(config_path: Path, repetitions: int = 10) -> dict:
    """Time an SSH command, a Docker API request over cfheal's SSH session, and one on the socket."""
    from cfheal.config import load_config
    from cfheal.containers import Engine
    from cfheal.hosts import HostTarget, SSHSession

    config = load_config(config_path)
    host = config.hosts[0]

    def timed(action) -> list[float]:
        action()
        times = []
        for _ in range(repetitions):
            started = time.monotonic()
            action()
            times.append(time.monotonic() - started)
        return times

    with SSHSession(HostTarget.from_config(config, host)) as session:
        engine = Engine(session, timeout=30)
        try:
            ssh_command = timed(lambda: session.run("true"))
            over_ssh = timed(lambda: engine.state(host.containers[0].name))
        finally:
            engine.close()
    lab_host = next(candidate for candidate in HOSTS if candidate.name == host.name)
    direct = timed(lambda: lab_engine.Engine(lab_host).inspect_container())

    # sshd runs each command as "<login shell> -c <command>". bash reads ~/.bashrc when it
    # finds SSH_CLIENT in its environment, so this times the login shell with and without it.
    account = pwd.getpwnam(config.user_for(host))
    shell = [account.pw_shell, "-c", "true"]
    environment = {"HOME": account.pw_dir, "PATH": "/usr/bin:/bin"}
    as_sshd_runs_it = timed(lambda: subprocess.run(shell, env={**environment, "SSH_CLIENT": "127.0.0.1 40000 2222"}, check=True))
    plain = timed(lambda: subprocess.run(shell, env=environment, check=True))
    return {
        "ssh_command_s": ssh_command,
        "inspect_over_ssh_s": over_ssh,
        "inspect_on_socket_s": direct,
        "login_shell": account.pw_shell,
        "shell_as_sshd_runs_it_s": as_sshd_runs_it,
        "shell_without_ssh_client_s": plain,
    }


# 5. Watch at rest.

def watch_at_rest(config: Path, listen: str, evaluations: int, *, period_s: float = 0.05) -> dict:
    """Run ``cfheal watch --max-evaluations`` on a healthy lab, sampling its RSS and CPU time.

    Evaluations are counted from its diagnosis_made events as they arrive, so each sample of
    /proc/<pid>/status and /proc/<pid>/stat is paired with the evaluation count at that moment.
    """
    process = subprocess.Popen(
        [*CFHEAL, "watch", "-c", str(config), "--listen", listen, "--max-evaluations", str(evaluations)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=REPO,
    )
    count = 0
    errors: list[str] = []

    def count_evaluations() -> None:
        nonlocal count
        for line in process.stderr:
            # A substring test keeps this thread cheap, because it shares the CPUs with watch.
            if '"diagnosis_made"' in line:
                count += 1
            elif '"level": "error"' in line and len(errors) < 5:
                errors.append(line.strip()[:300])

    reader = threading.Thread(target=count_evaluations, daemon=True)
    reader.start()
    samples = []
    started = time.monotonic()
    try:
        while process.poll() is None:
            sample = _sample_process(process.pid)
            if sample is not None:
                samples.append({"t_s": time.monotonic() - started, "evaluations": count, **sample})
            time.sleep(period_s)
            if time.monotonic() - started > RUN_TIMEOUT_S * 2:
                raise BenchError(f"watch at rest: {count} of {evaluations} evaluations after {RUN_TIMEOUT_S * 2} s")
    finally:
        stop_child(process)
        reader.join(5)
    if process.returncode != 0 or count < evaluations:
        raise BenchError(f"watch at rest: watch exited {process.returncode} after {count} of {evaluations} evaluations; errors: {errors}")

    early = next((sample for sample in samples if sample["evaluations"] >= min(1000, evaluations // 5)), None)
    late = samples[-1]
    if early is None or late["evaluations"] <= early["evaluations"]:
        raise BenchError(f"watch at rest: too few samples ({len(samples)}) to compare RSS")
    return {
        "evaluations": count,
        "duration_s": time.monotonic() - started,
        "early": early,
        "late": late,
        "rss_growth": (late["rss_kib"] - early["rss_kib"]) / early["rss_kib"],
        "cpu_per_evaluation_ms": late["cpu_s"] / late["evaluations"] * 1000,
        "cpu_per_evaluation_after_early_ms": (late["cpu_s"] - early["cpu_s"]) / (late["evaluations"] - early["evaluations"]) * 1000,
        "error_lines": errors,
        "samples": samples[:: max(1, len(samples) // 200)],
    }


def _sample_process(pid: int) -> dict | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    if rss is None:
        # A process that has exited but not been reaped yet has no VmRSS line.
        return None
    # Fields after the command name: utime and stime are the 12th and 13th, in clock ticks,
    # and cover every thread of the process.
    fields = stat.rsplit(")", 1)[1].split()
    return {"rss_kib": rss, "cpu_s": (int(fields[11]) + int(fields[12])) / CLOCK_TICKS}
