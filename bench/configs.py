"""cfheal configurations, playbooks and Ansible inventories that the benchmark writes.

Each is derived from the committed lab configuration (config/lab.yaml) and playbook
(playbooks/restart-backends.yaml), with only the settings named here changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from labparts import BENCH_KNOWN_HOSTS, Backend, BenchHost

REPO = Path(__file__).resolve().parents[1]
LAB_CONFIG = REPO / "config" / "lab.yaml"
LAB_PLAYBOOK = REPO / "playbooks" / "restart-backends.yaml"


@dataclass(frozen=True)
class Gates:
    """The readiness-gate and batch settings of one bench playbook."""

    name: str
    stable_for: str
    pause_between_batches: str
    poll_interval: str


# Small deliberate waits: a restarted container must stay up for 250 ms, and batches are
# 250 ms apart. The lab playbook uses 2 s and 1 s. Both bench playbooks poll every 10 ms,
# as the floor does (measure.FLOOR_POLL_S).
BENCH_GATES = Gates("bench gates", stable_for="250ms", pause_between_batches="250ms", poll_interval="10ms")
# No deliberate waits, so the time left is cfheal's own work: restart and readiness polls.
ZERO_WAITS = Gates("zero waits", stable_for="0s", pause_between_batches="0s", poll_interval="10ms")


def write_playbook(path: Path, gates: Gates) -> Path:
    """Write the lab playbook with these gates, a 2 s stop grace period and no plan_upgrade step.

    Without plan_upgrade, a run soon after an earlier one restarts again instead of
    escalating, so repetitions measure the same rollout.
    """
    playbook = yaml.safe_load(LAB_PLAYBOOK.read_text())
    rollout = next(step for step in playbook["steps"] if step["action"] == "rolling_restart")
    rollout["stop_grace_period"] = "2s"
    rollout["pause_between_batches"] = gates.pause_between_batches
    rollout["readiness"].update(stable_for=gates.stable_for, poll_interval=gates.poll_interval)
    playbook["steps"] = [rollout]
    path.write_text(yaml.safe_dump(playbook, sort_keys=False))
    return path


def host_entries(backends: list[Backend]) -> list[dict]:
    """Return the configuration's hosts list: one entry per lab host, with its containers."""
    hosts: dict[str, dict] = {}
    for backend in backends:
        entry = hosts.setdefault(backend.host.name, {"name": backend.host.name, "address": backend.host.address, "port": 2222, "containers": []})
        entry["containers"].append({"name": backend.name, "origin": backend.origin, "listen": backend.listen})
    return list(hosts.values())


def write_config(path: Path, *, playbook: Path, state_dir: Path, hosts: list[dict], edge: dict | None = None, watch: dict | None = None, known_hosts: Path | None = None) -> Path:
    """Write the lab configuration with these hosts, playbook and state directory."""
    config = yaml.safe_load(LAB_CONFIG.read_text())
    config["playbook"] = str(playbook)
    config["state_dir"] = str(state_dir)
    config["hosts"] = hosts
    if edge:
        config["edge"].update(edge)
    if watch:
        config["watch"] = watch
    if known_hosts:
        config["ssh"]["known_hosts"] = str(known_hosts)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fanout_hosts(hosts: list[BenchHost], backends: list[Backend]) -> list[dict]:
    """Return hosts entries for the bench SSH hosts. Each one checks the ws-backend of its engine."""
    by_engine = {backend.host.name: backend for backend in backends}
    entries = []
    for host in hosts:
        backend = by_engine[host.engine_host.name]
        entries.append({
            "name": host.name,
            "address": host.address,
            "port": 2222,
            "containers": [{"name": backend.name, "origin": backend.origin, "listen": backend.listen}],
        })
    return entries


def write_fanout_config(path: Path, *, playbook: Path, state_dir: Path, hosts: list[BenchHost], backends: list[Backend]) -> Path:
    return write_config(path, playbook=playbook, state_dir=state_dir, hosts=fanout_hosts(hosts, backends), known_hosts=BENCH_KNOWN_HOSTS)


def write_ansible_inventory(path: Path, backends: list[Backend]) -> Path:
    """Write an inventory that sets backend_containers for each lab host.

    Passed after bench/ansible/inventory.yaml, it overrides that file's one container per host.
    """
    hosts: dict[str, dict] = {}
    for backend in backends:
        entry = hosts.setdefault(backend.host.name, {"backend_containers": []})
        entry["backend_containers"].append({"name": backend.name, "port": backend.port})
    path.write_text(yaml.safe_dump({"backends": {"hosts": hosts}}, sort_keys=False))
    return path
