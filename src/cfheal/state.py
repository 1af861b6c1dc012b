"""Run history and the single-actor lock, kept in the state directory.

Runs are stored in SQLite so that a later command (or a person) can read what each run saw
and did. The lock is an flock on a file: the kernel releases it when the holder dies, even
by kill -9, so a crashed controller never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
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
    report TEXT NOT NULL
)
"""


class StateError(CfhealError):
    """The state directory cannot be used, or another run holds the lock."""


def _ensure_dir(state_dir: Path) -> Path:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StateError(f"cannot create state directory {state_dir}: {error.strerror}; set state_dir to a writable path") from None
    return state_dir


def record_run(state_dir: Path, report: dict[str, Any]) -> None:
    """Insert or update one run's report."""
    path = _ensure_dir(state_dir) / "cfheal.db"
    with sqlite3.connect(path) as db:
        db.execute(_SCHEMA)
        db.execute(
            "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                report["run_id"],
                report["command"],
                report["started_at"],
                report.get("finished_at"),
                (report.get("diagnosis") or {}).get("kind"),
                report.get("outcome"),
                report.get("reason"),
                json.dumps(report),
            ),
        )


def list_runs(state_dir: Path, limit: int = 20) -> list[dict[str, Any]]:
    path = state_dir / "cfheal.db"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        db.execute(_SCHEMA)
        rows = db.execute("SELECT report FROM runs ORDER BY started_at DESC LIMIT ?", (limit,)).fetchall()
    return [json.loads(row[0]) for row in rows]


def last_rollout(state_dir: Path) -> dict[str, Any] | None:
    """Return the newest recorded run that restarted backends, or None."""
    for report in list_runs(state_dir, limit=50):
        if report.get("rollout") and report["rollout"].get("batches") and report.get("finished_at"):
            if any(batch.get("restarted") for batch in report["rollout"]["batches"]):
                return report
    return None


@contextmanager
def run_lock(state_dir: Path) -> Iterator[None]:
    """Hold the lock that lets only one cfheal act on this configuration's hosts at a time."""
    path = _ensure_dir(state_dir) / "run.lock"
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StateError(f"another cfheal run (pid {holder}) is acting on these hosts; lock {path}. Wait for it or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()
