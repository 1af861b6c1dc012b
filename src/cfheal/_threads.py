"""Run work on a thread pool while keeping the caller's log context (the run id)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


def map_in_threads(function: Callable[[ItemT], ResultT], items: Iterable[ItemT], *, max_workers: int, name: str) -> list[ResultT]:
    """Apply ``function`` to every item on up to ``max_workers`` threads; results keep the items' order."""
    items = list(items)
    if not items:
        return []
    # structlog's bound context lives in contextvars, which new threads do not inherit.
    context = contextvars.copy_context()
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items)), thread_name_prefix=name) as pool:
        futures = [pool.submit(context.copy().run, function, item) for item in items]
        return [future.result() for future in futures]
