"""A store in Redis: every runcache instance that uses one Redis shares one cache.

Each operation that reads or changes more than one key is one Lua script, which
Redis runs atomically: a hit, its count and its move to the most recently used
end are one step, and so are a put with its evictions, and a clear with the
reset of the counts. Counts are ``HINCRBY`` inside those scripts, so instances
never lose each other's increments.

Redis runs one script at a time and serves nobody meanwhile, so no script here
walks the whole cache: work that grows with the cache (a clear's deletions, an
invalidation, a listing) goes in batches of ``BATCH`` keys, each its own short
step that leaves the counts right (see :meth:`RedisStore.clear`).

Keys of a namespace (all in one hash slot, thanks to the ``{namespace}`` tag):

- ``<base>entry:<key>``: the stored bytes, with a native Redis expiry so that
  Redis reclaims the memory of entries nobody asks for again;
- ``<base>lru``: sorted set of keys by last use, least recent first;
- ``<base>expiry``: sorted set of keys by expiry time on the store's clock;
- ``<base>sizes``: hash of each key's size in bytes, so an entry Redis has
  already expired can still be subtracted from the byte count;
- ``<base>hits``: hash of each key's hits since it was stored;
- ``<base>info``: hash of each key's command, creation time and exit code (JSON);
- ``<base>created``: sorted set of keys by the order they were stored in;
- ``<base>counts``: hash of the counts, the byte total, the use counter and the epoch;
- ``<base>scopes``: hash of each scoped entry's scope (an unscoped one has none);
- ``<base>scopes:<scope>``: set of the keys of one scope's entries, so that a
  scope is listed and invalidated without walking every entry;
- ``<base>scope-names``: set of the scopes stored since the last clear, whose sets the
  next clear unlinks (a scope whose last entry went keeps its name here, not its set);
- ``<base>lock:<key>``: the cross-instance single-flight lock;
- ``<base>cleared``: set of the names of LRU sets that clears took out of use and
  whose entries are still being deleted, ``<base>cleared:<token>`` each.

An entry stored by a runcache older than ``info`` is served and counted as any
other, but is listed by neither :meth:`RedisStore.entries` nor an invalidation.
An entry stored before scopes has no scope, as an unscoped one has.

Expiry follows the store's clock (the wall clock unless a test passes another),
checked by the scripts; the native expiry comes a grace period later, so it only
ever removes entries that are expired already.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException
from redis.retry import Retry

from runcache.errors import ConfigError, StoreError
from runcache.stores.base import (
    DEFAULT_TIMEOUT,
    CacheStats,
    CommandMatch,
    EntryInfo,
    stats_from_counts,
)

#: The failures a call is retried after, once and at once: a connection found
#: closed or refused. Not a timeout (see :meth:`RedisStore.from_url`).
_RETRIED: tuple[type[redis.RedisError], ...] = (redis.ConnectionError,)

#: What a call to Redis may raise: a cluster client's own failures (no node
#: reachable, a slot nobody serves) are not ``RedisError``s.
_FAILURES = (redis.RedisError, RedisClusterException)

#: A client for one Redis, or for a Redis Cluster (``redis+cluster://``).
_Client: TypeAlias = redis.Redis | redis.cluster.RedisCluster
_AsyncClient: TypeAlias = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

#: Seconds after an entry expires on the store's clock at which Redis deletes it
#: natively; the margin absorbs clock skew between instances.
NATIVE_EXPIRY_GRACE = 60.0

#: Keys a clear, an invalidation or a listing handles per step (per script call):
#: small enough that each step keeps Redis from others for well under a millisecond.
BATCH = 500

# Each script opens by naming its KEYS and ARGV, in the order of the NamedTuple
# (or the commented list) that its call site in RedisStore passes them in.


class _EntryKeys(NamedTuple):
    """The KEYS of ``_GET`` and ``_PUT``: one entry's key, then the namespace's index keys."""

    entry_key: str
    lru_key: str
    expiry_key: str
    sizes_key: str
    counts_key: str
    hits_key: str
    info_key: str
    created_key: str
    scopes_key: str
    scope_names_key: str


class _IndexKeys(NamedTuple):
    """The KEYS of ``_STATS`` and ``_DELETE``, which begin ``_CLEAR``'s: the index keys."""

    lru_key: str
    expiry_key: str
    sizes_key: str
    counts_key: str
    hits_key: str
    info_key: str
    created_key: str
    scopes_key: str
    scope_names_key: str


class _ClearKeys(NamedTuple):
    """The KEYS of ``_CLEAR``."""

    lru_key: str
    expiry_key: str
    sizes_key: str
    counts_key: str
    hits_key: str
    info_key: str
    created_key: str
    scopes_key: str
    scope_names_key: str
    cleared_key: str
    #: The name the LRU set takes while its entries are deleted.
    trash_key: str


class _DrainKeys(NamedTuple):
    """The KEYS of ``_DRAIN``."""

    trash_key: str
    lru_key: str
    cleared_key: str


class _PeekKeys(NamedTuple):
    """The KEYS of ``_PEEK``."""

    entry_key: str
    expiry_key: str


