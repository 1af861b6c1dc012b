"""Run history, actions, the breaker, the pause switch and the single-actor lock.

Everything lives in the state directory: SQLite (``cfheal.db``) for what later commands and
people read, and an flock on ``run.lock`` for who may act. The kernel releases an flock when
its holder dies, even by kill -9, so a dead controller never leaves a stale lock. A run it
left unfinished is found by its recorded pid and reported as interrupted on the next start.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import CfhealError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    command TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    diagnosis TEXT,
    outcome TEXT,
    reason TEXT,
    report TEXT NOT NULL,
    pid INTEGER
);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS switches (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


class StateError(CfhealError):
    """The state directory cannot be used, or another run holds the lock."""


class LockHeld(StateError):
    """Another cfheal process is acting on these hosts."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Store:
    """The state directory of one configuration."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "cfheal.db"

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StateError(f"cannot create state directory {self.state_dir}: {error.strerror}; set state_dir to a writable path") from None
        # A short-lived connection per call: the store is used from several threads.
        with closing(sqlite3.connect(self.path, timeout=10)) as db:
            db.executescript(_SCHEMA)
            with db:
                yield db

    # Runs

    def start_run(self, run_id: str, command: str, started_at: str) -> None:
        """Record a run as started, with this process's pid, before it touches anything."""
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs (run_id, command, started_at, report, pid) VALUES (?, ?, ?, ?, ?)",
                (run_id, command, started_at, json.dumps({"run_id": run_id, "command": command, "started_at": started_at}), os.getpid()),
            )

    def record_run(self, report: dict[str, Any]) -> None:
        """Insert or update one run's full report."""
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    report["run_id"],
                    report["command"],
                    report["started_at"],
                    report.get("finished_at"),
                    (report.get("diagnosis") or {}).get("kind"),
                    report.get("outcome"),
                    report.get("reason"),
                    json.dumps(report),
                    os.getpid(),
                ),
            )

    def list_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT report, outcome, reason, finished_at FROM runs ORDER BY started_at DESC, rowid DESC LIMIT ?", (limit,)).fetchall()
        return [_merge_row(*row) for row in rows]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT report, outcome, reason, finished_at FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _merge_row(*row) if row else None

    def last_rollout(self) -> dict[str, Any] | None:
        """Return the newest recorded run whose rollout restarted every batch, or None.

        An aborted rollout never cleared the limit, so the limit cannot have come back after it.
        """
        for report in self.list_runs(limit=50):
            if report.get("finished_at") and (report.get("rollout") or {}).get("outcome") == "completed":
                return report
        return None

    def recover_dead_runs(self) -> list[dict[str, Any]]:
        """Mark runs left unfinished by a process that no longer exists as interrupted."""
        with self._db() as db:
            rows = db.execute("SELECT run_id, pid FROM runs WHERE finished_at IS NULL").fetchall()
            dead = [run_id for run_id, pid in rows if pid is None or not _process_alive(pid)]
            for run_id in dead:
                db.execute(
                    "UPDATE runs SET finished_at = ?, outcome = 'interrupted', reason = ? WHERE run_id = ?",
                    (_now(), "the cfheal process died during this run; check the containers it may have been restarting", run_id),
                )
        return [self.get_run(run_id) for run_id in dead]

    # Actions, cooldowns and the budget

    def record_actions(self, run_id: str, kind: str, targets: list[str]) -> None:
        with self._db() as db:
            db.executemany("INSERT INTO actions (run_id, at, kind, target) VALUES (?, ?, ?, ?)", [(run_id, time.time(), kind, target) for target in targets])

    def actions_since(self, since: float) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT run_id, at, kind, target FROM actions WHERE at >= ? ORDER BY at", (since,)).fetchall()
        return [{"run_id": run_id, "at": at, "kind": kind, "target": target} for run_id, at, kind, target in rows]

    # Switches: the breaker and the pause

    def get_switch(self, name: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT value FROM switches WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_switch(self, name: str, value: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO switches VALUES (?, ?, ?)", (name, json.dumps({**value, "since": _now()}), _now()))

    def clear_switch(self, name: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM switches WHERE name = ?", (name,)).rowcount > 0


def _merge_row(report: str, outcome: str | None, reason: str | None, finished_at: str | None) -> dict[str, Any]:
    # The columns win over the stored report: recovery of a dead run updates only the columns.
    document = json.loads(report)
    document["outcome"] = outcome
    document["reason"] = reason or document.get("reason", "")
    document["finished_at"] = finished_at
    return document


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(state_dir: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock that lets only one cfheal act on this configuration's hosts at a time.

    Raises LockHeld at once when another process holds it, unless ``wait`` is set.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StateError(f"cannot create state directory {state_dir}: {error.strerror}") from None
    path = state_dir / "run.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise LockHeld(f"another cfheal process (pid {holder}) is acting on these hosts; lock {path}. Wait for it or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
