"""Keys and one OpenSSH server per lab host, each on port 2222 of the host's loopback address."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from layout import (
    HOSTS,
    SSH_AUTHORIZED_KEYS,
    SSH_CLIENT_KEY,
    SSH_DIR,
    SSH_KNOWN_HOSTS,
    SSH_PORT,
    SSHD_PRIVSEP_DIR,
    Host,
)
from procs import (
    LabError,
    children_of,
    first_line,
    pid_from_file,
    remove_file,
    stop_processes,
    wait_until,
)

SSHD = "/usr/sbin/sshd"
SSHD_START_TIMEOUT_S = 10


def generate_key(path: Path, comment: str) -> bool:
    """Create an ed25519 key pair without passphrase unless it exists.

    Returns whether it created the key.
    """
    if path.exists() and path.with_suffix(".pub").exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_file(path)
    remove_file(path.with_suffix(".pub"))
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return True


def write_if_changed(path: Path, content: str, mode: int = 0o644) -> bool:
    try:
        if path.read_text() == content:
            return False
    except FileNotFoundError:
        pass
    path.write_text(content)
    path.chmod(mode)
    return True


def ensure_keys() -> list[str]:
    """Create the client key and host keys, then write authorized_keys and known_hosts.

    known_hosts lists exactly the three hosts, from the host keys the lab generated.
    """
    actions = []
    SSH_DIR.mkdir(parents=True, exist_ok=True)
    SSH_DIR.chmod(0o700)
    if generate_key(SSH_CLIENT_KEY, "cfheal-lab-client"):
        actions.append(f"generated client key {SSH_CLIENT_KEY}")
    for host in HOSTS:
        if generate_key(host.sshd_host_key, f"cfheal-lab-{host.name}"):
            actions.append(f"generated host key for {host.name}")

    client_public = SSH_CLIENT_KEY.with_suffix(".pub").read_text().strip()
    write_if_changed(SSH_AUTHORIZED_KEYS, client_public + "\n", 0o600)

    lines = []
    for host in HOSTS:
        key_type, key_data = host.sshd_host_key.with_suffix(".pub").read_text().split()[:2]
        lines.append(f"[{host.address}]:{SSH_PORT} {key_type} {key_data}\n")
    if write_if_changed(SSH_KNOWN_HOSTS, "".join(lines)):
        actions.append(f"wrote {SSH_KNOWN_HOSTS}")
    return actions


def sshd_config_text(host: Host) -> str:
    return "\n".join([
        f"# sshd for lab host {host.name}, written by scripts/lab up.",
        f"ListenAddress {host.address}",
        f"Port {SSH_PORT}",
        f"HostKey {host.sshd_host_key}",
        f"PidFile {host.sshd_pid_file}",
        f"AuthorizedKeysFile {SSH_AUTHORIZED_KEYS}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PrintMotd no",
        f"SetEnv DOCKER_HOST={host.docker_host}",
        "Subsystem sftp internal-sftp",
        "",
    ])


def sshd_pid(host: Host) -> int | None:
    return pid_from_file(host.sshd_pid_file, str(host.sshd_config))


def is_responding(host: Host) -> bool:
    """Return whether an SSH banner arrives on the host's address and port."""
    try:
        with socket.create_connection((host.address, SSH_PORT), timeout=2) as connection:
            return connection.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def write_config(host: Host) -> bool:
    """Write the host's sshd_config, check it with sshd -t, and return whether it changed."""
    host.state_dir.mkdir(parents=True, exist_ok=True)
    host.run_dir.mkdir(parents=True, exist_ok=True)
    changed = write_if_changed(host.sshd_config, sshd_config_text(host))
    SSHD_PRIVSEP_DIR.mkdir(parents=True, exist_ok=True)
    check = subprocess.run(
        [SSHD, "-t", "-f", str(host.sshd_config)], capture_output=True, text=True
    )
    if check.returncode != 0:
        raise LabError(f"sshd config {host.sshd_config} is invalid: {first_line(check.stderr)}")
    return changed


def start_sshd(host: Host) -> bool:
    """Start the host's sshd unless it runs and responds, and return whether it started."""
    changed = write_config(host)
    pid = sshd_pid(host)
    if pid is not None and not changed and is_responding(host):
        return False
    if pid is not None:
        stop_sshd(host)
    result = subprocess.run(
        [SSHD, "-f", str(host.sshd_config), "-E", str(host.sshd_log)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise LabError(
            f"sshd for {host.name} failed to start: {first_line(result.stderr)}; "
            f"see {host.sshd_log}"
        )
    if not wait_until(lambda: is_responding(host), SSHD_START_TIMEOUT_S):
        raise LabError(
            f"sshd for {host.name} did not respond on {host.address}:{SSH_PORT} within "
            f"{SSHD_START_TIMEOUT_S} s; see {host.sshd_log}"
        )
    return True


def stop_sshd(host: Host) -> bool:
    """Stop the host's sshd and its open sessions, and return False when it was not running."""
    pid = sshd_pid(host)
    if pid is None:
        return False
    # Sessions run in child processes that outlive the listener unless stopped too.
    stop_processes([pid, *children_of(pid)], 5)
    remove_file(host.sshd_pid_file)
    return True
