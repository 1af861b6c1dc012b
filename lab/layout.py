"""Fixed addresses and paths of the cfheal lab.

cfheal's committed configuration depends on these values exactly, so change them only
together with that configuration.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

LAB_ROOT = Path("/var/lib/cfheal-lab")
RUN_DIR = Path("/run/cfheal-lab")
LAB_CODE_DIR = Path(__file__).resolve().parent
REPO_ROOT = LAB_CODE_DIR.parent

SSH_DIR = LAB_ROOT / "ssh"
# cfheal's own state for config/lab.yaml (run history, breaker, plan-upgrade requests).
CFHEAL_STATE_DIR = LAB_ROOT / "state"
SSH_CLIENT_KEY = SSH_DIR / "id_ed25519"
SSH_AUTHORIZED_KEYS = SSH_DIR / "authorized_keys"
SSH_KNOWN_HOSTS = SSH_DIR / "known_hosts"
SSH_PORT = 2222
SSHD_PRIVSEP_DIR = Path("/run/sshd")

IMAGE = "cfheal-lab/base:1"
CONTAINER_NAME = "ws-backend"
BACKEND_PORT = 8081
BACKEND_STOP_TIMEOUT_S = 2

EDGE_ADDRESS = "127.0.0.10"
EDGE_PORT = 8080
EDGE_URL = f"ws://{EDGE_ADDRESS}:{EDGE_PORT}/ws/"
EDGE_CONNECTION_LIMIT = 30
NGINX_DIR = LAB_ROOT / "nginx"

# The local stand-in for the Cloudflare API v4 (lab/cloudflare_api.py), which cfheal calls
# with the token in CLOUDFLARE_TOKEN_FILE.
CLOUDFLARE_ADDRESS = "127.0.0.20"
CLOUDFLARE_PORT = 8787
CLOUDFLARE_BASE_URL = f"http://{CLOUDFLARE_ADDRESS}:{CLOUDFLARE_PORT}/client/v4"
CLOUDFLARE_ADMIN_URL = f"http://{CLOUDFLARE_ADDRESS}:{CLOUDFLARE_PORT}/__standin"
CLOUDFLARE_STATE_DIR = LAB_ROOT / "cloudflare"
CLOUDFLARE_TOKEN_FILE = CLOUDFLARE_STATE_DIR / "token"
CLOUDFLARE_PID_FILE = RUN_DIR / "cloudflare.pid"
CLOUDFLARE_LOG = LAB_ROOT / "cloudflare.log"

SWARM_PID_FILE = RUN_DIR / "swarm.pid"
SWARM_STATUS_FILE = RUN_DIR / "swarm-status.json"
SWARM_LOG = LAB_ROOT / "swarm.log"
LIVE_CLIENTS = 10
BEYOND_LIMIT_LIVE_CLIENTS = 45

LOCK_FILE = RUN_DIR / "lab.lock"

# The interpreter that runs the lab also runs the backends inside the containers.
VENV_DIR = Path(sys.prefix).resolve()
VENV_PYTHON = VENV_DIR / "bin" / "python"


@dataclass(frozen=True)
class Host:
    """One backend host: an sshd, a Docker engine and a ws-backend container."""

    name: str
    address: str

    @property
    def state_dir(self) -> Path:
        return LAB_ROOT / self.name

    @property
    def run_dir(self) -> Path:
        return RUN_DIR / self.name

    @property
    def control_dir(self) -> Path:
        return self.state_dir / "control"

    @property
    def mode_file(self) -> Path:
        return self.control_dir / "mode"

    @property
    def crash_flag(self) -> Path:
        return self.control_dir / "crash-on-start"

    @property
    def docker_socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.docker_socket}"

    @property
    def docker_pid_file(self) -> Path:
        return self.run_dir / "docker.pid"

    @property
    def docker_exec_root(self) -> Path:
        return self.run_dir / "docker-exec"

    @property
    def docker_data_root(self) -> Path:
        return self.state_dir / "docker"

    @property
    def dockerd_config(self) -> Path:
        return self.state_dir / "daemon.json"

    @property
    def dockerd_log(self) -> Path:
        return self.state_dir / "dockerd.log"

    @property
    def sshd_config(self) -> Path:
        return self.state_dir / "sshd_config"

    @property
    def sshd_host_key(self) -> Path:
        return self.state_dir / "ssh" / "ssh_host_ed25519_key"

    @property
    def sshd_pid_file(self) -> Path:
        return self.run_dir / "sshd.pid"

    @property
    def sshd_log(self) -> Path:
        return self.state_dir / "sshd.log"

    @property
    def origin_url(self) -> str:
        return f"ws://{self.address}:{BACKEND_PORT}/ws/"


HOSTS = (
    Host("backend-1", "127.0.0.11"),
    Host("backend-2", "127.0.0.12"),
    Host("backend-3", "127.0.0.13"),
)
HOSTS_BY_NAME = {host.name: host for host in HOSTS}
