"""A pool's worker: takes the commands queued for its pool and runs them through its engine.

``runcache worker --pool NAME`` builds an :class:`~runcache.engine.engine.Engine`
as ``serve`` does (the same runner, containment, limits, allowlist, run context
rules and output caps, from the worker's own settings: policy applies where a
command runs), joins the pool's consumer group and reads its queue with
``XREADGROUP`` (:mod:`runcache.stores.redis_pools`). Each task goes through the
engine's one door, :meth:`Engine.start`, under the job id the queuing server
chose, so its job is published on the job board as this worker's: output,
events, cancel, pause and resume reach it from any server with no machinery of
their own. A task is acknowledged once its job has ended and its end (with the
stored result) is on the board.

Its heartbeat (the pool's workers set) is what a server reads before it queues:
a pool without one answers 503 at once. At each heartbeat the worker claims its
running tasks again (their idle time starts over) and looks for those of workers
silent past ``--claim-timeout``, failing (or, with ``retries``, queuing again)
each. SIGTERM cancels every running command, publishes the ends, and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import msgspec

from runcache import wire
from runcache.config import Config
from runcache.engine.callers import Caller
from runcache.engine.engine import Engine
from runcache.engine.jobs import Job
from runcache.errors import ConfigError, RuncacheError, StoreError
from runcache.stores.board import HEARTBEAT_SECONDS, JobRecord
from runcache.stores.pools import Task
from runcache.stores.redis_pools import RedisPools

log = logging.getLogger("runcache")

#: The variable each command a worker runs finds its worker's name in.
WORKER_VARIABLE = "RUNCACHE_WORKER"

#: Longest a read of the queue blocks before the worker looks at its state again.
READ_SECONDS = 1.0

#: How long a stop waits for the cancelled runs to end and be published.
STOP_SECONDS = 10.0

_decode_request = msgspec.json.Decoder(wire.RunRequest).decode


class Worker:
    """One worker process of one pool."""

    def __init__(self, engine: Engine, pool: str, concurrency: int) -> None:
        if engine.pools is None or engine.shared is None:
            raise RuncacheError("a worker needs a redis:// store (--store)")
        self.engine = engine
        self.pools: RedisPools = engine.pools
        self.pool = pool
        self.concurrency = concurrency
        #: Its name on the job board, in the pool and in its commands' RUNCACHE_WORKER.
        self.name = engine.shared.instance
        engine.worker_pool = pool
        engine.jobs.pool = pool
        engine.runner.env[WORKER_VARIABLE] = self.name
        #: The tasks taken and not yet acknowledged: entry id to its job (None until made).
        self._taken: dict[str, Job | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        #: Set once the worker is in its pool (its group made, its first heartbeat).
        self.joined = asyncio.Event()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Stop taking tasks; cancel what runs (the loop's side of SIGTERM)."""
        self._stopping.set()

    async def run(self) -> None:
        """Serve the pool until :meth:`stop`; then cancel the running commands, publish
        their ends and leave the pool."""
        engine = self.engine
        await engine.serve_jobs()
        await self.pools.join(self.pool, self.name, engine.config.instance_timeout)
        self.joined.set()
        beat = asyncio.ensure_future(self._beats())
        try:
            while not self._stopping.is_set():
                await self._take_some()
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            await self._wind_down()

    async def _take_some(self) -> None:
        """Read as many tasks as there are free places, or wait for one to free."""
        free = self.concurrency - len(self._taken)
        if free <= 0:
            await asyncio.wait(
                [*self._tasks, asyncio.ensure_future(self._stopping.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            return
        try:
            taken = await self.pools.take(self.pool, self.name, free, READ_SECONDS)
        except StoreError as error:
            log.warning("pool %s: %s", self.pool, error.message)
            await asyncio.sleep(READ_SECONDS)
            return
        for entry, task in taken:
            self._taken[entry] = None
            running = asyncio.ensure_future(self._run(entry, task))
            self._tasks.add(running)
            running.add_done_callback(self._tasks.discard)

    async def _run(self, entry: str, task: Task) -> None:
        """Run one task through the engine's door, then acknowledge it."""
        engine = self.engine
        caller = Caller(task.client, task.credential, task.identity)
        try:
            if not await self.pools.take_job(self.pool, task.job_id, self.name):
                await self.pools.done(self.pool, entry)  # cancelled while it waited
                return
            try:
                request = _decode_request(task.request)
                job, _ = await engine.start(request, caller, job_id=task.job_id)
            except (RuncacheError, msgspec.ValidationError) as error:
                await self._refused(entry, task, str(error))
                return
            self._taken[entry] = job
            if not task.background:
                job.holders = 0  # a foreground request's clients wait on the server
            while not job.ended:
                await job.changed()
            await job.published()
            await self.pools.done(self.pool, entry)
        except StoreError as error:  # left pending: the claim of another worker ends it
            log.warning("pool %s, job %s: %s", self.pool, task.job_id, error.message)
        finally:
            self._taken.pop(entry, None)

    async def _refused(self, entry: str, task: Task, message: str) -> None:
        """A task the engine refused (the allowlist, a bound): its job failed with why."""
        record = JobRecord(
            job_id=task.job_id,
            command="",
            cache_key="",
            instance=self.name,
            status="failed",
            started_at=0.0,
            error=message,
            pool=self.pool,
        )
        with contextlib.suppress(msgspec.ValidationError):
            request = _decode_request(task.request)
            record.command = request.command
        found = await self.engine.shared.board.get(task.job_id) if self.engine.shared else None
        if found is not None:
            record.cache_key, record.started_at = found.cache_key, found.started_at
            record.owners, record.background = found.owners, found.background
        record.ended_at = time.time()
        record.started_at = record.started_at or record.ended_at
        await self.pools.fail(self.pool, entry, record, self.engine.config.job_retention)

    async def _beats(self) -> None:
        """The heartbeat; the running tasks claimed again; dead workers' tasks settled."""
        config = self.engine.config
        while True:
            try:
                await self.pools.beat(self.pool, self.name, config.instance_timeout)
                await self.pools.hold(self.pool, self.name, list(self._taken))
                for job_id, again in await self.pools.reclaim(
                    self.pool, self.name, config.claim_timeout, config.job_retention
                ):
                    log.warning(
                        "pool %s: job %s's worker stopped answering: %s",
                        self.pool,
                        job_id,
                        "queued again" if again else "marked failed",
                    )
            except StoreError as error:
                log.warning("pool %s: %s", self.pool, error.message)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _wind_down(self) -> None:
        """Cancel every running job, wait (bounded) for their ends to be published and
        acknowledged, and leave the pool."""
        for job in list(self._taken.values()):
            if job is not None:
                self.engine.cancel(job)
        self.engine.runner.kill_all()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_SECONDS)
        with contextlib.suppress(StoreError):
            await self.pools.leave(self.pool, self.name)


def serve_worker(config: Config, pool: str, concurrency: int) -> None:
    """Run a worker of ``pool`` until SIGTERM or Ctrl-C; print its ready line once it is
    in the pool. A store that is not Redis is refused with why."""
    engine = Engine.from_config(config)
    if engine.pools is None or engine.shared is None:
        engine.close()
        raise ConfigError(
            f"runcache worker needs a redis:// store (--store): pools are queues on Redis "
            f"Streams, and the store is {engine.cache.store.description}"
        )
    try:
        asyncio.run(_serve(Worker(engine, pool, concurrency)))
    finally:
        engine.close()


async def _serve(worker: Worker) -> None:
    engine = worker.engine
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not worker.stopping:
            log.info("runcache stopping: killing %d running command(s)", engine.runner.running)
        worker.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    running = asyncio.ensure_future(worker.run())
    await worker.joined.wait()
    log.info(
        "runcache worker %s serving pool %s (store %s, concurrency %d, pid %d)",
        worker.name,
        worker.pool,
        engine.cache.store.description,
        worker.concurrency,
        os.getpid(),
        extra={"worker": worker.name, "pool": worker.pool, "pid": os.getpid()},
    )
    print(f"runcache worker {worker.name} serving pool {worker.pool}", flush=True)
    try:
        await running
    finally:
        await engine.aclose()
