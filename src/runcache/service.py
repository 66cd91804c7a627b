"""The engine: everything runcache does, with no knowledge of HTTP.

The API, the CLI and the MCP adapter are thin layers over one :class:`Engine`,
so a behaviour (a cache key, a bound, a log line) is written once here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from runcache import __version__
from runcache.allowlist import Allowlist
from runcache.cache import Cache
from runcache.config import Config
from runcache.errors import BadRequest, StoreError
from runcache.limits import Slots, waiting_limit
from runcache.results import encode_result
from runcache.runner import Runner, RunResult
from runcache.singleflight import SingleFlight
from runcache.stores import open_store
from runcache.stores.base import CacheStats
from runcache.telemetry import Telemetry

log = logging.getLogger("runcache")

#: The shell that runs a command string, as the contract has it.
SHELL = ("/bin/sh", "-c")

#: Environment variables whose values go into the cache key: a command that
#: sees another PATH, home, user, locale or time zone may well print something else.
KEY_ENV_VARS = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ")

#: The tail of a stored result that each answer replaces with its own flags.
_HIT_TAIL = b',"cached":true,"coalesced":false}'
_RUN_TAIL = b',"cached":false,"coalesced":false}'
_SHARED_TAIL = b',"cached":false,"coalesced":true}'


@dataclass(frozen=True)
class CommandRequest:
    """One request to run a command, its fields checked for type but not yet for bounds."""

    command: str
    use_cache: bool = True
    timeout: float | None = None
    ttl: float | None = None

    @classmethod
    def from_json(cls, payload: object) -> CommandRequest:
        """Check a decoded JSON body; every problem raises BadRequest saying what is wrong."""
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object")
        command = payload.get("command")
        if command is None or (isinstance(command, str) and not command.strip()):
            raise BadRequest("Command parameter is required")
        if not isinstance(command, str):
            raise BadRequest("command must be a string")
        if "\x00" in command:
            raise BadRequest("command must not contain NUL characters")
        use_cache = payload.get("use_cache", True)
        if not isinstance(use_cache, bool):
            raise BadRequest("use_cache must be true or false")
        return cls(
            command=command,
            use_cache=use_cache,
            timeout=_optional_seconds(payload, "timeout"),
            ttl=_optional_seconds(payload, "ttl"),
        )


def _optional_seconds(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number of seconds")
    if not value > 0:
        raise BadRequest(f"{name} must be greater than 0 seconds")
    return float(value)


@dataclass(frozen=True)
class Outcome:
    """The answer to a command request.

    ``body`` is the result encoded once as JSON, exactly as the cache holds it;
    answering only appends the ``cached`` and ``coalesced`` flags, so a hit on a
    large result is served without decoding or re-encoding it.
    """

    body: bytes
    cached: bool = False
    coalesced: bool = False

    @property
    def tail(self) -> bytes:
        """What replaces the body's closing brace: this answer's flags, then the brace."""
        return _HIT_TAIL if self.cached else _SHARED_TAIL if self.coalesced else _RUN_TAIL

    def to_json(self) -> bytes:
        return self.body[:-1] + self.tail

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(self.to_json())
        return result


class Engine:
    """Runs commands through the cache, once per key at a time, and keeps the counts."""

    def __init__(self, config: Config, cache: Cache, runner: Runner) -> None:
        self.config = config
        self.cache = cache
        self.runner = runner
        self.telemetry = Telemetry()
        self._flights: SingleFlight[tuple[bytes, bool]] = SingleFlight()
        self._last_stats = CacheStats(0, 0, 0, 0, 0, 0, config.max_entries, 0, config.max_bytes)
        self.slots = Slots(
            config.max_concurrent,
            config.queue_timeout,
            waiting_limit(config.threads, config.max_concurrent),
        )
        self.allowlist: Allowlist | None = None
        if config.allowed_commands:
            env = runner.env if runner.env is not None else os.environ
            self.allowlist = Allowlist(config.allowed_commands, env, runner.cwd)
        self._key_prefix = self._key_context()

    @classmethod
    def from_config(cls, config: Config) -> Engine:
        store = open_store(config.store, config.max_entries, config.max_bytes)
        return cls(config, Cache(store), Runner(config.max_output_bytes, _command_env(config)))

    def close(self) -> None:
        """Kill running commands and release the store."""
        self.runner.kill_all()
        self.cache.close()

    # -- commands ---------------------------------------------------------------

    def execute(self, request: CommandRequest, client: str = "-") -> Outcome:
        """Answer a request from the cache, from an identical run in flight, or by running it."""
        timeout = self._bounded(request.timeout, "timeout", self.config.default_timeout,
                                self.config.max_timeout)
        ttl = self._bounded(request.ttl, "ttl", self.config.default_ttl, self.config.max_ttl)
        argv = self.argv(request.command)
        key = self.cache_key(request.command)
        if not request.use_cache:
            return Outcome(self._run(argv, timeout, key, client))
        cached = self.cache.get(key)
        if cached is not None:
            self.telemetry.record_hit()
            log.debug("%s hit %r", client, request.command)
            return Outcome(cached, cached=True)
        (body, elsewhere), shared = self._flights.run(
            key, lambda: self._run_and_store(argv, timeout, key, ttl, client)
        )
        shared = shared or elsewhere
        if shared:
            self.cache.record_coalesced()
        return Outcome(body, coalesced=shared)

    def argv(self, command: str) -> list[str]:
        """The argument vector that runs ``command``: the shell's, or the allowlist's."""
        if self.allowlist is not None:
            return self.allowlist.argv(command)
        return [*SHELL, command]

    def cache_key(self, command: str) -> str:
        """The key of a command's result: the command and everything else that changes it."""
        return hashlib.sha256(self._key_prefix + command.encode()).hexdigest()

    def _key_context(self) -> bytes:
        env = self.runner.env if self.runner.env is not None else os.environ
        context = {
            "shell": SHELL if self.allowlist is None else "none: allowlist mode",
            "cwd": self.runner.cwd or os.getcwd(),
            "env": {name: env.get(name) for name in KEY_ENV_VARS},
            "max_output_bytes": self.runner.max_output_bytes,
        }
        return orjson.dumps(context, option=orjson.OPT_SORT_KEYS) + b"\0"

    def _run_and_store(
        self, argv: list[str], timeout: float, key: str, ttl: float, client: str
    ) -> tuple[bytes, bool]:
        """Run and cache a command; or, if another instance runs it, its result and True."""
        with self.cache.exclusive(key, self.config.queue_timeout + timeout) as elsewhere:
            if elsewhere is not None:
                return elsewhere, True
            epoch = self.cache.epoch()
            result, body = self._execute(argv, timeout, key, client)
            if result.success:
                self.cache.put(key, body, ttl, epoch)
            return body, False

    def _run(self, argv: list[str], timeout: float, key: str, client: str) -> bytes:
        return self._execute(argv, timeout, key, client)[1]

    def _execute(
        self, argv: list[str], timeout: float, key: str, client: str
    ) -> tuple[RunResult, bytes]:
        with self.slots.hold():
            result = self.runner.run(argv, timeout)
        self.telemetry.record_run(result)
        log.info(
            "%s ran %r: exit %d in %.3fs%s",
            client,
            argv[-1] if argv[:2] == list(SHELL) else shlex.join(argv),
            result.return_code,
            result.execution_time,
            " (timed out)" if result.timed_out else "",
        )
        return result, encode_result(result, key)

    @staticmethod
    def _bounded(value: float | None, name: str, default: float, limit: float) -> float:
        if value is None:
            return default
        if value > limit:
            raise BadRequest(f"{name} must be at most {limit:g} seconds")
        return value

    # -- the cache and the service's state -------------------------------------

    def clear(self) -> None:
        """Empty the cache and reset its statistics in one step."""
        self.cache.clear()
        log.info("🧹 Cache cleared")

    def cache_stats(self) -> dict[str, Any]:
        """The statistics of ``GET /api/cache/stats``, or the last known while the store is down."""
        try:
            self._last_stats = self.cache.stats()
        except StoreError as error:
            return {**self._last_stats.as_dict(), "store_error": error.message}
        return self._last_stats.as_dict()

    def health(self) -> dict[str, Any]:
        """The object of ``GET /health``: cheap enough to poll every second."""
        stats = self.cache_stats()
        reason = self.cache.degraded_reason
        health: dict[str, Any] = {
            "status": "degraded" if reason else "healthy",
            "version": __version__,
            "store": self.cache.store.description,
            "cache_stats": stats,
            "telemetry": self.telemetry.as_dict(),
            "uptime": round(self.telemetry.uptime, 3),
            "running_commands": self.runner.running,
        }
        if reason:
            health["reason"] = f"cache store failed: {reason}"
        return health


def _command_env(config: Config) -> dict[str, str] | None:
    """The environment commands run with: runcache's own, or only the variables allowed."""
    if not config.env_names:
        return None
    return {name: os.environ[name] for name in config.env_names if name in os.environ}
