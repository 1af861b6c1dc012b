"""One Docker engine per lab host: dockerd, the base image and the ws-backend container.

The lab talks to each engine through its Engine API on the unix socket, with the stdlib's
http.client, so it needs neither the docker CLI nor the Docker SDK.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import urllib.parse
from pathlib import Path
from typing import Any

from layout import (
    BACKEND_PORT,
    BACKEND_STOP_TIMEOUT_S,
    CONTAINER_NAME,
    IMAGE,
    LAB_CODE_DIR,
    VENV_DIR,
    VENV_PYTHON,
    Host,
)
from procs import LabError, find_processes, pid_from_file, remove_file, stop_processes, wait_until

DOCKERD_START_TIMEOUT_S = 60
DOCKERD_STOP_TIMEOUT_S = 30
SPEC_LABEL = "cfheal-lab.spec"


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection over a unix socket."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self.sock = sock


class EngineError(LabError):
    """The Engine API returned an error status or could not be reached."""


class Engine:
    """Engine API client for one host's dockerd."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        raw_body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> tuple[int, bytes]:
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        headers = {}
        data = raw_body
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = content_type
        connection = UnixHTTPConnection(self.host.docker_socket, timeout)
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except OSError as error:
            raise EngineError(
                f"Engine API {method} {path} on {self.host.docker_host} failed: {error}"
            ) from error
        finally:
            connection.close()

    def request_ok(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        """Send a request and raise EngineError unless the status is 2xx or 304."""
        status, data = self.request(method, path, **kwargs)
        if status >= 400:
            message = data.decode(errors="replace").strip()
            try:
                message = json.loads(data)["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise EngineError(
                f"Engine API {method} {path} on {self.host.name} returned HTTP {status}: {message}"
            )
        return status, data

    def is_responding(self) -> bool:
        try:
            status, data = self.request("GET", "/_ping", timeout=2)
        except EngineError:
            return False
        return status == 200 and data == b"OK"

    def version(self) -> dict[str, Any]:
        return json.loads(self.request_ok("GET", "/version", timeout=5)[1])

    def inspect_container(self) -> dict[str, Any] | None:
        status, data = self.request("GET", f"/containers/{CONTAINER_NAME}/json", timeout=5)
        if status == 404:
            return None
        if status >= 400:
            self.request_ok("GET", f"/containers/{CONTAINER_NAME}/json")
        return json.loads(data)

    def has_image(self) -> bool:
        status, _ = self.request("GET", f"/images/{IMAGE}/json", timeout=5)
        return status == 200

    def import_image(self, rootfs_tar: bytes) -> None:
        repository, tag = IMAGE.rsplit(":", 1)
        _, data = self.request_ok(
            "POST",
            "/images/create",
            query={"fromSrc": "-", "repo": repository, "tag": tag},
            raw_body=rootfs_tar,
            content_type="application/x-tar",
            timeout=120,
        )
        # The import streams JSON progress objects, and a failure arrives as one with "error".
        for line in data.decode(errors="replace").splitlines():
            if '"error"' in line:
                raise EngineError(f"docker import of {IMAGE} on {self.host.name} failed: {line}")

    def create_container(self, spec: dict[str, Any]) -> None:
        self.request_ok("POST", "/containers/create", query={"name": CONTAINER_NAME}, body=spec)

    def remove_container(self) -> None:
        status, _ = self.request("DELETE", f"/containers/{CONTAINER_NAME}", query={"force": "1"})
        if status not in (204, 404):
            self.request_ok("DELETE", f"/containers/{CONTAINER_NAME}", query={"force": "1"})

    def start_container(self) -> bool:
        """Start ws-backend and return False when it was already running."""
        status, _ = self.request_ok("POST", f"/containers/{CONTAINER_NAME}/start")
        return status != 304

    def stop_container(self) -> bool:
        """Stop ws-backend with its grace period and return False when it was already stopped."""
        status, _ = self.request_ok(
            "POST",
            f"/containers/{CONTAINER_NAME}/stop",
            query={"t": str(BACKEND_STOP_TIMEOUT_S)},
            timeout=BACKEND_STOP_TIMEOUT_S + 30,
        )
        return status != 304


def dockerd_command(host: Host) -> list[str]:
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    return [
        dockerd,
        "--host", host.docker_host,
        "--data-root", str(host.docker_data_root),
        "--exec-root", str(host.docker_exec_root),
        "--pidfile", str(host.docker_pid_file),
        "--storage-driver", "vfs",
        "--iptables=false",
        "--bridge=none",
        # An own daemon.json keeps /etc/docker/daemon.json, if any, out of the lab. The
        # namespaces keep the engines apart should they ever share one containerd.
        "--config-file", str(host.dockerd_config),
        "--containerd-namespace", f"cfheal-lab-{host.name}",
        "--containerd-plugins-namespace", f"cfheal-lab-{host.name}-plugins",
    ]


def write_dockerd_config(host: Host) -> bool:
    """Write the host's daemon.json and return whether its content changed.

    dockerd 20.10 derives the engine ID from its trust key, by default /etc/docker/key.json,
    so each engine gets its own key file to report its own ID.
    """
    content = json.dumps({"deprecated-key-path": str(host.state_dir / "key.json")}, indent=2) + "\n"
    try:
        if host.dockerd_config.read_text() == content:
            return False
    except FileNotFoundError:
        pass
    host.dockerd_config.write_text(content)
    return True


def dockerd_pid(host: Host) -> int | None:
    return pid_from_file(host.docker_pid_file, str(host.docker_socket))


def start_dockerd(host: Host) -> bool:
    """Start dockerd detached unless it runs with the current daemon.json.

    Returns whether it started dockerd.

    A changed daemon.json restarts a running dockerd, which stops its containers.

    The caller waits for it with wait_for_dockerd, so several engines start in parallel.
    """
    for directory in (host.state_dir, host.run_dir, host.docker_data_root, host.docker_exec_root):
        directory.mkdir(parents=True, exist_ok=True)
    config_changed = write_dockerd_config(host)
    if dockerd_pid(host) is not None:
        if not config_changed:
            return False
        stop_dockerd(host)
    # A pid file left by a killed dockerd makes the new one refuse to start.
    remove_file(host.docker_pid_file)
    remove_file(host.docker_socket)
    with open(host.dockerd_log, "ab") as log:
        subprocess.Popen(
            dockerd_command(host),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    return True


def wait_for_dockerd(host: Host) -> None:
    engine = Engine(host)
    if not wait_until(engine.is_responding, DOCKERD_START_TIMEOUT_S, 0.25):
        raise LabError(
            f"dockerd for {host.name} did not respond on {host.docker_host} within "
            f"{DOCKERD_START_TIMEOUT_S} s; see {host.dockerd_log}"
        )
    engine.version()


def stop_dockerd(host: Host) -> bool:
    """Stop dockerd and the containerd it started, and return False when none ran."""
    pid = dockerd_pid(host)
    if pid is not None:
        stop_processes([pid], DOCKERD_STOP_TIMEOUT_S)
    # A dockerd killed with SIGKILL leaves its containerd and shims behind.
    leftovers = find_processes([str(host.docker_exec_root)])
    if leftovers:
        stop_processes(leftovers, 5)
    remove_file(host.docker_socket)
    unmount_under([host.docker_exec_root, host.docker_data_root])
    return pid is not None or bool(leftovers)


def unmount_under(roots: list[Path]) -> None:
    """Unmount what a stopped dockerd left mounted below roots, deepest first.

    dockerd 20.10 leaves <exec-root>/netns/default, an nsfs bind mount, after it exits.
    """
    mount_points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = Path(line.split()[4])
        if any(mount_point == root or root in mount_point.parents for root in roots):
            mount_points.append(mount_point)
    for mount_point in sorted(mount_points, key=lambda path: len(path.parts), reverse=True):
        result = subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, text=True)
        if result.returncode != 0:
            raise LabError(f"umount {mount_point} failed: {result.stderr.strip()}")


def build_rootfs_tar() -> bytes:
    """Return a tar of a minimal root filesystem: static busybox as /bin/sh and an empty /tmp.

    Python and its libraries come from the host through read-only bind mounts.
    """
    busybox = Path(shutil.which("busybox") or "/bin/busybox").resolve()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777)):
            entry = tarfile.TarInfo(name)
            entry.type = tarfile.DIRTYPE
            entry.mode = mode
            tar.addfile(entry)
        tar.add(str(busybox), arcname="bin/busybox")
        shell = tarfile.TarInfo("bin/sh")
        shell.type = tarfile.SYMTYPE
        shell.linkname = "busybox"
        tar.addfile(shell)
    return buffer.getvalue()


