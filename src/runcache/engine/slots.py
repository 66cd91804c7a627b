"""Execution slots: how many commands may run at once, and how long a request waits for one.

Only a real run takes a slot. Cache hits and requests sharing another
request's run never wait for one, so a server whose slots are all busy still
answers everything it has cached at once. A request waiting for a slot holds
no thread, only a future on the event loop, so the wait is bounded in time
(``queue_timeout``) rather than in the number of waiters.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from runcache.errors import Busy

#: What a 503 tells a client to wait before trying again. Commands mostly wait
#: on the network for seconds, so a slot is likely free again a few seconds on;
#: much shorter would have clients hammer a server that is already full.
RETRY_AFTER_SECONDS = 5


class Slots:
    """At most ``size`` holders at once; a caller waits at most ``wait`` seconds for a turn.

    Turns are handed out first come, first served. The slots belong to no event
    loop until a caller has to wait, so one engine may serve several loops in turn.
    """

    def __init__(self, size: int, wait: float) -> None:
        self.size = size
        self.wait = wait
        self._held = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def held(self) -> int:
        """How many slots are taken now."""
        return self._held

    @property
    def waiting(self) -> int:
        """How many callers are waiting for a slot now."""
        return len(self._queue)

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold a slot for the block; Busy (a 503 with Retry-After) if none frees up in time."""
        if self._held < self.size and not self._queue:
            self._held += 1
        else:
            await self._wait_for_turn()
        try:
            yield
        finally:
            self._hand_on()

    async def _wait_for_turn(self) -> None:
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._queue.append(turn)
        # Not asyncio.wait_for: before Python 3.12 it swallows a cancellation that
        # arrives just as the turn is handed over, so a cancelled request would run.
        expiry = loop.call_later(self.wait, self._expire, turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._hand_on()  # a slot was handed over just as the wait ended: pass it on
            elif turn in self._queue:
                self._queue.remove(turn)
            raise
        finally:
            expiry.cancel()

    def _expire(self, turn: asyncio.Future[None]) -> None:
        """The wait is over: the waiter gets Busy, unless its turn came first."""
        if not turn.done():
            turn.set_exception(self._busy())

    def _hand_on(self) -> None:
        """Give the slot being freed to the next waiter, or free it."""
        while self._queue:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._held -= 1

    def _busy(self) -> Busy:
        return Busy(
            f"all {self.size} command slots stayed busy for {self.wait:g}s; "
            f"retry in {RETRY_AFTER_SECONDS}s",
            retry_after=RETRY_AFTER_SECONDS,
        )
