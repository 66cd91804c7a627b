"""Worker pools on Redis Streams: the queue of each pool, its workers' heartbeats, and the
claim of a dead worker's commands.

Keys, under the namespace's one hash tag ``runcache:{<namespace>}:`` beside the job
board's (:mod:`runcache.stores.redis_board`):

- ``pool:<name>``: stream of the pool's commands, one entry a :class:`Task`, read by
  the consumer group ``workers`` (one group per pool) with ``XREADGROUP``. An entry
  is acknowledged and deleted once its job's result is stored and its end is on the
  board, so the stream's length is what is queued plus what runs, and the group's
  pending count is what runs.
- ``pool:<name>:workers``: sorted set of the pool's workers by when their heartbeat
  lapses (Redis's own clock, ``TIME``, so machines' clocks never disagree).
- ``pools``: the names of the pools ever joined (for ``/metrics`` and the dashboard).

A running worker claims its pending entries again at each heartbeat (``XCLAIM`` to
itself), which keeps their idle time short; an entry idle past the claim timeout
belongs to a worker that stopped answering, and ``XAUTOCLAIM`` finds it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import msgspec
import redis
import redis.asyncio

from runcache.stores.board import JobRecord
from runcache.stores.pools import GROUP, WORKER_STOPPED, Task, queue_name
from runcache.stores.redis import mask_password
from runcache.stores.redis_board import _encode, _Failing
from runcache.wire import PoolCounts

_decode_task = msgspec.json.Decoder(Task).decode
_decode_record = msgspec.json.Decoder(JobRecord).decode

#: Queues a task unless the pool has no live worker or a full queue. KEYS: the stream,
#: the workers, the job's hash, the listing index, the pools. ARGV: the task, the
#: record, its start time, the job id, the bound, the pool. Answers {code, count}: 1
#: queued, 0 no live worker, -1 full (count: queued now).
_ENQUEUE = """
local stream, workers, job, index, pools = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', workers, '-inf', ms)
if redis.call('ZCARD', workers) == 0 then return {0, 0} end
local running = 0
if redis.call('EXISTS', stream) == 1 then
  running = redis.call('XPENDING', stream, 'workers')[1]
end
local queued = redis.call('XLEN', stream) - running
if queued >= tonumber(ARGV[5]) then return {-1, queued} end
redis.call('HSET', job, 'r', ARGV[2])
redis.call('ZADD', index, ARGV[3], ARGV[4])
redis.call('XADD', stream, '*', 't', ARGV[1])
redis.call('SADD', pools, ARGV[6])
return {1, queued + 1}
"""

#: A worker's heartbeat. KEYS: the workers. ARGV: the worker, its lifetime in ms.
_BEAT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""

#: Counts the live workers. KEYS: the workers.
_LIVE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], ms, '+inf')
"""

#: Ends a job whose worker stopped answering (or that could not start): its record
#: failed, its end marked, its cache lease released while its token holds it, its
#: entry acknowledged and deleted. KEYS: the stream, the job's hash, its output. ARGV:
#: the entry id, the record, the retention in ms, the lock key, the token.
_FAIL = """
local stream, job, out = KEYS[1], KEYS[2], KEYS[3]
redis.call('HSET', job, 'r', ARGV[2])
redis.call('PEXPIRE', job, ARGV[3])
redis.call('XADD', out, '*', 'end', '1')
redis.call('PEXPIRE', out, ARGV[3])
if ARGV[4] ~= '' and redis.call('GET', ARGV[4]) == ARGV[5] then
  redis.call('DEL', ARGV[4])
end
redis.call('XACK', stream, 'workers', ARGV[1])
redis.call('XDEL', stream, ARGV[1])
return 1
"""

#: Swaps a queued job's record for another while it is the one read (compare and set),
#: so a job is cancelled in its queue or taken by a worker, never both. KEYS: the job's
#: hash, its output. ARGV: the record read, the new one, and for an ended one its
#: retention in ms ('' while it runs). Answers 1 swapped, 0 changed meanwhile.
_SWAP = """
if redis.call('HGET', KEYS[1], 'r') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'r', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('XADD', KEYS[2], '*', 'end', '1')
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
"""

#: Makes a queued job a worker's in one round trip: its record's instance and status,
#: found as written (a JSON string's own quotes are escaped, so only the record's fields
#: match), swapped for the worker's. KEYS: the job's hash. ARGV: the fields while queued,
#: the worker's. Answers 1 taken, 0 not queued (cancelled meanwhile, or gone).
_TAKE = """
local record = redis.call('HGET', KEYS[1], 'r')
if not record then return 0 end
local first, last = string.find(record, ARGV[1], 1, true)
if not first then return 0 end
local taken = string.sub(record, 1, first - 1) .. ARGV[2] .. string.sub(record, last + 1)
redis.call('HSET', KEYS[1], 'r', taken)
return 1
"""

