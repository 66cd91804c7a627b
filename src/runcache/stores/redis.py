"""A store in Redis: every runcache instance that uses one Redis shares one cache.

Each operation that reads or changes more than one key is one Lua script, which
Redis runs atomically: a hit, its count and its move to the most recently used
end are one step, and so are a put with its evictions, and a clear with the
reset of the counts. Counts are ``HINCRBY`` inside those scripts, so instances
never lose each other's increments.

Keys of a namespace (all in one hash slot, thanks to the ``{namespace}`` tag):

- ``<base>entry:<key>``: the stored bytes, with a native Redis expiry so that
  Redis reclaims the memory of entries nobody asks for again;
- ``<base>lru``: sorted set of keys by last use, least recent first;
- ``<base>expiry``: sorted set of keys by expiry time on the store's clock;
- ``<base>sizes``: hash of each key's size in bytes, so an entry Redis has
  already expired can still be subtracted from the byte count;
- ``<base>counts``: hash of the counts, the byte total, the use counter and the epoch;
- ``<base>lock:<key>``: the cross-instance single-flight lock.

Expiry follows the store's clock (the wall clock unless a test passes another),
checked by the scripts; the native expiry comes a grace period later, so it only
ever removes entries that are expired already.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from runcache.errors import ConfigError, StoreError
from runcache.stores.base import CacheStats, stats_from_counts

#: Seconds to wait for a TCP connection to Redis; short, because while Redis is
#: unreachable every request that tries it waits this long.
CONNECT_TIMEOUT = 1.0

#: Seconds to wait for Redis to answer a command.
SOCKET_TIMEOUT = 5.0

#: Seconds after an entry expires on the store's clock at which Redis deletes it
#: natively; the margin absorbs clock skew between instances.
NATIVE_EXPIRY_GRACE = 60.0

_GET = """
local value = redis.call('GET', KEYS[1])
local expires_at = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]))
if value and expires_at and expires_at > tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEYS[5], 'used', 1), ARGV[1])
  redis.call('HINCRBY', KEYS[5], 'hits', 1)
  return value
end
local size = redis.call('HGET', KEYS[4], ARGV[1])
if value then
  redis.call('UNLINK', KEYS[1])
end
if size then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  redis.call('HINCRBY', KEYS[5], 'bytes', -tonumber(size))
  redis.call('HINCRBY', KEYS[5], 'expirations', 1)
end
redis.call('HINCRBY', KEYS[5], 'misses', 1)
return false
"""

_PUT = """
if tonumber(redis.call('HGET', KEYS[5], 'epoch') or '0') ~= tonumber(ARGV[3]) then
  return 0
end
local member = ARGV[1]
local size = string.len(ARGV[2])
local now = tonumber(ARGV[4])
local max_entries = tonumber(ARGV[7])
local max_bytes = tonumber(ARGV[8])
if size > max_bytes then
  return 0
end
local old = redis.call('HGET', KEYS[4], member)
if old then
  redis.call('HINCRBY', KEYS[5], 'bytes', -tonumber(old))
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[5], member)
redis.call('HSET', KEYS[4], member, size)
redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEYS[5], 'used', 1), member)
local total = redis.call('HINCRBY', KEYS[5], 'bytes', size)
local count = redis.call('ZCARD', KEYS[2])
while count > max_entries or total > max_bytes do
  -- The least recently used entry goes first; if it had expired, on the clock
  -- or natively, that is an expiration, not an eviction.
  local victim = redis.call('ZPOPMIN', KEYS[2])[1]
  local entry = ARGV[9] .. victim
  local alive = redis.call('EXISTS', entry) == 1
  local expires_at = tonumber(redis.call('ZSCORE', KEYS[3], victim))
  local victim_size = tonumber(redis.call('HGET', KEYS[4], victim) or '0')
  redis.call('UNLINK', entry)
  redis.call('ZREM', KEYS[3], victim)
  redis.call('HDEL', KEYS[4], victim)
  total = redis.call('HINCRBY', KEYS[5], 'bytes', -victim_size)
  if alive and expires_at and expires_at > now then
    redis.call('HINCRBY', KEYS[5], 'evictions', 1)
  else
    redis.call('HINCRBY', KEYS[5], 'expirations', 1)
  end
  count = count - 1
end
return 1
"""

_PEEK = """
local value = redis.call('GET', KEYS[1])
local expires_at = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if value and expires_at and expires_at > tonumber(ARGV[2]) then
  return value
end
return false
"""

_COUNTS = """
local counts = redis.call('HMGET', KEYS[4], 'hits', 'misses', 'evictions', 'expirations',
                          'coalesced')
counts[6] = redis.call('ZCARD', KEYS[1])
counts[7] = redis.call('HGET', KEYS[4], 'bytes')
"""

_STATS = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if #expired > 0 then
  local freed = 0
  for _, member in ipairs(expired) do
    freed = freed + tonumber(redis.call('HGET', KEYS[3], member) or '0')
    redis.call('UNLINK', ARGV[2] .. member)
    redis.call('ZREM', KEYS[1], member)
    redis.call('HDEL', KEYS[3], member)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'bytes', -freed)
  redis.call('HINCRBY', KEYS[4], 'expirations', #expired)
end
""" + _COUNTS + """
return counts
"""

