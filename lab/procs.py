"""Process helpers: pid files checked against the command line, bounded waits, stops."""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path


class LabError(Exception):
    """A lab command failed. The message is shown to the user as one line."""


def read_cmdline(pid: int) -> str:
    """Return the command line of a process with NUL separators turned into spaces, or ""."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def is_running(pid: int) -> bool:
    """Return whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may contain spaces.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def pid_from_file(pid_file: Path, cmdline_marker: str) -> int | None:
    """Return the pid in pid_file if that process runs and its command line contains the marker.

    The marker guards against a stale pid file whose pid the kernel gave to another process.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 0 or not is_running(pid):
        return None
    if cmdline_marker not in read_cmdline(pid):
        return None
    return pid


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    """Call predicate until it returns true or timeout_s passes, and return its last result."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def children_of(pid: int) -> list[int]:
    """Return the pids of all descendants of a process."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(parent, []).append(int(entry.name))
    descendants: list[int] = []
    pending = [pid]
    while pending:
        for child in parents.get(pending.pop(), []):
            descendants.append(child)
            pending.append(child)
    return descendants


def send_signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_processes(pids: list[int], timeout_s: float) -> list[int]:
    """Send SIGTERM, wait up to timeout_s, then SIGKILL what is left.

    Returns the pids that needed SIGKILL.
    """
    send_signal(pids, signal.SIGTERM)
    wait_until(lambda: not any(is_running(pid) for pid in pids), timeout_s)
    killed = [pid for pid in pids if is_running(pid)]
    send_signal(killed, signal.SIGKILL)
    wait_until(lambda: not any(is_running(pid) for pid in killed), 5)
    return killed


def find_processes(markers: Iterable[str]) -> list[int]:
    """Return the pids of processes whose command line contains any of the markers."""
    markers = tuple(markers)
    own = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        pid = int(entry.name)
        cmdline = read_cmdline(pid)
        if cmdline and any(marker in cmdline for marker in markers) and is_running(pid):
            found.append(pid)
    return found


def pids_listening_on(address: str, port: int) -> list[int]:
    """Return the pids that hold a listening TCP socket on an IPv4 address and port."""
    # /proc/net/tcp writes the address as the hex of its bytes in host order (little-endian).
    wanted = f"{int.from_bytes(ipaddress.IPv4Address(address).packed, 'little'):08X}:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":
            inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
        except OSError:
            continue
        if links & inodes:
            pids.append(int(entry.name))
    return pids


def first_line(text: str) -> str:
    """Return the first non-empty line of a tool's output, for a one-line error message."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def remove_file(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
