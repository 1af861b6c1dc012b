"""Parts that the benchmark adds to the lab and removes again.

Extra backend containers run on the three lab engines with the lab's own container spec,
each on its own port. Extra SSH hosts are sshd instances on 127.0.1.x:2222 whose
DOCKER_HOST points at one of the lab engines, so they share the lab's containers.
Both reuse lab/engine.py and lab/sshd.py, which must be importable (bench.py puts lab/
on sys.path).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import engine as lab_engine
import sshd as lab_sshd
from layout import BACKEND_PORT, HOSTS, SSH_PORT, Host
from probe import probe
from procs import LabError, wait_until

BENCH_STATE_DIR = Path("/var/lib/cfheal-bench")
BENCH_RUN_DIR = Path("/run/cfheal-bench")
BENCH_KNOWN_HOSTS = BENCH_STATE_DIR / "known_hosts"
# Containers and the processes of sshd instances that the benchmark started carry this label
# or live under these directories, so leftovers of an interrupted run can be found.
BENCH_LABEL = "cfheal-bench.role"
ORIGIN_START_TIMEOUT_S = 15


@dataclass(frozen=True)
class Backend:
    """One backend container: the lab host whose engine runs it, its name and its port."""

    host: Host
    name: str
    port: int

    @property
    def origin(self) -> str:
        return f"ws://{self.host.address}:{self.port}/ws/"

    @property
    def listen(self) -> str:
        return f"{self.host.address}:{self.port}"


def lab_backends() -> list[Backend]:
    """Return the lab's own ws-backend containers, one per host."""
    return [Backend(host, lab_engine.CONTAINER_NAME, BACKEND_PORT) for host in HOSTS]


def extra_backend_plan(total: int) -> list[Backend]:
    """Return the extra containers that bring the lab's three backends up to ``total``.

    They are spread round-robin over the three engines, on ports 8082, 8083, ...
    """
    extras = []
    for index in range(total - len(HOSTS)):
        host = HOSTS[index % len(HOSTS)]
        port = BACKEND_PORT + 1 + index // len(HOSTS)
        extras.append(Backend(host, f"ws-backend-{port}", port))
    return extras


def extra_container_spec(backend: Backend) -> dict:
    """Return the lab's ws-backend spec for this host, listening on the backend's own port."""
    spec = lab_engine.container_spec(backend.host)
    command = spec["Cmd"]
    command[command.index("--port") + 1] = str(backend.port)
    spec["Labels"] = {**spec["Labels"], BENCH_LABEL: "extra-backend"}
    del spec["Labels"][lab_engine.SPEC_LABEL]
    return spec


def start_extra_backends(backends: list[Backend]) -> None:
    """Create and start the extra containers, then wait until each origin returns 101."""
    for backend in backends:
        api = lab_engine.Engine(backend.host)
        api.request_ok("POST", "/containers/create", query={"name": backend.name}, body=extra_container_spec(backend))
        api.request_ok("POST", f"/containers/{backend.name}/start")
    for backend in backends:
        if not wait_until(lambda: probe(backend.origin, timeout_s=1).upgraded, ORIGIN_START_TIMEOUT_S, 0.1):
            raise LabError(f"extra backend {backend.name} on {backend.host.name} did not return 101 on {backend.origin} within {ORIGIN_START_TIMEOUT_S} s")


def remove_extra_backends() -> list[str]:
    """Remove every container with the benchmark's label from the three engines and return their names."""
    removed = []
    for host in HOSTS:
        api = lab_engine.Engine(host)
        if not api.is_responding():
            continue
        filters = json.dumps({"label": [BENCH_LABEL]})
        _, data = api.request_ok("GET", "/containers/json", query={"all": "1", "filters": filters})
        for container in json.loads(data):
            api.request_ok("DELETE", f"/containers/{container['Id']}", query={"force": "1"})
            removed.append(f"{host.name}/{container['Names'][0].lstrip('/')}")
    return removed


@dataclass(frozen=True)
class BenchHost(Host):
    """An extra SSH host for the fan-out figure: its own sshd, a lab host's Docker engine."""

    engine_host: Host = HOSTS[0]

    @property
    def state_dir(self) -> Path:
        return BENCH_STATE_DIR / "hosts" / self.name

    @property
    def run_dir(self) -> Path:
        return BENCH_RUN_DIR / self.name

    @property
    def docker_socket(self) -> Path:
        return self.engine_host.docker_socket


def bench_hosts(count: int) -> list[BenchHost]:
    """Return ``count`` SSH hosts on 127.0.1.1 onwards, assigned to the lab engines in turn."""
    return [
        BenchHost(f"bench-host-{index}", f"127.0.1.{index}", engine_host=HOSTS[(index - 1) % len(HOSTS)])
        for index in range(1, count + 1)
    ]


def start_bench_hosts(hosts: list[BenchHost]) -> None:
    """Create host keys and the bench known_hosts, then start one sshd per host."""
    lines = []
    for host in hosts:
        lab_sshd.generate_key(host.sshd_host_key, f"cfheal-bench-{host.name}")
        key_type, key_data = host.sshd_host_key.with_suffix(".pub").read_text().split()[:2]
        lines.append(f"[{host.address}]:{SSH_PORT} {key_type} {key_data}\n")
    BENCH_STATE_DIR.mkdir(parents=True, exist_ok=True)
    BENCH_KNOWN_HOSTS.write_text("".join(lines))
    for host in hosts:
        lab_sshd.start_sshd(host)


def stop_bench_hosts(hosts: list[BenchHost]) -> list[str]:
    """Stop the sshd of every host given and return the names of those that were running."""
    stopped = [host.name for host in hosts if lab_sshd.stop_sshd(host)]
    shutil.rmtree(BENCH_RUN_DIR, ignore_errors=True)
    return stopped