#: Queues a task again after its worker stopped answering (``retries`` allowed it).
#: KEYS: the stream, the job's hash. ARGV: the old entry, the task, the record, the
#: lock key, the token.
_REQUEUE = """
local stream, job = KEYS[1], KEYS[2]
if ARGV[4] ~= '' and redis.call('GET', ARGV[4]) == ARGV[5] then
  redis.call('DEL', ARGV[4])
end
redis.call('HSET', job, 'r', ARGV[3])
redis.call('XACK', stream, 'workers', ARGV[1])
redis.call('XDEL', stream, ARGV[1])
redis.call('XADD', stream, '*', 't', ARGV[2])
return 1
"""


def _instance_and_running(instance: str) -> bytes:
    """A running record's ``instance`` and ``status`` fields as msgspec writes them: next
    to each other, in the order :class:`JobRecord` declares them."""
    return b'"instance":' + _encode(instance) + b',"status":"running"'


class RedisPools:
    """The pools of one Redis namespace: queues, workers' heartbeats, claims."""

    def __init__(self, url: str, namespace: str, timeout: float) -> None:
        self.description = mask_password(url)
        options: dict[str, Any] = {"socket_connect_timeout": timeout}
        self._redis = redis.asyncio.Redis.from_url(url, socket_timeout=timeout, **options)
        #: For XREADGROUP BLOCK, whose socket waits as long as it does.
        self._waiting = redis.asyncio.Redis.from_url(url, **options)
        self._base = f"runcache:{{{namespace}}}:"
        self._enqueue = self._redis.register_script(_ENQUEUE)
        self._beat = self._redis.register_script(_BEAT)
        self._live = self._redis.register_script(_LIVE)
        self._fail = self._redis.register_script(_FAIL)
        self._requeue = self._redis.register_script(_REQUEUE)
        self._swap = self._redis.register_script(_SWAP)
        self._take = self._redis.register_script(_TAKE)

    def _stream(self, pool: str) -> str:
        return self._base + "pool:" + pool

    def _workers(self, pool: str) -> str:
        return self._base + "pool:" + pool + ":workers"

    def _failing(self) -> _Failing:
        return _Failing(self.description, "worker pools on")

    # -- the server's side ------------------------------------------------------------

    async def enqueue(
        self, pool: str, task: Task, record: JobRecord, max_queued: int
    ) -> tuple[int, int]:
        """Queue ``task`` with its job's first record: (1, queued) when queued, (0, 0)
        when the pool has no live worker, (-1, queued) when its queue is full."""
        found: Any
        async with self._failing():
            found = await self._enqueue(
                keys=[
                    self._stream(pool),
                    self._workers(pool),
                    self._base + "job:" + task.job_id,
                    self._base + "jobs",
                    self._base + "pools",
                ],
                args=[
                    _encode(task),
                    _encode(record),
                    repr(record.started_at),
                    task.job_id,
                    max_queued,
                    pool,
                ],
            )
        return int(found[0]), int(found[1])

    async def live_workers(self, pool: str) -> int:
        async with self._failing():
            found: Any = await self._live(keys=[self._workers(pool)])
        return int(found)

    async def counts(self) -> list[PoolCounts]:
        """Every pool's live workers, queued and running commands, by name."""
        names: Any
        async with self._failing():
            members: Any = await self._redis.smembers(self._base + "pools")
            names = sorted(name.decode() for name in members)
            answers = []
            for pool in names:
                workers = await self.live_workers(pool)
                pipe = self._redis.pipeline(transaction=False)
                pipe.xlen(self._stream(pool))
                pipe.xpending(self._stream(pool), GROUP)
                length, pending = await pipe.execute(raise_on_error=False)
                running = int(pending["pending"]) if isinstance(pending, dict) else 0
                length = length if isinstance(length, int) else 0
                answers.append(PoolCounts(pool, workers, max(0, length - running), running))
        return answers

    # -- a worker's side ----------------------------------------------------------------

    async def join(self, pool: str, worker: str, lifetime: float) -> None:
        """Make the pool's group (reading from its queue's start) and beat once."""
        async with self._failing():
            try:
                await self._redis.xgroup_create(self._stream(pool), GROUP, id="0", mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
            await self._redis.sadd(self._base + "pools", pool)
        await self.beat(pool, worker, lifetime)

    async def beat(self, pool: str, worker: str, lifetime: float) -> None:
        async with self._failing():
            await self._beat(
                keys=[self._workers(pool)], args=[worker, max(1, math.ceil(lifetime * 1000))]
            )

    async def leave(self, pool: str, worker: str) -> None:
        async with self._failing():
            await self._redis.zrem(self._workers(pool), worker)

    async def take(
        self, pool: str, worker: str, count: int, block: float
    ) -> list[tuple[str, Task]]:
        """Up to ``count`` new tasks for ``worker``, waiting up to ``block`` seconds."""
        found: Any
        async with self._failing():
            found = await self._waiting.xreadgroup(
                GROUP,
                worker,
                {self._stream(pool): ">"},
                count=count,
                block=max(1, math.ceil(block * 1000)),
            )
        return [
            (entry_id.decode(), _decode_task(fields[b"t"]))
            for _, entries in found or []
            for entry_id, fields in entries
        ]

    async def hold(self, pool: str, worker: str, entries: list[str]) -> None:
        """Claim ``entries`` again for ``worker``: their idle time starts over, so no other
        worker takes them for a dead one's."""
        held: list[str | bytes | int | memoryview[int]] = list(entries)
        if held:
            async with self._failing():
                await self._redis.xclaim(self._stream(pool), GROUP, worker, 0, held, justid=True)

    async def done(self, pool: str, entry: str) -> None:
        """Acknowledge and delete a task whose result is stored and whose end is published."""
        async with self._failing():
            pipe = self._redis.pipeline(transaction=True)
            pipe.xack(self._stream(pool), GROUP, entry)
            pipe.xdel(self._stream(pool), entry)
            await pipe.execute()

    async def end_queued(self, job_id: str, body: bytes, retention: float) -> bool:
        """End a job no worker has taken yet as cancelled, ``body`` its result; False
        once a worker has it (ask that worker instead). Its entry stays in the queue
        until a worker reads it and, finding the job ended, drops it (:meth:`take_job`)."""

        def cancel(record: JobRecord) -> None:
            record.status, record.ended_at, record.body = "cancelled", time.time(), body.decode()
            record.return_code = None

        return await self._swap_queued(job_id, cancel, max(1, math.ceil(retention * 1000)))

    async def take_job(self, pool: str, job_id: str, worker: str) -> bool:
        """Make a queued job ``worker``'s before it runs it: False when it was cancelled
        (or ended) while it waited, and must not run."""
        queued = _instance_and_running(queue_name(pool))
        async with self._failing():
            taken = await self._take(
                keys=[self._base + "job:" + job_id], args=[queued, _instance_and_running(worker)]
            )
        return bool(taken)

    async def _swap_queued(
        self, job_id: str, change: Callable[[JobRecord], None], retention_ms: int | None
    ) -> bool:
        """Apply ``change`` to a job's record if it is still queued, and it alone changed it."""
        key = self._base + "job:" + job_id
        async with self._failing():
            read: Any = await self._redis.hget(key, "r")
            if read is None:
                return False
            record = _decode_record(read)
            if record.ended or record.pool is None or record.instance != queue_name(record.pool):
                return False
            change(record)
            swapped = await self._swap(
                keys=[key, self._base + "out:" + job_id],
                args=[read, _encode(record), "" if retention_ms is None else retention_ms],
            )
        return bool(swapped)

    async def fail(
        self, pool: str, entry: str, record: JobRecord, retention: float, lock: str = ""
    ) -> None:
        """End a task's job with ``record`` (failed), releasing ``lock`` while its lease
        token holds it, and acknowledge the entry."""
        async with self._failing():
            await self._fail(
                keys=[
                    self._stream(pool),
                    self._base + "job:" + record.job_id,
                    self._base + "out:" + record.job_id,
                ],
                args=[
                    entry,
                    _encode(record),
                    max(1, math.ceil(retention * 1000)),
                    lock,
                    record.lease or "",
                ],
            )

    async def reclaim(
        self, pool: str, worker: str, claim_timeout: float, retention: float
    ) -> list[tuple[str, bool]]:
        """Find the tasks of workers silent past ``claim_timeout``: each is queued again
        when its request's retries allow, else its job is failed with
        :data:`WORKER_STOPPED`. The job ids, each with whether it was queued again."""
        found: Any
        async with self._failing():
            found = await self._redis.xautoclaim(
                self._stream(pool),
                GROUP,
                worker,
                max(1, math.ceil(claim_timeout * 1000)),
                start_id="0-0",
                count=100,
            )
        handled = []
        for entry_id, fields in found[1]:
            if not fields:
                continue
            task = _decode_task(fields[b"t"])
            again = await self._settle(pool, entry_id.decode(), task, retention)
            handled.append((task.job_id, again))
        return handled

    async def _settle(self, pool: str, entry: str, task: Task, retention: float) -> bool:
        raw: Any
        async with self._failing():
            raw = await self._redis.hget(self._base + "job:" + task.job_id, "r")
        record = _decode_record(raw) if raw is not None else None
        if record is None:  # expired meanwhile: nothing left to end
            await self.done(pool, entry)
            return False
        lock = self._base + "lock:" + record.cache_key if record.lease else ""
        if task.attempt < task.retries:
            task.attempt += 1
            lease = record.lease or ""
            record.instance, record.pid, record.lease = queue_name(pool), None, None
            record.status = "running"
            async with self._failing():
                await self._requeue(
                    keys=[self._stream(pool), self._base + "job:" + task.job_id],
                    args=[entry, _encode(task), _encode(record), lock, lease],
                )
            return True
        record.status, record.error, record.ended_at = "failed", WORKER_STOPPED, time.time()
        record.body = None
        await self.fail(pool, entry, record, retention, lock)
        return False

    async def aclose(self) -> None:
        for client in (self._redis, self._waiting):
            await client.aclose()


__all__ = ["RedisPools"]
