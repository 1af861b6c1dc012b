"""Client swarm that fills the edge's connection limit, and the helpers that start and stop it.

Run as a program, it opens two populations of WebSockets through the edge:

- live clients, which send a message every few seconds and reconnect after any close or
  failed handshake, after a random delay of 0.5 to 2.5 s;
- stale clients, opened once the live ones are up, which never send anything and exit
  once their connection is dropped. They stand for the zombie connections that a backend
  restart clears.

Every second it rewrites a JSON status file with its counts. It stops on SIGTERM, closing
every connection, or by itself after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

RECONNECT_DELAY_S = (0.5, 2.5)
LIVE_SEND_INTERVAL_S = 5
OPEN_TIMEOUT_S = 5
CLOSE_TIMEOUT_S = 1
# A stale client gives up on its first handshake after this long, e.g. when the edge is full.
STALE_OPEN_DEADLINE_S = 20
# How long the stale clients wait for the live population to be open before starting.
LIVE_READY_TIMEOUT_S = 15
SUMMARY_INTERVAL_S = 5

log = logging.getLogger("swarm")


@dataclass
class SwarmCounts:
    """Counters that the status file reports."""

    live_target: int
    stale_target: int
    live_open: int = 0
    stale_open: int = 0
    stale_exited: int = 0
    stale_gave_up: int = 0
    reconnects: int = 0
    handshake_failures: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "live": {"target": self.live_target, "open": self.live_open},
            "stale": {
                "target": self.stale_target,
                "open": self.stale_open,
                "exited_after_drop": self.stale_exited,
                "gave_up_opening": self.stale_gave_up,
            },
            "reconnects": self.reconnects,
            "handshake_failures": dict(self.handshake_failures),
        }

    def summary(self) -> str:
        failures = ", ".join(f"{k}={v}" for k, v in sorted(self.handshake_failures.items()))
        return (
            f"live open {self.live_open}/{self.live_target}, "
            f"stale open {self.stale_open}/{self.stale_target} "
            f"(exited {self.stale_exited}, gave up {self.stale_gave_up}), "
            f"reconnects {self.reconnects}, failed handshakes: {failures or 'none'}"
        )


def failure_key(error: BaseException) -> str:
    if isinstance(error, InvalidStatus):
        return f"HTTP {error.response.status_code}"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    return type(error).__name__


async def open_connection(url: str) -> ClientConnection:
    # No keepalive pings, so a connection that the edge counts stays open until a side closes it.
    return await connect(url, open_timeout=OPEN_TIMEOUT_S, close_timeout=CLOSE_TIMEOUT_S,
                         ping_interval=None)


async def live_client(index: int, url: str, counts: SwarmCounts) -> None:
    """Keep one live connection open, reconnecting after every close or failed handshake."""
    opened_before = False
    while True:
        try:
            connection = await open_connection(url)
        except (OSError, TimeoutError, WebSocketException) as error:
            counts.handshake_failures[failure_key(error)] += 1
            await asyncio.sleep(random.uniform(*RECONNECT_DELAY_S))
            continue

        if opened_before:
            counts.reconnects += 1
        opened_before = True
        counts.live_open += 1
        try:
            while True:
                await connection.send(f"live-{index} {time.time():.3f}")
                await connection.recv()
                # Waiting on the close rather than sleeping notices a drop at once.
                try:
                    await asyncio.wait_for(connection.wait_closed(), LIVE_SEND_INTERVAL_S)
                    break
                except TimeoutError:
                    continue
        except ConnectionClosed:
            pass
        finally:
            counts.live_open -= 1
            await connection.close()
        log.info("live-%d dropped (code %s), reconnecting", index, connection.close_code)
        await asyncio.sleep(random.uniform(*RECONNECT_DELAY_S))


async def stale_client(index: int, url: str, counts: SwarmCounts) -> None:
    """Open one connection, hold it without sending, and exit once it is dropped."""
    deadline = time.monotonic() + STALE_OPEN_DEADLINE_S
    while True:
        try:
            connection = await open_connection(url)
            break
        except (OSError, TimeoutError, WebSocketException) as error:
            counts.handshake_failures[failure_key(error)] += 1
            if time.monotonic() >= deadline:
                counts.stale_gave_up += 1
                log.warning("stale-%d gave up opening after %d s (last: %s)",
                            index, STALE_OPEN_DEADLINE_S, failure_key(error))
                return
            await asyncio.sleep(random.uniform(*RECONNECT_DELAY_S))

    counts.stale_open += 1
    try:
        await connection.wait_closed()
        log.info("stale-%d dropped (code %s), exiting", index, connection.close_code)
        counts.stale_exited += 1
    finally:
        counts.stale_open -= 1
        await connection.close()


def write_status(path: Path, counts: SwarmCounts, args: argparse.Namespace,
                 started: float, running: bool) -> None:
    status = {
        "pid": os.getpid(),
        "running": running,
        "url": args.url,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **counts.as_dict(),
    }
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(temporary, path)


async def run(args: argparse.Namespace) -> None:
    counts = SwarmCounts(live_target=args.live, stale_target=args.stale)
    started = time.time()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def report() -> None:
        last_summary = ""
        last_logged = 0.0
        while True:
            write_status(args.status_file, counts, args, started, running=True)
            summary = counts.summary()
            if summary != last_summary and time.monotonic() - last_logged >= SUMMARY_INTERVAL_S:
                log.info("%s", summary)
                last_summary, last_logged = summary, time.monotonic()
            await asyncio.sleep(1)

    async def launch() -> None:
        for index in range(args.live):
            tasks.append(asyncio.create_task(live_client(index, args.url, counts)))
        if args.stale == 0:
            return
        ready_by = time.monotonic() + LIVE_READY_TIMEOUT_S
        while counts.live_open < args.live and time.monotonic() < ready_by:
            await asyncio.sleep(0.1)
        log.info("live population open %d/%d, opening %d stale clients",
                 counts.live_open, args.live, args.stale)
        for index in range(args.stale):
            tasks.append(asyncio.create_task(stale_client(index, args.url, counts)))

    log.info("swarm starting: %d live and %d stale clients to %s, stopping after %d s",
             args.live, args.stale, args.url, args.max_seconds)
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(report())]
    launcher = asyncio.create_task(launch())
    try:
        await asyncio.wait_for(stop.wait(), timeout=args.max_seconds)
        log.info("SIGTERM received, closing connections")
    except TimeoutError:
        log.info("max run time of %d s reached, closing connections", args.max_seconds)

    launcher.cancel()
    for task in tasks:
        task.cancel()
    # Each task closes its connection on cancellation, within CLOSE_TIMEOUT_S.
    await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S + 2)
    log.info("swarm stopped: %s", counts.summary())
    write_status(args.status_file, counts, args, started, running=False)


def main() -> int:
    parser = argparse.ArgumentParser(description="WebSocket client swarm of the cfheal lab.")
    parser.add_argument("--url", required=True, help="WebSocket URL to open, through the edge")
    parser.add_argument("--live", type=int, required=True, help="number of live clients")
    parser.add_argument("--stale", type=int, required=True, help="number of stale clients")
    parser.add_argument("--status-file", type=Path, required=True,
                        help="JSON file rewritten every second with the counts")
    parser.add_argument("--max-seconds", type=int, default=3600,
                        help="stop by itself after this many seconds (default 3600)")
    args = parser.parse_args()

    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(run(args))
    return 0


# Helpers for scripts/lab: start, stop and read the swarm from outside.

@dataclass(frozen=True)
class SwarmFiles:
    """Pid file, status file and log of a swarm started by scripts/lab."""

    pid_file: Path
    status_file: Path
    log_file: Path


def swarm_pid(files: SwarmFiles) -> int | None:
    from procs import pid_from_file

    # The status file path, not this script's path, marks the swarm: a swarm started from
    # another checkout of the repository drives the same lab and must be found too.
    return pid_from_file(files.pid_file, str(files.status_file))


def start_swarm(files: SwarmFiles, url: str, live: int, stale: int, max_seconds: int) -> int:
    """Start the swarm detached and return its pid."""
    files.pid_file.parent.mkdir(parents=True, exist_ok=True)
    files.log_file.parent.mkdir(parents=True, exist_ok=True)
    files.status_file.unlink(missing_ok=True)
    with open(files.log_file, "ab") as log_file:
        process = subprocess.Popen(
            [
                sys.executable, str(Path(__file__).resolve()),
                "--url", url,
                "--live", str(live),
                "--stale", str(stale),
                "--status-file", str(files.status_file),
                "--max-seconds", str(max_seconds),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
            close_fds=True,
        )
    files.pid_file.write_text(f"{process.pid}\n")
    return process.pid


def stop_swarm(files: SwarmFiles) -> bool:
    """Stop the swarm, closing all its connections, and return False when none ran."""
    from procs import remove_file, stop_processes

    # A swarm whose pid file was lost (removed by another checkout's run) still holds the
    # edge's slots, so every process marked with this lab's status file is stopped.
    pids = set(swarm_processes(files))
    pid = swarm_pid(files)
    if pid is not None:
        pids.add(pid)
    if not pids:
        remove_file(files.pid_file)
        return False
    stop_processes(sorted(pids), CLOSE_TIMEOUT_S + 8)
    remove_file(files.pid_file)
    return True


def swarm_processes(files: SwarmFiles) -> list[int]:
    """Return the pids of every running swarm process that writes this lab's status file."""
    from procs import read_cmdline

    marker = str(files.status_file)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            cmdline = read_cmdline(int(entry.name))
            if "swarm.py" in cmdline and marker in cmdline:
                pids.append(int(entry.name))
    return pids


def read_swarm_status(files: SwarmFiles) -> dict[str, Any] | None:
    try:
        return json.loads(files.status_file.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