_CLEAR = _COUNTS + """
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('UNLINK', ARGV[1] .. member)
end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
local epoch = tonumber(redis.call('HGET', KEYS[4], 'epoch') or '0') + 1
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], 'epoch', epoch)
return counts
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore:
    """The cache's rules kept in Redis by Lua scripts, one round trip per operation."""

    #: Every call is a round trip to Redis over the network.
    blocking = True

    def __init__(
        self,
        client: redis.Redis,
        max_entries: int,
        max_bytes: int,
        namespace: str = "runcache",
        clock: Callable[[], float] = time.time,
        description: str = "redis://",
    ) -> None:
        self.client = client
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
        self._index_keys = [self.lru_key, self.expiry_key, self.sizes_key, self.counts_key]
        self._get = client.register_script(_GET)
        self._put = client.register_script(_PUT)
        self._peek = client.register_script(_PEEK)
        self._stats = client.register_script(_STATS)
        self._clear = client.register_script(_CLEAR)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(
        cls,
        url: str,
        max_entries: int,
        max_bytes: int,
        namespace: str,
        clock: Callable[[], float] = time.time,
    ) -> RedisStore:
        """Build a client from a redis:// or rediss:// URL (without the namespace) lazily.

        Nothing connects here: a Redis that is down at start makes the server
        start degraded, not fail.
        """
        description = f"{mask_password(url)}{'&' if '?' in url else '?'}namespace={namespace}"
        try:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
                # One immediate retry on a fresh connection covers a pooled
                # connection that a restarted Redis closed; more would only
                # multiply the wait while Redis is down.
                retry=Retry(NoBackoff(), 1),
            )
            # Build (without connecting) one connection now, so that an unknown
            # URL option fails at start rather than on the first request.
            pool = client.connection_pool
            pool.connection_class(**pool.connection_kwargs)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"bad redis store URL {mask_password(url)}: {error}") from None
        return cls(client, max_entries, max_bytes, namespace, clock, description)

    # -- the cache's operations -------------------------------------------------

    def get(self, key: str) -> bytes | None:
        # Every cache hit comes through here: one script call, no helper layers.
        try:
            value = self._get(
                keys=[self.entry_prefix + key, *self._index_keys], args=[key, repr(self._clock())]
            )
        except redis.RedisError as error:
            raise self._failure(error) from error
        return value if isinstance(value, bytes) else None

    def put(self, key: str, value: bytes, ttl: float, epoch: int) -> bool:
        now = self._clock()
        native_ms = math.ceil((ttl + NATIVE_EXPIRY_GRACE) * 1000)
        stored = self._run(
            self._put,
            self._entry_keys(key),
            key,
            value,
            epoch,
            now,
            now + ttl,
            native_ms,
            self.max_entries,
            self.max_bytes,
            self.entry_prefix,
        )
        return bool(stored == 1)

    def epoch(self) -> int:
        return int(self._call(self.client.hget, self.counts_key, "epoch") or 0)

    def peek(self, key: str) -> bytes | None:
        keys = [self.entry_prefix + key, self.expiry_key]
        value = self._run(self._peek, keys, key, self._clock())
        return value if isinstance(value, bytes) else None

    def acquire(self, key: str, lease: float) -> str | None:
        token = secrets.token_hex(16)
        taken = self._call(
            self.client.set, self.lock_prefix + key, token, nx=True, px=math.ceil(lease * 1000)
        )
        return token if taken else None

    def release(self, key: str, token: str) -> None:
        self._run(self._release, [self.lock_prefix + key], token)

    def record_coalesced(self) -> None:
        self._call(self.client.hincrby, self.counts_key, "coalesced", 1)

    def clear(self) -> CacheStats:
        return self._snapshot(self._run(self._clear, self._index_keys, self.entry_prefix))

    def stats(self) -> CacheStats:
        counts = self._run(self._stats, self._index_keys, self._clock(), self.entry_prefix)
        return self._snapshot(counts)

    def close(self) -> None:
        self.client.close()

    # -- helpers ----------------------------------------------------------------

    def _entry_keys(self, key: str) -> list[str]:
        return [self.entry_prefix + key, *self._index_keys]

    def _snapshot(self, counts: Sequence[Any]) -> CacheStats:
        return stats_from_counts(counts, self.max_entries, self.max_bytes)

    def _run(self, script: Any, keys: list[str], *args: Any) -> Any:
        """Run a Lua script (loading it again if Redis restarted and forgot it)."""
        return self._call(script, keys=keys, args=[_argument(arg) for arg in args])

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except redis.RedisError as error:
            raise self._failure(error) from error

    def _failure(self, error: redis.RedisError) -> StoreError:
        return StoreError(f"redis store {self.description}: {error}")


def _argument(value: Any) -> Any:
    # repr keeps every digit of a float, so expiry times round-trip exactly.
    return repr(value) if isinstance(value, float) else value


def mask_password(url: str) -> str:
    """The URL with its password replaced by ``***``, for logs and ``/health``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