class _PeekArgs(NamedTuple):
    """The ARGV of ``_PEEK``."""

    member: str
    #: The store's clock, as ``repr`` writes it so that no digit is lost.
    now: str


class _Lookup(NamedTuple):
    """The ARGV of ``_GET``."""

    member: str
    #: The store's clock, as ``repr`` writes it so that no digit is lost.
    now: str
    #: Seconds past its expiry an entry is still answered (as stale).
    stale: float = 0.0
    #: Seconds past its expiry an entry is kept for readers that accept it stale.
    retain: float = 0.0


class _PutArgs(NamedTuple):
    """The ARGV of ``_PUT``."""

    member: str
    value: bytes
    epoch: int
    now: float
    expires_at: float
    native_ms: int
    max_entries: int
    max_bytes: int
    entry_prefix: str
    #: The entry's command, creation time and exit code (and scope, if any), as JSON.
    info: bytes
    #: The entry's scope; "" for none.
    scope: str


class _StatsArgs(NamedTuple):
    """The ARGV of ``_STATS``."""

    now: float
    entry_prefix: str


#: Forgetting a member's scope when its entry goes; a fragment of the scripts that remove
#: entries, after they name ``scopes_key``. A scope's set is ``scopes_key .. ':' .. scope``,
#: in the namespace's hash slot as every key here.
_FORGET_SCOPE = """
local function forget_scope(member)
  local scope = redis.call('HGET', scopes_key, member)
  if scope then
    redis.call('SREM', scopes_key .. ':' .. scope, member)
    redis.call('HDEL', scopes_key, member)
  end
end
"""

_GET = (
    """
local entry_key = KEYS[1]      -- the entry's bytes
local lru_key = KEYS[2]        -- sorted set of keys by last use
local expiry_key = KEYS[3]     -- sorted set of keys by expiry time
local sizes_key = KEYS[4]      -- hash of each key's size in bytes
local counts_key = KEYS[5]     -- hash of the counts, byte total, use counter and epoch
local hits_key = KEYS[6]       -- hash of each key's hits
local info_key = KEYS[7]       -- hash of each key's command, creation time and exit code
local created_key = KEYS[8]    -- sorted set of keys by the order they were stored in
local scopes_key = KEYS[9]     -- hash of each scoped key's scope
local scope_names_key = KEYS[10]  -- set of the scopes that have a set of keys (unused here)
local member = ARGV[1]         -- the cache key, as a member of the sets and the hashes above
local now = tonumber(ARGV[2])  -- the store's clock
local stale = tonumber(ARGV[3])  -- seconds past expiry the reader accepts; 0: none
local retain = tonumber(ARGV[4])  -- seconds past expiry an entry is kept for such readers
"""
    + _FORGET_SCOPE
    + """
local value = redis.call('GET', entry_key)
local expires_at = tonumber(redis.call('ZSCORE', expiry_key, member))
-- The rule of an answer (runcache.stores.base.answers), in the script's transaction:
if value and expires_at and expires_at > now - stale then
  redis.call('ZADD', lru_key, redis.call('HINCRBY', counts_key, 'used', 1), member)
  redis.call('HINCRBY', counts_key, 'hits', 1)
  redis.call('HINCRBY', hits_key, member, 1)
  if stale == 0 then
    return value
  end
  local expired = 0
  if expires_at <= now then
    expired = 1
    redis.call('HINCRBY', counts_key, 'stale_hits', 1)
  end
  return {value, expired}
end
if value and expires_at and expires_at > now - retain then
  -- Kept for a reader that accepts it stale (even while this reader's run
  -- refreshes it); its expiration counts when it goes.
  redis.call('HINCRBY', counts_key, 'misses', 1)
  return false
end
local size = redis.call('HGET', sizes_key, member)
if value then
  redis.call('UNLINK', entry_key)
end
if size then
  redis.call('ZREM', lru_key, member)
  redis.call('ZREM', expiry_key, member)
  redis.call('ZREM', created_key, member)
  redis.call('HDEL', sizes_key, member)
  redis.call('HDEL', hits_key, member)
  redis.call('HDEL', info_key, member)
  forget_scope(member)
  redis.call('HINCRBY', counts_key, 'bytes', -tonumber(size))
  redis.call('HINCRBY', counts_key, 'expirations', 1)
end
redis.call('HINCRBY', counts_key, 'misses', 1)
return false
"""
)

