"""Identical concurrent requests run once: the first starts the run, the rest await its answer.

Waiting costs no thread: each caller awaits the same task. The run is a task of
its own rather than the first caller's coroutine, so a caller that goes away
(its connection closed, its request cancelled) neither cancels the run nor the
answer the others are waiting for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Runs at most one call per key at a time; callers arriving meanwhile share its result."""

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Task[T]] = {}
        self._waiters: dict[str, int] = {}

    async def run(self, key: str, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Return ``call()``'s result and whether it came from another caller's run."""
        flight = self._flights.get(key)
        shared = flight is not None
        if flight is None:
            flight = asyncio.ensure_future(call())
            self._flights[key] = flight
            self._waiters[key] = 0
            flight.add_done_callback(lambda done: self._landed(key, done))
        else:
            self._waiters[key] += 1
        return await asyncio.shield(flight), shared

    def _landed(self, key: str, flight: asyncio.Task[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
            del self._waiters[key]
        if not flight.cancelled():
            flight.exception()  # retrieved, so a run nobody awaits any more logs no warning

    def waiters(self, key: str) -> int:
        """How many callers are waiting for the run of ``key`` in flight now, besides the first."""
        return self._waiters.get(key, 0)

    def __len__(self) -> int:
        return len(self._flights)
