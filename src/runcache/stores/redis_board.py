"""The job board in Redis: records in hashes, live output in streams, control in streams.

Keys, all under the namespace's one hash tag ``runcache:{<namespace>}:`` (so every
script's keys share a slot):

- ``job:<id>``: hash; ``r`` the record's JSON, ``reaped`` the wall clock time the
  reaper marked it failed. It expires ``retention`` seconds after the job ends.
- ``jobs``: sorted set of job ids by start time, the listing's index (ids whose
  record expired are dropped as a listing meets them).
- ``running``: hash of the running jobs' ids to the instance running each;
  ``leases``: the ids of those holding their key's single-flight lock (``lock:<key>``,
  :mod:`runcache.stores.redis`) to ``<key>\\n<token>``: the reaper deletes that lock
  only while the job's token holds it (it may have lapsed and been taken by another).
- ``out:<id>``: stream of a job's output; each entry ``s`` (stream), ``o`` (offset),
  ``d`` (bytes), and a last entry ``end`` when the job ends, so one ``XREAD BLOCK``
  wakes a reader on new output and on the end alike. Bounded by the run's own output
  cap: what is appended is what the run captured.
- ``instance:<name>``: an instance's heartbeat, expiring after the instance timeout.
- ``control:<name>``: stream of control requests to an instance, read with
  ``XREAD BLOCK``; each answer is pushed on ``reply:<token>``, which the requester
  waits on with ``BLOPOP``. No polled lists, no sleeps.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from typing import Any

import msgspec
import redis
import redis.asyncio

from runcache.errors import StoreError
from runcache.stores.board import (
    STOPPED_ANSWERING,
    Chunk,
    ControlAnswer,
    ControlRequest,
    JobRecord,
    Round,
    Update,
    instance_name,
)
from runcache.stores.redis import mask_password

#: Ids the listing index keeps at the most (finished jobs are listed up to 1,000).
_INDEX_KEPT = 2000

#: Seconds an unread control answer is kept.
_REPLY_SECONDS = 30

#: Control requests an instance's stream keeps at the most.
_CONTROL_KEPT = 1000

#: Marks failed the running jobs of silent instances, marks their ends and releases
#: their cache leases. KEYS: running, leases. ARGV: the namespace's key prefix, the
#: wall clock, the retention in ms.
_REAP = """
local running_key, leases_key = KEYS[1], KEYS[2]
local base, now, retention = ARGV[1], ARGV[2], tonumber(ARGV[3])
local reaped = {}
local running = redis.call('HGETALL', running_key)
for i = 1, #running, 2 do
  local id, instance = running[i], running[i + 1]
  if redis.call('EXISTS', base .. 'instance:' .. instance) == 0 then
    local job, out = base .. 'job:' .. id, base .. 'out:' .. id
    redis.call('HSET', job, 'reaped', now)
    redis.call('PEXPIRE', job, retention)
    redis.call('XADD', out, '*', 'end', '1')
    redis.call('PEXPIRE', out, retention)
    local lease = redis.call('HGET', leases_key, id)
    if lease then
      local cut = string.find(lease, '\\n', 1, true)
      local lock = base .. 'lock:' .. string.sub(lease, 1, cut - 1)
      if redis.call('GET', lock) == string.sub(lease, cut + 1) then
        redis.call('DEL', lock)
      end
      redis.call('HDEL', leases_key, id)
    end
    redis.call('HDEL', running_key, id)
    reaped[#reaped + 1] = id
  end
end
return reaped
"""

#: Appends a round's output: KEYS, each chunk's job stream; ARGV, each chunk's stream
#: name, offset and bytes. One command however many chunks: what the round costs the
#: loop is packing arguments, not a pipeline's bookkeeping per command.
_APPEND = """
for i = 1, #KEYS do
  local at = 3 * i - 2
  redis.call('XADD', KEYS[i], '*', 's', ARGV[at], 'o', ARGV[at + 1], 'd', ARGV[at + 2])
end
return #KEYS
"""

_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(JobRecord).decode


def _reaped(record: JobRecord, when: float) -> JobRecord:
    """A record as the reaper left it: failed, with the reason, at ``when``."""
    record.status, record.error, record.ended_at = "failed", STOPPED_ANSWERING, when
    return record


class RedisBoard:
    """The job board of the instances sharing one Redis namespace."""

    def __init__(
        self, url: str, namespace: str, instance_timeout: float, timeout: float, retention: float
    ) -> None:
        self.instance = instance_name()
        self.instance_timeout = instance_timeout
        self.retention = retention
        self.description = mask_password(url)
        self._timeout = timeout
        options: dict[str, Any] = {"socket_connect_timeout": timeout}
        #: Calls that answer at once; and a client for those that wait (XREAD, BLPOP),
        #: whose socket waits as long as they do.
        self._redis = redis.asyncio.Redis.from_url(url, socket_timeout=timeout, **options)
        self._waiting = redis.asyncio.Redis.from_url(url, **options)
        base = f"runcache:{{{namespace}}}:"
        self._base = base
        self._index = base + "jobs"
        self._running = base + "running"
        self._leases = base + "leases"
        self._heartbeat = base + "instance:" + self.instance
        self._inbox = base + "control:" + self.instance
        self._inbox_cursor = "0"
        self._reap = self._redis.register_script(_REAP)
        self._append = self._redis.register_script(_APPEND)

    # -- records ----------------------------------------------------------------------

    async def write(self, batch: Round) -> None:
        async with self._failing():
            if batch.output:  # first: a job's end comes after its output
                keys: list[str] = []
                args: list[str | int | bytes] = []
                for job_id, chunks in batch.output:
                    for stream, offset, data in chunks:
                        keys.append(self._out(job_id))
                        args += (stream, offset, data)
                await self._append(keys=keys, args=args)
            if not (batch.records or batch.ended):
                return
            # In order; no MULTI: every reply parsed once, not twice.
            pipe = self._redis.pipeline(transaction=False)
            for record in batch.records:
                self._publish(pipe, record)
            if batch.records:
                pipe.zremrangebyrank(self._index, 0, -_INDEX_KEPT - 1)
            for record in batch.ended:
                self._end(pipe, record)
            await pipe.execute()

    async def publish(self, record: JobRecord) -> None:
        await self.write(Round(records=[record]))

    def _publish(self, pipe: Any, record: JobRecord) -> None:
        pipe.hset(self._job(record.job_id), "r", _encode(record))
        pipe.zadd(self._index, {record.job_id: record.started_at})
        if record.pool is not None:  # its pool's claim reaps it (redis_pools)
            return
        pipe.hset(self._running, record.job_id, record.instance)
        if record.cacheable and record.lease is not None:
            pipe.hset(self._leases, record.job_id, record.cache_key + "\n" + record.lease)

    def _end(self, pipe: Any, record: JobRecord) -> None:
        keep = self._kept_ms()
        pipe.hset(self._job(record.job_id), "r", _encode(record))
        pipe.pexpire(self._job(record.job_id), keep)
        pipe.zadd(self._index, {record.job_id: record.started_at})
        pipe.xadd(self._out(record.job_id), {"end": 1})
        pipe.pexpire(self._out(record.job_id), keep)
        pipe.hdel(self._running, record.job_id)
        pipe.hdel(self._leases, record.job_id)

    async def get(self, job_id: str) -> JobRecord | None:
        found: Any
        async with self._failing():
            found = await self._redis.hmget(self._job(job_id), ["r", "reaped"])
        return _record(found)

    async def listing(self) -> list[JobRecord]:
        ids: Any
        async with self._failing():
            ids = await self._redis.zrevrange(self._index, 0, _INDEX_KEPT - 1)
            if not ids:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(self._job(job_id.decode()), ["r", "reaped"])
            found = await pipe.execute()
            gone = [job_id for job_id, fields in zip(ids, found, strict=True) if fields[0] is None]
            if gone:
                await self._redis.zrem(self._index, *gone)
        horizon = time.time() - self.retention
        records = [_record(fields) for fields in found]
        return [
            record
            for record in records
            if record is not None and (record.ended_at is None or record.ended_at >= horizon)
        ]

    # -- output -----------------------------------------------------------------------

    async def wait(self, job_id: str, cursor: str, timeout: float) -> Update:
        entries: Any
        async with self._failing():
            if timeout <= 0:
                start = "-" if cursor == "0" else "(" + cursor
                entries = await self._redis.xrange(self._out(job_id), start, "+")
            else:
                found: Any = await self._waiting.xread(
                    {self._out(job_id): cursor}, block=max(1, math.ceil(timeout * 1000))
                )
                entries = found[0][1] if found else []
        chunks: list[Chunk] = []
        ended = False
        for entry_id, fields in entries:
            cursor = entry_id.decode()
            if b"end" in fields:
                ended = True
            else:
                chunks.append((fields[b"s"].decode(), int(fields[b"o"]), fields[b"d"]))
        return Update(cursor, chunks, ended)

    # -- control ----------------------------------------------------------------------

    async def control(self, record: JobRecord, verb: str, timeout: float) -> ControlAnswer | None:
        reply = self._base + "reply:" + secrets.token_hex(12)
        request = ControlRequest(reply=reply, job_id=record.job_id, verb=verb)
        async with self._failing():
            await self._redis.xadd(
                self._base + "control:" + record.instance,
                {"q": _encode(request)},
                maxlen=_CONTROL_KEPT,
                approximate=True,
            )
            found = await self._waiting.blpop([reply], timeout=timeout)
        if found is None:
            return None
        return msgspec.json.decode(found[1], type=ControlAnswer)

    async def inbox(self, timeout: float) -> list[ControlRequest]:
        found: Any
        async with self._failing():
            found = await self._waiting.xread(
                {self._inbox: self._inbox_cursor}, block=max(1, math.ceil(timeout * 1000))
            )
        requests = []
        for entry_id, fields in found[0][1] if found else []:
            self._inbox_cursor = entry_id.decode()
            requests.append(msgspec.json.decode(fields[b"q"], type=ControlRequest))
        return requests

    async def answer(self, request: ControlRequest, answer: ControlAnswer) -> None:
        async with self._failing():
            pipe = self._redis.pipeline(transaction=True)
            pipe.lpush(request.reply, _encode(answer))
            pipe.expire(request.reply, _REPLY_SECONDS)
            await pipe.execute()

    # -- liveness ---------------------------------------------------------------------

    async def heartbeat(self) -> bool:
        previous: Any
        async with self._failing():
            previous = await self._redis.set(
                self._heartbeat, 1, px=max(1, math.ceil(self.instance_timeout * 1000)), get=True
            )
        return previous is not None

    async def reap(self) -> list[str]:
        async with self._failing():
            found = await self._reap(
                keys=[self._running, self._leases],
                args=[self._base, repr(time.time()), self._kept_ms()],
            )
        return [job_id.decode() for job_id in found]

    async def aclose(self) -> None:
        for client in (self._redis, self._waiting):
            await client.aclose()

    # -- helpers ----------------------------------------------------------------------

    def _kept_ms(self) -> int:
        """How long an ended job's keys stay, in ms (PEXPIRE takes no zero)."""
        return max(1, math.ceil(self.retention * 1000))

    def _job(self, job_id: str) -> str:
        return self._base + "job:" + job_id

    def _out(self, job_id: str) -> str:
        return self._base + "out:" + job_id

    def _failing(self) -> _Failing:
        return _Failing(self.description)


class _Failing:
    """Turns a Redis error (or a call that outlived its socket) into a StoreError that
    names what failed (``what``: the job board, or the worker pools) and where."""

    def __init__(self, description: str, what: str = "job board") -> None:
        self._description = description
        self._what = what

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, error: Any, trace: Any) -> None:
        if isinstance(error, redis.RedisError | asyncio.TimeoutError | OSError):
            raise StoreError(f"{self._what} {self._description}: {error}") from error


def _record(fields: list[bytes | None]) -> JobRecord | None:
    """A record from its hash's ``r`` and ``reaped`` fields."""
    body, reaped = fields
    if body is None:
        return None
    record = _decode_record(body)
    if reaped is not None and record.ended_at is None:
        return _reaped(record, float(reaped))
    return record