_PUT = (
    """
local entry_key = KEYS[1]              -- the entry's bytes
local lru_key = KEYS[2]                -- sorted set of keys by last use
local expiry_key = KEYS[3]             -- sorted set of keys by expiry time
local sizes_key = KEYS[4]              -- hash of each key's size in bytes
local counts_key = KEYS[5]             -- hash of the counts, byte total, use counter and epoch
local hits_key = KEYS[6]               -- hash of each key's hits
local info_key = KEYS[7]               -- hash of each key's command, creation time and exit code
local created_key = KEYS[8]            -- sorted set of keys by the order they were stored in
local scopes_key = KEYS[9]             -- hash of each scoped key's scope
local scope_names_key = KEYS[10]       -- set of the scopes that have a set of keys
local member = ARGV[1]                 -- the cache key, as a member of the sets and the hashes
local value = ARGV[2]                  -- the bytes to store
local epoch = tonumber(ARGV[3])        -- the epoch the caller read before running
local now = tonumber(ARGV[4])          -- the store's clock
local expires_at = ARGV[5]             -- now + ttl, kept as sent so that no digit is lost
local native_ms = ARGV[6]              -- milliseconds until Redis deletes the entry itself
local max_entries = tonumber(ARGV[7])  -- the entry bound
local max_bytes = tonumber(ARGV[8])    -- the byte bound
local entry_prefix = ARGV[9]           -- entry_prefix .. member is a member's entry key
local info = ARGV[10]                  -- the entry's command, creation time and exit code
local scope = ARGV[11]                 -- the entry's scope; empty for none
"""
    + _FORGET_SCOPE
    + """
if tonumber(redis.call('HGET', counts_key, 'epoch') or '0') ~= epoch then
  return 0
end
local size = string.len(value)
if size > max_bytes then
  return 0
end
local old = redis.call('HGET', sizes_key, member)
if old then
  redis.call('HINCRBY', counts_key, 'bytes', -tonumber(old))
  local old_expires_at = tonumber(redis.call('ZSCORE', expiry_key, member))
  if old_expires_at and old_expires_at <= now then  -- a retained one, replaced
    redis.call('HINCRBY', counts_key, 'expirations', 1)
  end
end
redis.call('SET', entry_key, value, 'PX', native_ms)
redis.call('ZADD', expiry_key, expires_at, member)
redis.call('HSET', sizes_key, member, size)
local used = redis.call('HINCRBY', counts_key, 'used', 1)
redis.call('ZADD', lru_key, used, member)
redis.call('ZADD', created_key, used, member)
redis.call('HSET', info_key, member, info)
redis.call('HDEL', hits_key, member)
forget_scope(member)
if scope ~= '' then
  redis.call('HSET', scopes_key, member, scope)
  redis.call('SADD', scopes_key .. ':' .. scope, member)
  redis.call('SADD', scope_names_key, scope)
end
local total = redis.call('HINCRBY', counts_key, 'bytes', size)
local count = redis.call('ZCARD', lru_key)
while count > max_entries or total > max_bytes do
  -- The least recently used entry goes first; if it had expired, on the clock
  -- or natively, that is an expiration, not an eviction.
  local victim = redis.call('ZPOPMIN', lru_key)[1]
  local victim_entry = entry_prefix .. victim
  local alive = redis.call('EXISTS', victim_entry) == 1
  local victim_expires_at = tonumber(redis.call('ZSCORE', expiry_key, victim))
  local victim_size = tonumber(redis.call('HGET', sizes_key, victim) or '0')
  redis.call('UNLINK', victim_entry)
  redis.call('ZREM', expiry_key, victim)
  redis.call('ZREM', created_key, victim)
  redis.call('HDEL', sizes_key, victim)
  redis.call('HDEL', hits_key, victim)
  redis.call('HDEL', info_key, victim)
  forget_scope(victim)
  total = redis.call('HINCRBY', counts_key, 'bytes', -victim_size)
  if alive and victim_expires_at and victim_expires_at > now then
    redis.call('HINCRBY', counts_key, 'evictions', 1)
  else
    redis.call('HINCRBY', counts_key, 'expirations', 1)
  end
  count = count - 1
end
return 1
"""
)

_PEEK = """
local entry_key = KEYS[1]      -- the entry's bytes
local expiry_key = KEYS[2]     -- sorted set of keys by expiry time
local member = ARGV[1]         -- the cache key, as a member of the set above
local now = tonumber(ARGV[2])  -- the store's clock
local value = redis.call('GET', entry_key)
local expires_at = tonumber(redis.call('ZSCORE', expiry_key, member))
if value and expires_at and expires_at > now then
  return value
end
return false
"""

#: The counts in the order of ``stats_from_counts``; a fragment of ``_STATS`` and
#: ``_CLEAR``, which name ``lru_key`` and ``counts_key`` before it.
_COUNTS = """
local counts = redis.call('HMGET', counts_key, 'hits', 'misses', 'evictions', 'expirations',
                          'coalesced')
counts[6] = redis.call('ZCARD', lru_key)
counts[7] = redis.call('HGET', counts_key, 'bytes')
counts[8] = redis.call('HGET', counts_key, 'stale_hits')
"""

#: The index keys, as ``_IndexKeys`` passes them; a fragment of the scripts that take them.
_INDEX_KEYS = (
    """
local lru_key = KEYS[1]       -- sorted set of keys by last use
local expiry_key = KEYS[2]    -- sorted set of keys by expiry time
local sizes_key = KEYS[3]     -- hash of each key's size in bytes
local counts_key = KEYS[4]    -- hash of the counts, byte total, use counter and epoch
local hits_key = KEYS[5]      -- hash of each key's hits
local info_key = KEYS[6]      -- hash of each key's command, creation time and exit code
local created_key = KEYS[7]   -- sorted set of keys by the order they were stored in
local scopes_key = KEYS[8]    -- hash of each scoped key's scope
local scope_names_key = KEYS[9]  -- set of the scopes that have a set of keys
"""
    + _FORGET_SCOPE
)