def runtime_mounts() -> list[str]:
    """Return the read-only binds that give the container the host's Python runtime.

    Computed from the running interpreter: its base prefix and its venv. A path already
    inside another mounted path is left out.
    """
    paths = [Path("/usr"), Path("/lib"), Path("/lib64"), Path(sys.base_prefix).resolve(), VENV_DIR]
    binds: list[str] = []
    mounted: list[Path] = []
    for path in paths:
        if not path.exists():
            continue
        if any(path == parent or parent in path.parents for parent in mounted):
            continue
        mounted.append(path)
        binds.append(f"{path}:{path}:ro")
    return binds


def container_spec(host: Host) -> dict[str, Any]:
    """Return the Engine API create body for ws-backend, labelled with a hash of itself."""
    binds = runtime_mounts() + [
        f"{LAB_CODE_DIR}:/app:ro",
        f"{host.control_dir}:/control:ro",
    ]
    spec: dict[str, Any] = {
        "Image": IMAGE,
        "Cmd": [
            str(VENV_PYTHON), "/app/backend.py",
            "--listen", host.address,
            "--port", str(BACKEND_PORT),
            "--name", host.name,
        ],
        "Env": ["PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"],
        "StopSignal": "SIGTERM",
        "StopTimeout": BACKEND_STOP_TIMEOUT_S,
        "Labels": {"cfheal-lab.host": host.name},
        "HostConfig": {
            "NetworkMode": "host",
            "RestartPolicy": {"Name": "no"},
            "Binds": binds,
        },
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    spec["Labels"][SPEC_LABEL] = digest
    return spec


def ensure_container(host: Host, rootfs_tar: bytes | None = None) -> list[str]:
    """Import the image if missing, create or recreate ws-backend, and start it.

    Returns the actions taken, for the caller to report. A container whose spec hash label
    differs from the current spec (another venv or repository path) is recreated.
    """
    engine = Engine(host)
    actions = []
    if not engine.has_image():
        engine.import_image(rootfs_tar or build_rootfs_tar())
        actions.append(f"imported {IMAGE}")
    spec = container_spec(host)
    current = engine.inspect_container()
    if current is not None:
        labels = current.get("Config", {}).get("Labels") or {}
        if labels.get(SPEC_LABEL) != spec["Labels"][SPEC_LABEL]:
            engine.remove_container()
            current = None
            actions.append(f"removed outdated {CONTAINER_NAME}")
    if current is None:
        engine.create_container(spec)
        actions.append(f"created {CONTAINER_NAME}")
    if engine.start_container():
        actions.append(f"started {CONTAINER_NAME}")
    return actions
