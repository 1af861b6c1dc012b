"""WebSocket echo backend of the cfheal lab, run as PID 1 of a ws-backend container.

Behaviour is steered by files in the control directory (mounted read-only at /control):

    mode            "ok" (also when missing): accept every handshake (101) and echo.
                    "fail": reject every handshake with HTTP 503 and log an ERROR line.
                    "log-errors": serve as "ok" but log an ERROR line every second.
    crash-on-start  when present at start: log an ERROR line and exit 1, like a container
                    that does not come back after a restart.

The mode file is read on every handshake and once a second, so a change applies at once.
Only the standard library and websockets are used, because this file runs inside the
container with the host's venv mounted read-only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from http import HTTPStatus
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

MODES = ("ok", "fail", "log-errors")
# Shutdown must fit in the container's 2 s stop grace period before Docker sends SIGKILL.
CLOSE_TIMEOUT_S = 1

log = logging.getLogger("backend")


class ControlFiles:
    """Reader of the mode file, which logs an invalid value once per change."""

    def __init__(self, control_dir: Path) -> None:
        self.mode_file = control_dir / "mode"
        self.crash_flag = control_dir / "crash-on-start"
        self.last_invalid: str | None = None

    def mode(self) -> str:
        try:
            value = self.mode_file.read_text().strip()
        except FileNotFoundError:
            return "ok"
        except OSError as error:
            log.warning("failed to read %s: %s, using mode ok", self.mode_file, error)
            return "ok"
        if value in MODES:
            self.last_invalid = None
            return value
        if value != self.last_invalid:
            log.warning("invalid mode %r in %s (expected one of %s), using ok",
                        value, self.mode_file, ", ".join(MODES))
            self.last_invalid = value
        return "ok"


def peer_text(connection: ServerConnection) -> str:
    address = connection.remote_address
    peer = f"{address[0]}:{address[1]}" if address else "unknown"
    forwarded = connection.request.headers.get("X-Forwarded-For") if connection.request else None
    return f"peer={peer} forwarded_for={forwarded}" if forwarded else f"peer={peer}"


async def echo(connection: ServerConnection) -> None:
    opened = time.monotonic()
    path = connection.request.path if connection.request else "?"
    log.info("open %s path=%s", peer_text(connection), path)
    try:
        async for message in connection:
            await connection.send(message)
    except ConnectionClosed:
        pass
    finally:
        log.info("close %s code=%s duration=%.1fs",
                 peer_text(connection), connection.close_code, time.monotonic() - opened)


async def log_errors_while_requested(control: ControlFiles) -> None:
    while True:
        if control.mode() == "log-errors":
            log.error("upstream database unreachable")
        await asyncio.sleep(1)


async def run(args: argparse.Namespace, control: ControlFiles) -> int:
    def reject_in_fail_mode(connection: ServerConnection, request: Request) -> Response | None:
        if control.mode() != "fail":
            return None
        log.error("rejected handshake with HTTP 503 (mode fail) %s path=%s",
                  peer_text(connection), request.path)
        return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "backend in fail mode\n")

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Without a handler PID 1 ignores SIGTERM, and docker stop would wait for SIGKILL.
        loop.add_signal_handler(sig, lambda sig=sig: stop.done() or stop.set_result(sig))

    try:
        server = await serve(
            echo,
            args.listen,
            args.port,
            process_request=reject_in_fail_mode,
            # No keepalive pings: a silent client keeps its connection, as stale clients do.
            ping_interval=None,
            close_timeout=CLOSE_TIMEOUT_S,
        )
    except OSError as error:
        log.error("failed to listen on %s:%s: %s", args.listen, args.port, error)
        return 1

    log.info("%s listening on ws://%s:%s/ws/ (mode %s)", args.name, args.listen, args.port,
             control.mode())
    error_logger = asyncio.create_task(log_errors_while_requested(control))
    received = await stop
    open_count = len(server.connections)
    log.info("received %s, closing %d connections", signal.Signals(received).name, open_count)
    error_logger.cancel()
    server.close()
    await server.wait_closed()
    log.info("%s stopped", args.name)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="WebSocket echo backend of the cfheal lab.")
    parser.add_argument("--listen", required=True, help="IP address to listen on")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--name", required=True, help="lab host name, for the log")
    parser.add_argument("--control-dir", type=Path, default=Path("/control"),
                        help="directory with the mode and crash-on-start files (default /control)")
    args = parser.parse_args()

    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    logging.Formatter.converter = time.gmtime
    # websockets logs each failed handshake with a traceback, and the backend logs its own lines.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)

    control = ControlFiles(args.control_dir)
    if control.crash_flag.exists():
        log.error("%s: %s exists, exiting with status 1 (simulated crash on start)",
                  args.name, control.crash_flag)
        return 1
    return asyncio.run(run(args, control))


if __name__ == "__main__":
    sys.exit(main())