_STATS = (
    _INDEX_KEYS
    + """
local now = ARGV[1]           -- the store's clock less its retention, as a score bound
local entry_prefix = ARGV[2]  -- entry_prefix .. member is a member's entry key
local expired = redis.call('ZRANGEBYSCORE', expiry_key, '-inf', now)
if #expired > 0 then
  local freed = 0
  for _, member in ipairs(expired) do
    freed = freed + tonumber(redis.call('HGET', sizes_key, member) or '0')
    redis.call('UNLINK', entry_prefix .. member)
    redis.call('ZREM', lru_key, member)
    redis.call('ZREM', created_key, member)
    redis.call('HDEL', sizes_key, member)
    redis.call('HDEL', hits_key, member)
    redis.call('HDEL', info_key, member)
    forget_scope(member)
  end
  redis.call('ZREMRANGEBYSCORE', expiry_key, '-inf', now)
  redis.call('HINCRBY', counts_key, 'bytes', -freed)
  redis.call('HINCRBY', counts_key, 'expirations', #expired)
end
"""
    + _COUNTS
    + """
return counts
"""
)

# A clear takes the whole namespace out of use in one step whatever its size:
# the LRU set is renamed aside (its entries are deleted after, by ``_DRAIN``)
# and the other indexes are unlinked, which Redis frees in a background thread.
_CLEAR = (
    _INDEX_KEYS
    + """
local cleared_key = KEYS[10]  -- set of the renamed LRU sets still to drain
local trash_key = KEYS[11]    -- the name the LRU set takes until it is drained
"""
    + _COUNTS
    + """
if redis.call('EXISTS', lru_key) == 1 then
  redis.call('RENAME', lru_key, trash_key)
  redis.call('SADD', cleared_key, trash_key)
end
for _, scope in ipairs(redis.call('SMEMBERS', scope_names_key)) do
  redis.call('UNLINK', scopes_key .. ':' .. scope)
end
redis.call('UNLINK', expiry_key, sizes_key, hits_key, info_key, created_key, scopes_key,
           scope_names_key)
local epoch = tonumber(redis.call('HGET', counts_key, 'epoch') or '0') + 1
redis.call('DEL', counts_key)
redis.call('HSET', counts_key, 'epoch', epoch)
return counts
"""
)

# One batch of a clear's deletions. An entry stored again since the clear is in
# the live LRU set, under the same entry key: that one stays.
_DRAIN = """
local trash_key = KEYS[1]          -- an LRU set a clear renamed aside
local lru_key = KEYS[2]            -- the live LRU set
local cleared_key = KEYS[3]        -- set of the renamed LRU sets still to drain
local entry_prefix = ARGV[1]       -- entry_prefix .. member is a member's entry key
local batch = tonumber(ARGV[2])    -- most members to handle in this call
local popped = redis.call('ZPOPMIN', trash_key, batch)
for i = 1, #popped, 2 do           -- member, score, member, score...
  if not redis.call('ZSCORE', lru_key, popped[i]) then
    redis.call('UNLINK', entry_prefix .. popped[i])
  end
end
if redis.call('EXISTS', trash_key) == 1 then
  return 1
end
redis.call('SREM', cleared_key, trash_key)
return 0
"""

# Delete the live entries among the members given, keeping the counts; how many.
_DELETE = (
    _INDEX_KEYS
    + """
local now = tonumber(ARGV[1])  -- the store's clock
local entry_prefix = ARGV[2]   -- entry_prefix .. member is a member's entry key
local members = ARGV           -- from its third on: the members to delete
local deleted, freed = 0, 0
for i = 3, #members do
  local member = members[i]
  local expires_at = tonumber(redis.call('ZSCORE', expiry_key, member))
  local size = redis.call('HGET', sizes_key, member)
  if size and expires_at and expires_at > now
      and redis.call('UNLINK', entry_prefix .. member) == 1 then
    redis.call('ZREM', lru_key, member)
    redis.call('ZREM', expiry_key, member)
    redis.call('ZREM', created_key, member)
    redis.call('HDEL', sizes_key, member)
    redis.call('HDEL', hits_key, member)
    redis.call('HDEL', info_key, member)
    forget_scope(member)
    deleted = deleted + 1
    freed = freed + tonumber(size)
  end
end
if freed > 0 then
  redis.call('HINCRBY', counts_key, 'bytes', -freed)
end
return deleted
"""
)

_RELEASE = """
local lock_key = KEYS[1]  -- the key's single-flight lock
local token = ARGV[1]     -- the token acquire returned to the holder
if redis.call('GET', lock_key) == token then
  return redis.call('DEL', lock_key)
end
return 0
"""


class _Scripts(NamedTuple):
    """The scripts, registered with the client that runs them."""

    get: Any
    put: Any
    peek: Any
    stats: Any
    clear: Any
    drain: Any
    delete: Any
    release: Any

    @classmethod
    def of(cls, client: _Client) -> _Scripts:
        texts = (_GET, _PUT, _PEEK, _STATS, _CLEAR, _DRAIN, _DELETE, _RELEASE)
        return cls(*(client.register_script(text) for text in texts))


#: How many KEYS ``_GET`` takes.
_GET_KEYS = len(_EntryKeys._fields)


class _Hits:
    """The hit path on one event loop: its client, and the lookups waiting to be sent.

    Lookups asked in one turn of the loop (several requests read at once, or
    answered by one read from Redis) go to Redis together, as one pipeline of
    the get script: one write and one read for them all instead of one each. A
    round trip costs this process more than the rest of a hit (two system
    calls, and redis-py's connection handling around them), so under load this
    is what keeps a Redis hit near a memory one; alone, a lookup waits one turn
    of the loop, microseconds. Each lookup is still its own script, its own
    atomic step: only the trip is shared.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, client: _AsyncClient) -> None:
        self.loop = loop
        self.client = client
        self.script = client.register_script(_GET)
        self._waiting: list[tuple[Sequence[Any], asyncio.Future[Any]]] = []
        # The sends under way: the loop keeps only weak references to tasks.
        self._sending: set[asyncio.Task[None]] = set()

    def get(self, keys_and_args: Sequence[Any]) -> asyncio.Future[Any]:
        """The get script's answer to these KEYS then ARGV, once the batch is sent."""
        answer = self.loop.create_future()
        if not self._waiting:
            self.loop.call_soon(self._send_waiting)
        self._waiting.append((keys_and_args, answer))
        return answer

    def _send_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        task = self.loop.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Sequence[Any], asyncio.Future[Any]]]) -> None:
        try:
            answers = await self._pipeline([keys_and_args for keys_and_args, _ in batch])
        except Exception as error:
            answers = [error] * len(batch)
        for (_, answer), found in zip(batch, answers, strict=True):
            if answer.done():  # its request was cancelled (the client left)
                continue
            if isinstance(found, Exception):
                answer.set_exception(found)
            else:
                answer.set_result(found)

    async def _pipeline(self, batch: list[Sequence[Any]]) -> list[Any]:
        """Each lookup's answer (or its error), in order; the script is loaded when
        Redis lacks it (restarted, or a cluster node that never had it)."""
        if len(batch) == 1:  # a pipeline of one costs more than the call
            return [await self.script(keys=batch[0][:_GET_KEYS], args=batch[0][_GET_KEYS:])]
        answers = await self._evalshas(batch)
        if any(isinstance(found, NoScriptError) for found in answers):
            self.script.sha = await self.client.script_load(self.script.script)
            again = [i for i, found in enumerate(answers) if isinstance(found, NoScriptError)]
            for i, found in zip(
                again, await self._evalshas([batch[i] for i in again]), strict=True
            ):
                answers[i] = found
        return answers

    async def _evalshas(self, batch: list[Sequence[Any]]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for keys_and_args in batch:
            pipe.evalsha(self.script.sha, _GET_KEYS, *keys_and_args)
        answers: list[Any] = await pipe.execute(raise_on_error=False)
        return answers

    async def aclose(self) -> None:
        """Let the lookups under way finish, then close the client."""
        while self._sending or self._waiting:
            await asyncio.sleep(0)
        await self.client.aclose()


class RedisStore:
    """The cache's rules kept in Redis by Lua scripts, one round trip per operation."""

    #: Every call is a round trip to Redis over the network.
    blocking = True

    def __init__(
        self,
        connect: Callable[[], _Client],
        async_client: Callable[[], _AsyncClient],
        max_entries: int,
        max_bytes: int,
        namespace: str = "runcache",
        clock: Callable[[], float] = time.time,
        description: str = "redis://",
        retain: float = 0.0,
    ) -> None:
        # Made on first use: a cluster client asks a node for the cluster's
        # layout as it is made, and opening a store never connects.
        self._connect = connect
        self._connected: tuple[_Client, _Scripts] | None = None
        self._connecting = threading.Lock()
        #: Seconds an expired entry is kept for readers that accept a stale answer.
        self.retain = retain
        # The hit path's client, made on the loop that first awaits a hit:
        # redis.asyncio's connections belong to one event loop.
        self._async_client = async_client
        self._hits: _Hits | None = None
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.namespace = namespace
        self.description = description
        self._clock = clock
        base = f"runcache:{{{namespace}}}:"
        self.entry_prefix = base + "entry:"
        self.lock_prefix = base + "lock:"
        self.lru_key = base + "lru"
        self.expiry_key = base + "expiry"
        self.sizes_key = base + "sizes"
        self.counts_key = base + "counts"
        self.hits_key = base + "hits"
        self.info_key = base + "info"
        self.created_key = base + "created"
        self.cleared_key = base + "cleared"
        self.scopes_key = base + "scopes"
        self.scope_names_key = base + "scope-names"
        self._index_keys = _IndexKeys(
            lru_key=self.lru_key,
            expiry_key=self.expiry_key,
            sizes_key=self.sizes_key,
            counts_key=self.counts_key,
            hits_key=self.hits_key,
            info_key=self.info_key,
            created_key=self.created_key,
            scopes_key=self.scopes_key,
            scope_names_key=self.scope_names_key,
        )

    @property
    def client(self) -> _Client:
        """The client of the calls made off the hit path (made on first use)."""
        return self._connection()[0]

    @property
    def _scripts(self) -> _Scripts:
        return self._connection()[1]

    def _connection(self) -> tuple[_Client, _Scripts]:
        connected = self._connected
        if connected is None:
            with self._connecting:
                if self._connected is None:
                    try:
                        client = self._connect()
                    except _FAILURES as error:
                        raise self._failure(error) from error
                    self._connected = (client, _Scripts.of(client))
                connected = self._connected
        return connected

    @classmethod
    def from_url(
        cls,
        url: str,
        max_entries: int,
        max_bytes: int,
        namespace: str,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        retain: float = 0.0,
        cluster: bool = False,
    ) -> RedisStore:
        """Build a client from a redis:// or rediss:// URL (without the namespace) lazily;
        with ``cluster``, a Redis Cluster client, the URL naming any of its nodes.

        Nothing connects here: a Redis that is down at start makes the server
        start degraded, not fail. ``timeout`` bounds each call, on the hit path's
        client and on the others' alike: connecting, and each wait for an answer.
        """
        description = f"{mask_password(url)}{'&' if '?' in url else '?'}namespace={namespace}"
        timeouts: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
        try:
            # One immediate retry on a fresh connection covers a pooled
            # connection that a restarted Redis closed, which fails at once.
            # A timeout is never retried: a Redis that hangs (stopped, or
            # its host gone) would cost each call two timeouts, not one.
            retry = Retry(NoBackoff(), 1, supported_errors=_RETRIED)
            client = redis.Redis.from_url(url, **timeouts, retry=retry)
            # Build (without connecting) one connection now, so that an unknown
            # URL option fails at start rather than on the first request.
            pool = client.connection_pool
            pool.connection_class(**pool.connection_kwargs)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"bad redis store URL {mask_password(url)}: {error}") from None
        async_retry = AsyncRetry(NoBackoff(), 1, supported_errors=_RETRIED)
        if cluster:
            # A cluster has no database but 0 (and its client refuses one as it connects).
            if pool.connection_kwargs.get("db", 0) != 0:
                raise ConfigError(
                    f"store {mask_password(url)}: a Redis Cluster has database 0 only"
                )
            description = "redis+cluster" + description.removeprefix("redis")
            connect: Callable[[], _Client] = functools.partial(
                redis.cluster.RedisCluster.from_url, url, **timeouts, retry=retry
            )
            async_client: Callable[[], _AsyncClient] = functools.partial(
                redis.asyncio.cluster.RedisCluster.from_url, url, **timeouts, retry=async_retry
            )
        else:
            connect = functools.partial(lambda client: client, client)
            async_client = functools.partial(
                redis.asyncio.Redis.from_url, url, **timeouts, retry=async_retry
            )
        return cls(
            connect, async_client, max_entries, max_bytes, namespace, clock, description, retain
        )

    # -- the cache's operations -------------------------------------------------

    def get(self, key: str) -> bytes | None:
        args = _Lookup(key, repr(self._clock()), retain=self.retain)
        value = self._run(self._scripts.get, self._entry_keys(key), args)
        return value if isinstance(value, bytes) else None

    async def get_async(self, key: str) -> bytes | None:
        # Every cache hit comes through here: the same script as get, through
        # redis.asyncio (the loop serves other requests during the round trip
        # instead of handing it to a thread), sent with the lookups of the same
        # turn of the loop (see _Hits).
        lookup = (*self._entry_keys(key), *_Lookup(key, repr(self._clock()), retain=self.retain))
        try:
            value = await self._loop_hits().get(lookup)
        except _FAILURES as error:
            raise self._failure(error) from error
        return value if isinstance(value, bytes) else None

    def get_stale(self, key: str, stale: float) -> tuple[bytes, bool] | None:
        args = _Lookup(member=key, now=repr(self._clock()), stale=stale, retain=self.retain)
        found = self._run(self._scripts.get, self._entry_keys(key), args)
        if isinstance(found, list):
            return bytes(found[0]), bool(found[1])
        return (found, False) if isinstance(found, bytes) else None

    def _loop_hits(self) -> _Hits:
        """The hit path on this loop, made on first use on each loop."""
        loop = asyncio.get_running_loop()
        if self._hits is None or self._hits.loop is not loop:
            self._hits = _Hits(loop, self._async_client())
        return self._hits

    def put(
        self,
        key: str,
        value: bytes,
        ttl: float,
        epoch: int,
        command: str = "",
        return_code: int = 0,
        scope: str = "",
    ) -> bool:
        now = self._clock()
        native_ms = math.ceil((ttl + self.retain + NATIVE_EXPIRY_GRACE) * 1000)
        args = _PutArgs(
            member=key,
            value=value,
            epoch=epoch,
            now=now,
            expires_at=now + ttl,
            native_ms=native_ms,
            max_entries=self.max_entries,
            max_bytes=self.max_bytes,
            entry_prefix=self.entry_prefix,
            info=_encode_info((command, now, return_code, *((scope,) if scope else ()))),
            scope=scope,
        )
        stored = self._run(self._scripts.put, self._entry_keys(key), args)
        return bool(stored == 1)

    def epoch(self) -> int:
        return int(self._call(self.client.hget, self.counts_key, "epoch") or 0)

    def peek(self, key: str) -> bytes | None:
        keys = _PeekKeys(entry_key=self.entry_prefix + key, expiry_key=self.expiry_key)
        value = self._run(self._scripts.peek, keys, _PeekArgs(member=key, now=repr(self._clock())))
        return value if isinstance(value, bytes) else None

    def acquire(self, key: str, lease: float) -> str | None:
        token = secrets.token_hex(16)
        taken = self._call(
            self.client.set, self.lock_prefix + key, token, nx=True, px=math.ceil(lease * 1000)
        )
        return token if taken else None

    def release(self, key: str, token: str) -> None:
        # KEYS: lock_key; ARGV: token.
        self._run(self._scripts.release, [self.lock_prefix + key], [token])

    def record_coalesced(self) -> None:
        self._call(self.client.hincrby, self.counts_key, "coalesced", 1)

    def clear(self) -> CacheStats:
        """Empty the namespace as one step, then delete its old entries in batches.

        The promise is the spec's: a clear empties the cache and resets the
        counts as one step, and nothing from before it is served after it. One
        script that deleted every entry would keep the step, but Redis would
        serve nobody while it deleted a large cache. So the step is short and
        constant: ``_CLEAR`` reads the counts, resets them, advances the epoch (a
        put from before the clear is refused), unlinks the indexes (Redis frees
        big ones in a background thread) and renames the LRU set aside. From that
        moment no entry from before is served or listed, since a hit needs the
        entry's expiry in the index and the index is empty. The entries' values
        stay until ``_DRAIN`` deletes them, ``BATCH`` at a time, before this
        returns, skipping any key stored again since; Redis serves others
        between batches. Should this process die meanwhile, the next clear in
        the namespace finishes the job (``cleared`` names what is left), and
        each value's native expiry bounds how long it could stay.
        """
        keys = _ClearKeys(
            *self._index_keys,
            cleared_key=self.cleared_key,
            trash_key=f"{self.cleared_key}:{secrets.token_hex(8)}",
        )
        counts = self._run(self._scripts.clear, keys, [])
        self._drain_cleared()
        return self._snapshot(counts)

    def _drain_cleared(self) -> None:
        """Delete, a batch at a time, the entries of every LRU set a clear renamed aside."""
        for trash in self._call(self.client.smembers, self.cleared_key):
            keys = _DrainKeys(
                trash_key=trash.decode(), lru_key=self.lru_key, cleared_key=self.cleared_key
            )
            # ARGV: entry_prefix, batch.
            while self._run(self._scripts.drain, keys, [self.entry_prefix, BATCH]) == 1:
                pass

    def entries(
        self, prefix: str, offset: int, limit: int, scope: str | None = None
    ) -> list[EntryInfo]:
        if scope:
            return self._scope_entries(scope, prefix, offset, limit)
        # Newest first, a batch of the creation order at a time; each batch is read
        # in one MULTI, so an entry's fields agree with each other.
        now = self._clock()
        found: list[EntryInfo] = []
        start = 0
        while len(found) < offset + limit:
            members = self._call(self.client.zrevrange, self.created_key, start, start + BATCH - 1)
            if not members:
                break
            start += len(members)
            for info in self._infos([member.decode() for member in members]):
                if (
                    info.expires_at > now
                    and info.command.startswith(prefix)
                    and scope in (None, info.scope)
                ):
                    found.append(info)
        return found[offset : offset + limit]

    def _scope_entries(self, scope: str, prefix: str, offset: int, limit: int) -> list[EntryInfo]:
        """A scope's entries, newest first: its set's members ordered by when they were
        stored, read a batch at a time; no entry of another scope is read."""
        order: list[tuple[float, str]] = []
        for members in self._scope_batches(scope):
            stored = self._call(self.client.zmscore, self.created_key, members)
            order += [
                (score, member)
                for member, score in zip(members, stored, strict=True)
                if score is not None
            ]
        order.sort(reverse=True)
        now = self._clock()
        found: list[EntryInfo] = []
        for start in range(0, len(order), BATCH):
            if len(found) >= offset + limit:
                break
            members = [member for _, member in order[start : start + BATCH]]
            found += [
                info
                for info in self._infos(members)
                if info.expires_at > now and info.command.startswith(prefix)
            ]
        return found[offset : offset + limit]

    def _scope_batches(self, scope: str) -> Iterator[list[str]]:
        """The members of ``scope``'s set, ``BATCH`` at a time (SSCAN: a member may come
        twice, never not at all)."""
        cursor = 0
        while True:
            cursor, members = self._call(
                self.client.sscan, f"{self.scopes_key}:{scope}", cursor, count=BATCH
            )
            if members:
                yield sorted({member.decode() for member in members})
            if cursor == 0:
                return

    def _infos(self, members: list[str]) -> list[EntryInfo]:
        """What the indexes hold of each member; ones no longer held are left out."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hmget(self.info_key, members)
        pipe.hmget(self.hits_key, members)
        pipe.hmget(self.sizes_key, members)
        pipe.zmscore(self.expiry_key, members)
        infos, hits, sizes, expiries = self._call(pipe.execute)
        return [
            _entry_info(member, info, int(hit or 0), int(size), float(expires_at))
            for member, info, hit, size, expires_at in zip(
                members, infos, hits, sizes, expiries, strict=True
            )
            if size is not None and expires_at is not None
        ]

    def entry(self, key: str) -> tuple[EntryInfo, bytes] | None:
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.entry_prefix + key)
        pipe.hget(self.info_key, key)
        pipe.hget(self.hits_key, key)
        pipe.hget(self.sizes_key, key)
        pipe.zscore(self.expiry_key, key)
        value, info, hits, size, expires_at = self._call(pipe.execute)
        if value is None or size is None or expires_at is None or expires_at <= self._clock():
            return None
        return _entry_info(key, info, int(hits or 0), int(size), float(expires_at)), value

    def delete(self, key: str) -> bool:
        return self._delete_members([key]) == 1

    def delete_matching(self, match: CommandMatch, scope: str | None = None) -> int:
        """Test and delete the entries a batch at a time: ZSCAN walks the LRU set
        ``BATCH`` members per call (a member is met at least once, maybe twice, and
        deleting one twice deletes it once), their commands are tested here, and
        one short script deletes those that match. Given a scope, SSCAN walks its set
        instead, so the rest of the cache is not read."""
        batches = self._scope_batches(scope) if scope else self._lru_batches()
        deleted = 0
        for members in batches:
            infos = self._call(self.client.hmget, self.info_key, members)
            doomed = []
            for member, info in zip(members, infos, strict=True):
                if info is None:
                    continue
                decoded = _decode_info(info)
                if scope in (None, decoded.scope) and match(decoded.command):
                    doomed.append(member)
            for start in range(0, len(doomed), BATCH):  # SCAN's COUNT is but a hint
                deleted += self._delete_members(doomed[start : start + BATCH])
        return deleted

    def _lru_batches(self) -> Iterator[list[str]]:
        """The members of the LRU set, about ``BATCH`` at a time (ZSCAN)."""
        cursor = 0
        while True:
            cursor, scored = self._call(self.client.zscan, self.lru_key, cursor, count=BATCH)
            if scored:
                yield [member.decode() for member, _ in scored]
            if cursor == 0:
                return

    def _delete_members(self, members: Sequence[str | bytes]) -> int:
        if not members:
            return 0
        # ARGV: now, entry_prefix, then the members.
        args = [self._clock(), self.entry_prefix, *members]
        return int(self._run(self._scripts.delete, self._index_keys, args))

    def stats(self) -> CacheStats:
        args = _StatsArgs(now=self._clock() - self.retain, entry_prefix=self.entry_prefix)
        counts = self._run(self._scripts.stats, self._index_keys, args)
        return self._snapshot(counts)

    def close(self) -> None:
        if self._connected is not None:
            self._connected[0].close()

    async def aclose(self) -> None:
        if self._hits is not None:
            hits, self._hits = self._hits, None
            await hits.aclose()

    # -- helpers ----------------------------------------------------------------

    def _entry_keys(self, key: str) -> _EntryKeys:
        return _EntryKeys(self.entry_prefix + key, *self._index_keys)

    def _snapshot(self, counts: Sequence[Any]) -> CacheStats:
        return stats_from_counts(counts, self.max_entries, self.max_bytes)

    def _run(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a Lua script (loading it again if Redis restarted and forgot it)."""
        return self._call(script, keys=keys, args=[_argument(arg) for arg in args])

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except _FAILURES as error:
            raise self._failure(error) from error

    def _failure(self, error: Exception) -> StoreError:
        return StoreError(f"redis store {self.description}: {error}")


class _Info(msgspec.Struct, array_like=True, frozen=True):
    """An entry's ``info``: its command, creation time and exit code, and its scope when
    it has one (written only then, so an unscoped entry's info reads as before scopes)."""

    command: str
    created_at: float
    return_code: int
    scope: str = ""


_encode_info = msgspec.json.Encoder().encode
_decode_info = msgspec.json.Decoder(_Info).decode


def _entry_info(key: str, info: bytes | None, hits: int, size: int, expires_at: float) -> EntryInfo:
    """An entry as listed; one stored by a runcache older than ``info`` has none."""
    decoded = _Info("", 0.0, 0) if info is None else _decode_info(info)
    return EntryInfo(
        key=key,
        command=decoded.command,
        size=size,
        created_at=decoded.created_at,
        expires_at=expires_at,
        hits=hits,
        return_code=decoded.return_code,
        scope=decoded.scope,
    )


def _argument(value: Any) -> Any:
    # repr keeps every digit of a float, so expiry times round-trip exactly.
    return repr(value) if isinstance(value, float) else value


#: Query parameters of a Redis URL that hold a secret (redis-py reads ``password``).
_SECRET_PARAMETERS = frozenset({"password"})


def mask_password(url: str) -> str:
    """The URL with its password replaced by ``***``, wherever it is (``user:pw@`` or the
    query's ``password=``), for logs and ``/health``."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(name.lower() in _SECRET_PARAMETERS for name, _ in pairs):
            masked = [
                (name, "***" if name.lower() in _SECRET_PARAMETERS else value)
                for name, value in pairs
            ]
            parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)
