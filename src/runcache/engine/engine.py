"""The engine: everything runcache does, with no knowledge of HTTP.

The API, the CLI and the MCP adapter are thin layers over one :class:`Engine`,
so a behaviour (a cache key, a bound, a log line) is written once here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from runcache import __version__, wire
from runcache.config import Config, settings
from runcache.engine.audit import AuditLog
from runcache.engine.cache import Cache
from runcache.engine.callers import Caller
from runcache.engine.history import History
from runcache.engine.jobs import Job, Jobs, OutputFacts, output_facts
from runcache.engine.metrics import Metrics
from runcache.engine.policy import Policy
from runcache.engine.shared_jobs import RemoteJob, SharedJobs
from runcache.engine.slots import Slots
from runcache.engine.telemetry import Telemetry
from runcache.errors import (
    BadRequest,
    Busy,
    ClientGone,
    ConfigError,
    RuncacheError,
    StoreError,
)
from runcache.keys import DEFAULT_EXIT_CODES, cache_key, key_context
from runcache.keys import KEY_ENV_VARS as KEY_ENV_VARS  # the engine's, as tests name them
from runcache.keys import SHELL as SHELL
from runcache.logs import loggable
from runcache.run.allowlist import Allowlist
from runcache.run.context import ContextRules, key_part
from runcache.run.encode import encode_result
from runcache.run.inputs import Inputs, NeedsRead, Snapshot
from runcache.run.rlimits import RunLimits
from runcache.run.run_as import RunAs, without_own
from runcache.run.runner import NO_CONTEXT, RunContext, RunControl, Runner, RunResult
from runcache.stores import open_store
from runcache.stores.base import CacheStats
from runcache.stores.board import JobBoard, JobRecord, open_board
from runcache.stores.pools import Task, open_pools, queue_name

if TYPE_CHECKING:  # redis-py only with a redis:// store (runcache.stores.pools says why)
    from runcache.stores.redis_pools import RedisPools

log = logging.getLogger("runcache")


#: The tail of a stored result that each answer replaces with its own flags.
_HIT_TAIL = b',"cached":true,"coalesced":false}'
_RUN_TAIL = b',"cached":false,"coalesced":false}'
_SHARED_TAIL = b',"cached":false,"coalesced":true}'
_STALE_TAIL = b',"cached":true,"coalesced":false,"stale":true}'


class Plan(msgspec.Struct, frozen=True):
    """A checked request: what to run, under which key, for how long, kept how long.
    (A Struct, not a dataclass: made for every request, and copied for one with inputs,
    where ``dataclasses.replace`` cost a hit 12 us and ``msgspec.structs.replace`` 0.3.)"""

    command: str
    argv: list[str]
    key: str
    timeout: float
    ttl: float
    use_cache: bool
    #: Run even if a result is cached, and store the new one in its place.
    refresh: bool = False
    #: Where the command runs and what it is given, when the request says.
    context: RunContext = NO_CONTEXT
    #: Seconds past expiry a cached result may still answer (stale), refreshed meanwhile.
    stale: float = 0.0
    #: The exit codes whose results are answers to store.
    cache_exit_codes: frozenset[int] = DEFAULT_EXIT_CODES
    #: The files the command reads, as the request named them (their contents are keyed).
    inputs: tuple[str, ...] = ()
    #: What those inputs were when the key was made (None without inputs).
    snapshot: Snapshot | None = None
    #: The namespace of the cache the result belongs to ("" for none: the shared one).
    scope: str = ""
    #: The pool whose workers run it (None: this process runs it).
    pool: str | None = None

    def keeps(self, result: RunResult) -> bool:
        """Whether ``result`` is an answer to store: an exit code the request counts as
        one, never a run that timed out or was cancelled (what it printed is not what
        the command prints when it runs to its end)."""
        return (
            result.return_code in self.cache_exit_codes
            and not result.timed_out
            and not result.cancelled
        )


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
    #: Cached, but past its expiry: a refresh of it is running.
    stale: bool = False

    @property
    def tail(self) -> bytes:
        """What replaces the body's closing brace: this answer's flags, then the brace."""
        if self.cached:
            return _STALE_TAIL if self.stale else _HIT_TAIL
        return _SHARED_TAIL if self.coalesced else _RUN_TAIL

    def to_json(self) -> bytes:
        return self.body[:-1] + self.tail

    def result(self) -> wire.CommandResult:
        """The answer decoded as the typed result clients read."""
        return msgspec.json.decode(self.to_json(), type=wire.CommandResult)


class Engine:
    """Runs commands through the cache, once per key at a time, and keeps the counts.

    Its operations are coroutines on one event loop at a time: a cache hit on
    the memory store is answered without leaving the loop, and requests waiting
    for an identical run or for a slot await futures, not threads. Commands run
    in a pool of ``max_concurrent`` threads, one per slot.
    """

    def __init__(
        self,
        config: Config,
        cache: Cache,
        runner: Runner,
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
        board: JobBoard | None = None,
        pools: RedisPools | None = None,
    ) -> None:
        self.config = config
        #: Where the layers that know the caller record each request (``--audit-log``).
        self.audit = audit if audit is not None else AuditLog()
        self.cache = cache
        self.runner = runner
        self.telemetry = Telemetry()
        #: Prometheus counts, which no clear resets (``GET /metrics``).
        self.metrics = metrics if metrics is not None else Metrics()
        cache.on_failure = self.metrics.store_error
        self.jobs = Jobs(config.job_retention, output_bytes=config.job_output_bytes)
        #: With a shared store, the jobs of every instance (:mod:`runcache.engine.shared_jobs`).
        self.shared = SharedJobs(board) if board is not None else None
        self._last_stats = CacheStats(0, 0, 0, 0, 0, 0, config.max_entries, 0, config.max_bytes)
        self.slots = Slots(config.max_concurrent, config.queue_timeout)
        #: The cache's counts over time, recorded while the app serves (the dashboard's chart).
        self.history = History()
        self._run_threads = ThreadPoolExecutor(
            config.max_concurrent, thread_name_prefix="runcache-run"
        )
        self.allowlist: Allowlist | None = None
        if config.allowed_commands:
            with _named_by_flag("allow"):
                self.allowlist = Allowlist(
                    config.allowed_commands, runner.env, runner.cwd, config.runner_names
                )
        self.context_rules = ContextRules(
            config.cwd_roots, config.env_names, self.allowlist is not None
        )
        #: The rules of --policy, applied to each request before it is planned.
        self.policy = Policy.load(config.policy)
        #: The digests of the files requests name as their inputs, shared by them all.
        self.inputs = Inputs(config.max_input_files, config.max_input_bytes, config.cwd_roots)
        self._key_prefix = self._key_context()
        #: Whether a stale answer starts its refresh here; a short-lived process (the
        #: CLI's) that would kill it on exit starts a refresh of its own instead.
        self.refresh_stale = True
        #: With a redis:// store, the queues of the worker pools (:mod:`runcache.engine.worker`).
        self.pools = pools
        #: The pool this process works for, when it is a worker: it runs what it takes,
        #: keyed as the servers that queued it keyed it.
        self.worker_pool: str | None = None
        #: The pooled jobs this server queued (or is queuing) and waits on, by key:
        #: identical requests join them.
        self._pooled: dict[str, asyncio.Future[RemoteJob]] = {}
        #: Foreground requests waiting here on each pooled job, by job id; and the pooled
        #: foreground jobs a background request joined (theirs to keep). A job whose
        #: last waiter hangs up, that none holds, is cancelled, as a local run is.
        self._pooled_waiting: dict[str, int] = {}
        self._pooled_held: set[str] = set()
        self._abandoning: set[asyncio.Future[None]] = set()
        #: Why the pools' counts could not be read last time (None: they could), so an
        #: outage is logged once, and its end once.
        self._pools_failing: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> Engine:
        Policy.load(config.policy)  # a bad file is refused before anything is opened
        with _named_by_flag("audit_log"):
            audit = AuditLog(config.audit_log, config.audit_log_max_bytes)
        try:
            with _named_by_flag("store"):
                store = open_store(
                    config.store,
                    config.max_entries,
                    config.max_bytes,
                    retain=config.max_stale,
                    timeout=config.store_timeout,
                )
        except ConfigError:
            audit.close()
            raise
        try:
            runner = Runner(
                config.max_output_bytes,
                _command_env(config),
                containment_mode=config.containment,
                limits=RunLimits(
                    config.memory_limit,
                    config.max_cpu_seconds,
                    config.file_size_limit,
                    config.max_open_files,
                    config.max_processes,
                ),
                run_as=RunAs.lookup(config.run_as) if config.run_as else None,
            )
        except (OSError, ValueError) as error:  # a containment or a limit this machine cannot give
            store.close()
            audit.close()
            raise ConfigError(str(error)) from None
        with _named_by_flag("store"):
            board = open_board(
                config.store, config.instance_timeout, config.store_timeout, config.job_retention
            )
            pools = open_pools(config.store, config.store_timeout)
        if config.default_pool and pools is None:
            store.close()
            audit.close()
            raise ConfigError(
                f"--default-pool {config.default_pool!r} needs a redis:// store (--store): "
                "pools are queues on Redis Streams"
            )
        metrics = Metrics.for_server(config.workers)
        return cls(config, Cache(store), runner, metrics, audit, board, pools)

    async def serve_jobs(self) -> None:
        """With a shared store, publish this instance's jobs from now on and answer the
        others' control requests (on the loop that serves; a server calls it at start)."""
        if self.shared is not None and not self.shared.active:
            await self.shared.serve(self)
            self.jobs.on_new = self.shared.track

    async def aclose(self) -> None:
        """Release what the engine opened on the running loop (the store's hit path)."""
        if self.shared is not None:
            self.jobs.on_new = None
            await self.shared.aclose()
        if self.pools is not None:
            await self.pools.aclose()
        await self.cache.aclose()

    # -- jobs of every instance ------------------------------------------------------

    @property
    def sharing(self) -> SharedJobs | None:
        """The job board's side of this instance, once it serves one."""
        return self.shared if self.shared is not None and self.shared.active else None

    async def job(self, job_id: str, viewer: str | None = None) -> Job:
        """The job ``job_id`` if ``viewer`` may see it: this instance's, else (with a shared
        store) another's, read from the job board; the same 404 either way."""
        local = self.jobs.local(job_id)
        if local is not None or self.sharing is None:
            return self.jobs.get(job_id, viewer)
        remote = await self.sharing.find(job_id)
        if remote is None or not remote.visible_to(viewer):
            raise self.jobs.not_found(job_id)
        return remote

    async def job_listing(self, viewer: str | None = None) -> list[Job]:
        """Every job ``viewer`` may see, newest first: this instance's, and with a shared
        store every other instance's (a board that fails lists this instance's alone)."""
        local = self.jobs.listing(viewer)
        if self.sharing is None:
            return local
        try:
            remote = await self.sharing.listing()
        except StoreError:
            return local
        known = {job.job_id for job in local}
        others = [job for job in remote if job.job_id not in known and job.visible_to(viewer)]
        merged: list[Job] = [*local, *others]
        merged.sort(key=lambda job: job.started_at, reverse=True)
        return merged

    def close(self) -> None:
        """Kill running commands and release the store."""
        self.runner.kill_all()
        self._run_threads.shutdown(wait=True)
        self.cache.close()
        self.audit.close()

    # -- commands: the one door --------------------------------------------------

    async def run(
        self,
        request: wire.RunRequest,
        caller: Caller,
        gone: Callable[[], Awaitable[object]] | None = None,
    ) -> Outcome:
        """Answer a request from the cache, from an identical run in flight, or by running it.

        The one way in for an answer, whoever asks (the command route, MCP, the
        in-process client): it plans, checks the allowlist and the run context, looks
        up, joins or claims, waits, and writes the request's one audit line, a refusal's
        too. ``gone``, when given, returns once the caller has gone away: the wait then
        ends with :class:`~runcache.errors.ClientGone` (and a run only that caller
        wanted is killed).
        """
        try:
            plan = await self._planned(request)
            outcome = await self._lookup(plan, caller)
            if outcome is None and plan.pool is not None:
                remote, joined = await self._queue(plan, request, caller, background=False)
                try:
                    outcome = await self._answer(lambda: self._pooled_outcome(remote, joined), gone)
                except ClientGone:
                    self._abandon(remote)
                    raise
            elif outcome is None:
                job, joined = self._claim(plan, caller)
                outcome = await self._answer(lambda: self._outcome(job, joined), gone)
        except ClientGone:
            self.audit.left(caller, plan.command, plan.key)
            raise
        except RuncacheError as error:  # the allowlist, a bound, no free slot
            self.audit.refused(caller, request.command, error.message)
            raise
        if self.audit.enabled:  # a hit's path: no record made for no audit log
            self.audit.answered(caller, plan.command, plan.key, outcome)
        return outcome

    async def start(
        self, request: wire.RunRequest, caller: Caller, job_id: str | None = None
    ) -> tuple[Job, bool]:
        """Start (or join) a request's run in the background: its job at once, and whether
        that was an identical run already going. The one way in for a background run
        (``"background": true``, ``execute-async``, MCP's tools); the job is the caller's
        from now on, and its audit line is written when it ends (a refusal's at once).

        A request the cache answers gets a job that has ended already, with the
        cached result. A worker gives the ``job_id`` the queuing server chose (and
        never joins a run here under another id: the key's lease lets one run).
        """
        try:
            plan = await self._planned(request)
            hit = await self._lookup(plan, caller)
            job: Job
            if hit is None and plan.pool is not None:
                job, joined = await self._queue(plan, request, caller, background=True)
            elif hit is None:
                job, joined = self._claim(plan, caller, background=True, job_id=job_id)
            else:
                job, joined = await self._answered_job(plan, hit, caller, job_id), False
        except RuncacheError as error:
            self.audit.refused(caller, request.command, error.message)
            raise
        self.audit.submitted(caller, job, joined)
        return job, joined

    async def _planned(self, request: wire.RunRequest) -> Plan:
        """:meth:`plan`, and with ``inputs`` their contents in the key (read in a thread:
        a stat of each file, a digest of those whose stat changed since last seen)."""
        plan = self.plan(request)
        if not plan.inputs:
            return plan
        cwd = self._cwd(plan)
        # The same few plain paths as last time, unchanged: a stat each, on the loop.
        snapshot = self.inputs.known(cwd, plan.inputs)
        if snapshot is None and self.inputs.few_paths(plan.inputs):  # cheaper than a thread
            with contextlib.suppress(NeedsRead):  # one to read: then in a thread
                snapshot = self.inputs.snapshot(cwd, plan.inputs, known_only=True)
        if snapshot is None:
            snapshot = await asyncio.to_thread(self.inputs.snapshot, cwd, plan.inputs)
        key = hashlib.sha256(plan.key.encode() + b"\0inputs\0" + snapshot.digest).hexdigest()
        return msgspec.structs.replace(plan, key=key, snapshot=snapshot)

    def _cwd(self, plan: Plan) -> str:
        """The directory ``plan`` runs in."""
        return plan.context.cwd or self.runner.cwd or os.getcwd()

    async def _inputs_changed(self, plan: Plan) -> bool:
        """Whether the inputs changed since the key was made (then the result, which may
        have read either version, is not stored)."""
        if plan.snapshot is None:
            return False
        return await asyncio.to_thread(
            self.inputs.changed, self._cwd(plan), plan.inputs, plan.snapshot
        )

    def plan(self, request: wire.RunRequest) -> Plan:
        """What a request asks for (with the server's policy where it says nothing),
        checked against this server's bounds."""
        request = self.policy.applied_to(request)
        pool = self._pool_of(request)
        # A pooled command's context is the worker's to check, by its own rules.
        context = NO_CONTEXT if pool is not None else self.context_rules.check(request)
        asked = request.cache_exit_codes
        codes = DEFAULT_EXIT_CODES if asked is None else frozenset(map(int, asked))
        keyed_by = pool or self.worker_pool
        return Plan(
            command=request.command,
            argv=[] if pool is not None else self.argv(request.command),
            key=self.cache_key(request.command, context, codes, request.scope or "")
            if keyed_by is None
            else self._pool_key(keyed_by, request, codes),
            timeout=self._bounded(
                request.timeout, "timeout", self.config.default_timeout, self.config.max_timeout
            ),
            ttl=self._bounded(request.ttl, "ttl", self.config.default_ttl, self.config.max_ttl),
            use_cache=request.use_cache,
            refresh=self._refresh(request),
            context=context,
            stale=self._bounded(
                request.stale, "stale", self.config.default_stale, self.config.max_stale
            ),
            cache_exit_codes=codes,
            inputs=tuple(request.inputs or ()),
            scope=request.scope or "",
            pool=pool,
        )

    async def _lookup(self, plan: Plan, caller: Caller) -> Outcome | None:
        """The cached answer, if the request may have one and there is one. A stale one
        (``plan.stale`` accepts it: :func:`runcache.stores.base.answers`) starts its
        refresh, a job of the caller's, once per key (across instances, the store's lock
        lets one run it and the others take its result)."""
        if not plan.use_cache or plan.refresh:
            return None
        found = await self.cache.lookup(plan.key, plan.stale)
        if found is None:
            self.metrics.miss()
            return None
        cached, stale = found
        self.metrics.hit()
        self.telemetry.record_hit()
        if stale:
            self.metrics.stale_hit()
            if self.refresh_stale and self.jobs.running_for(plan.key) is None:
                log.debug("%s stale hit %r: refreshing it", caller.client, loggable(plan.command))
                self._claim(msgspec.structs.replace(plan, refresh=True), caller, background=True)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s hit %r", caller.client, loggable(plan.command))
        return Outcome(cached, cached=True, stale=stale)

    def _claim(
        self, plan: Plan, caller: Caller, background: bool = False, job_id: str | None = None
    ) -> tuple[Job, bool]:
        """The job that answers ``plan``: the identical one running, joined, or a new one;
        either way the caller's (:attr:`Caller.owner`) from now on."""
        if plan.use_cache and job_id is None:
            running = self.jobs.running_for(plan.key)
            if running is not None:
                running.holders += background
                running.own(caller.owner)
                return running, True
        control = RunControl(self.runner.max_output_bytes)
        job = self.jobs.new(
            plan.command, plan.key, control, plan.use_cache, background, caller.owner, job_id
        )
        control.on_output = job.attach(asyncio.get_running_loop())
        job.task = asyncio.ensure_future(self._run_job(job, plan, caller.client))
        job.task.add_done_callback(lambda _: self.jobs.ended(job))
        return job, False

    async def _answered_job(
        self, plan: Plan, hit: Outcome, caller: Caller, job_id: str | None = None
    ) -> Job:
        """A background request the cache answered: a job that has ended, with the hit."""
        facts = await _facts_of(hit.body)
        job = self.jobs.new(
            plan.command, plan.key, None, plan.use_cache, True, caller.owner, job_id
        )
        job.cached, job.stale = True, hit.stale
        job.finish(hit.body, None, facts=facts)
        return job

    async def _answer(
        self,
        wait: Callable[[], Awaitable[Outcome]],
        gone: Callable[[], Awaitable[object]] | None,
    ) -> Outcome:
        """The answer ``wait`` waits for, unless the caller goes first (``gone`` returns):
        then the wait is cancelled, so the job counts one client less, and ClientGone is
        raised."""
        if gone is None:
            return await wait()
        answer = asyncio.ensure_future(wait())
        left = asyncio.ensure_future(gone())
        try:
            await asyncio.wait((answer, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not answer.done():
                answer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await answer
        if answer.cancelled():
            raise ClientGone("the client closed the connection before the answer")
        return answer.result()

    async def _outcome(self, job: Job, joined: bool) -> Outcome:
        """Wait for a job's answer as one of its clients.

        A client that goes away (its request cancelled) leaves the run alone
        unless it was the last client of a run nobody else can use: neither
        cached nor in the background. That run is cancelled.
        """
        assert job.task is not None
        job.clients += 1
        try:
            body = await asyncio.shield(job.task)
        except asyncio.CancelledError:
            if job.clients == 1 and not job.cacheable and not job.background:
                self.cancel(job)
            raise
        finally:
            job.clients -= 1
        coalesced = joined or job.elsewhere
        if coalesced:
            self.metrics.coalesced()
            await self.cache.record_coalesced()
        return Outcome(body, coalesced=coalesced)

    # -- pools: commands run where the tools are ------------------------------------

    async def _queue(
        self, plan: Plan, request: wire.RunRequest, caller: Caller, background: bool
    ) -> tuple[RemoteJob, bool]:
        """Queue ``plan`` for its pool (or join the identical pooled job this server
        waits on): the job, read from the board, and whether it was joined. A 503 with
        Retry-After when the pool has no live worker or a full queue."""
        pool = plan.pool
        assert pool is not None and self.pools is not None and self.sharing is not None
        if plan.use_cache:
            queuing = self._pooled.get(plan.key)
            if queuing is not None:
                running = await asyncio.shield(queuing)  # its 503, if it got one
                await running.catch_up()  # its end, if it came while nobody here waited
                if not running.ended:
                    if background:
                        self._pooled_held.add(running.job_id)
                    return running, True
                if self._pooled.get(plan.key) is queuing:
                    del self._pooled[plan.key]
        # A foreground request's job is listed for the requests that join it until its
        # waiter sees it end; a background one's is not (nobody here would see it end).
        if plan.use_cache and not background:
            queued: asyncio.Future[RemoteJob] = asyncio.get_running_loop().create_future()
            self._pooled[plan.key] = queued
            try:
                job = await self._enqueue(plan, request, caller, background)
            except BaseException as error:
                if self._pooled.get(plan.key) is queued:
                    del self._pooled[plan.key]
                queued.set_exception(error)
                queued.exception()  # retrieved: a request that joined it raises it itself
                raise
            queued.set_result(job)
            return job, False
        return await self._enqueue(plan, request, caller, background), False

    async def _enqueue(
        self, plan: Plan, request: wire.RunRequest, caller: Caller, background: bool
    ) -> RemoteJob:
        """Queue ``plan`` for its pool with its job's first record: the job."""
        pool = plan.pool
        assert pool is not None and self.pools is not None and self.sharing is not None
        record = JobRecord(
            job_id=secrets.token_hex(16),
            command=plan.command,
            cache_key=plan.key,
            instance=queue_name(pool),
            status="running",
            started_at=time.time(),
            owners=[] if caller.owner is None else [caller.owner],
            cacheable=plan.use_cache,
            background=background,
            pool=pool,
        )
        task = Task(
            job_id=record.job_id,
            request=msgspec.json.encode(_as_run_request(request)),
            client=caller.client,
            credential=caller.credential,
            identity=caller.identity,
            background=background,
            retries=int(request.retries),
        )
        queued, count = await self.pools.enqueue(pool, task, record, self.config.max_queued)
        if queued == 0:
            raise Busy(
                f"pool {pool!r} has no live worker: start one with runcache worker --pool {pool}",
                retry_after=_POOL_RETRY_SECONDS,
            )
        if queued < 0:
            raise Busy(
                f"pool {pool!r} has {count} commands queued, the most --max-queued allows",
                retry_after=_POOL_RETRY_SECONDS,
            )
        log.debug("%s queued %r for pool %s", caller.client, loggable(plan.command), pool)
        return RemoteJob(record, self.sharing.board)

    async def _pooled_outcome(self, job: RemoteJob, joined: bool) -> Outcome:
        """Wait for a pooled job's end on the board, as one of its clients; a job still
        queued when its pool has lost every worker ends the wait with a 503."""
        pool = job.record.pool
        assert pool is not None and self.pools is not None
        self._pooled_waiting[job.job_id] = self._pooled_waiting.get(job.job_id, 0) + 1
        try:
            while not job.ended:
                await job.changed()
                if not job.ended and job.instance == queue_name(pool):
                    if await self.pools.live_workers(pool) == 0:
                        raise Busy(
                            f"pool {pool!r} has no live worker left to run job {job.job_id}",
                            retry_after=_POOL_RETRY_SECONDS,
                        )
        finally:
            self._pooled_waiting[job.job_id] -= 1
            if not self._pooled_waiting[job.job_id]:
                del self._pooled_waiting[job.job_id]
            if job.ended:
                self._pooled_held.discard(job.job_id)
            queued = self._pooled.get(job.cache_key)
            if (
                job.ended
                and queued is not None
                and queued.done()
                and queued.exception() is None
                and queued.result() is job
            ):
                del self._pooled[job.cache_key]
        if job.body is None:
            raise Busy(job.error or f"job {job.job_id} ended without a result", _POOL_RETRY_SECONDS)
        if job.cached:  # the worker found it stored meanwhile
            return Outcome(job.body, cached=True, stale=job.stale)
        coalesced = joined or job.elsewhere
        if coalesced:
            self.metrics.coalesced()
        return Outcome(job.body, coalesced=coalesced)

    def _abandon(self, job: RemoteJob) -> None:
        """A foreground request's client hung up on a pooled job: cancel it (in its queue,
        or on its worker) unless another request here waits on it or a background one
        joined it, as a local run only its own callers wanted is killed."""
        if job.ended or self._pooled_waiting.get(job.job_id) or job.job_id in self._pooled_held:
            return
        cancelling = asyncio.ensure_future(self._cancel_pooled(job))
        self._abandoning.add(cancelling)
        cancelling.add_done_callback(self._abandoning.discard)

    async def _cancel_pooled(self, job: RemoteJob) -> None:
        try:
            if not await self.cancel_queued(job) and self.sharing is not None:
                await self.sharing.control(job, "cancel")
        except RuncacheError as error:  # a store down: the run goes on to its timeout
            log.warning(
                "job %s: its client left, and it could not be cancelled: %s",
                job.job_id,
                error.message,
            )

    def queued(self, job: RemoteJob) -> bool:
        """Whether ``job`` waits in its pool's queue, as last read: no worker runs it."""
        pool = job.record.pool
        return pool is not None and not job.ended and job.instance == queue_name(pool)

    async def cancel_queued(self, job: RemoteJob) -> bool:
        """Cancel a pooled job before any worker takes it: it never runs, and its clients
        get a cancelled result at once (no instance runs it, so none is asked). False once
        a worker has it: then that worker is asked, as for any other instance's job."""
        if self.pools is None or not self.queued(job):
            return False
        timestamp = datetime.now(UTC).isoformat()
        never_ran = RunResult(
            bytearray(), bytearray(), -9, False, False, False, 0.0, timestamp, cancelled=True
        )
        body = encode_result(never_ran, job.cache_key)
        cancelled = await self.pools.end_queued(job.job_id, body, self.config.job_retention)
        assert self.sharing is not None
        found = await self.sharing.board.get(job.job_id)
        if found is not None:
            job._update(found)
        return cancelled

    def _pool_of(self, request: wire.RunRequest) -> str | None:
        """The pool that runs ``request`` (None: this process does): a worker runs what it
        takes; a server asks the request's pool, else --default-pool."""
        if self.worker_pool is not None:
            return None
        pool = request.pool or self.config.default_pool or None
        if pool is None:
            return None
        if self.pools is None:
            raise BadRequest(
                f"pool {pool!r} needs a redis:// store (--store): this server's is "
                f"{self.cache.store.description}"
            )
        if self.sharing is None:
            raise BadRequest(
                f"pool {pool!r}: a pool's commands are queued by a runcache server "
                "(runcache run --server URL --pool NAME)"
            )
        if request.inputs:
            raise BadRequest(
                "inputs are read where the command runs: a request with a pool cannot name them"
            )
        return pool

    def _pool_key(
        self, pool: str, request: wire.RunRequest, cache_exit_codes: frozenset[int]
    ) -> str:
        """A pooled command's key: the pool in place of this process's own environment (a
        pool is a set of machines with its tools: the same command prints other things
        there), and the run context as the request gives it, so the server that queues
        it and the worker that runs it make the same key."""
        asked = RunContext(cwd=request.cwd, env=request.env, stdin=(request.stdin or "").encode())
        prefix = b"pool\0" + pool.encode() + b"\0"
        return cache_key(prefix, request.command, key_part(asked), cache_exit_codes, request.scope)

    async def pool_counts(self) -> list[wire.PoolCounts]:
        """Every pool's live workers, queued and running commands, as ``GET /api/pools``
        and ``/metrics`` show them: none without a redis:// store. A StoreError when
        Redis fails, logged once per outage (every scrape and poll would repeat it)."""
        if self.pools is None:
            return []
        try:
            counts = await self.pools.counts()
        except StoreError as error:
            if self._pools_failing is None:
                log.warning("worker pools unreadable: %s", error.message)
            self._pools_failing = error.message
            self.metrics.store_error()
            raise
        if self._pools_failing is not None:
            log.warning("worker pools readable again")
            self._pools_failing = None
        return counts

    def cancel(self, job: Job) -> bool:
        """Kill a running job's whole group; everyone waiting gets the cancelled result."""
        return job.control is not None and not job.ended and job.control.cancel()

    def leave(self, job: Job) -> bool:
        """A background request gives up ``job``: its run is cancelled when nobody else
        wants it (no other background request holds it, no request waits on it), cached
        or not. Whether this cancelled it."""
        if job.holders > 0:
            job.holders -= 1
        if job.holders == 0 and job.clients == 0:
            return self.cancel(job)
        return False

    def pause(self, job: Job) -> bool:
        done = job.control is not None and not job.ended and job.control.pause()
        if done:
            job.touch()
        return done

    def resume(self, job: Job) -> bool:
        done = job.control is not None and not job.ended and job.control.resume()
        if done:
            job.touch()
        return done

    def argv(self, command: str) -> list[str]:
        """The argument vector that runs ``command``: the shell's, or the allowlist's."""
        if self.allowlist is not None:
            return self.allowlist.argv(command)
        return [*SHELL, command]

    def cache_key(
        self,
        command: str,
        context: RunContext = NO_CONTEXT,
        cache_exit_codes: frozenset[int] = DEFAULT_EXIT_CODES,
        scope: str = "",
    ) -> str:
        """The key of a command's result: the command, its run context, the exit codes
        that are answers (when not the default: a request that counts only 0 as an answer
        must not be answered with another's exit 1), its scope (when it has one: no scope
        keeps the keys of caches made before scopes), and everything else that changes it."""
        return cache_key(self._key_prefix, command, key_part(context), cache_exit_codes, scope)

    def _key_context(self) -> bytes:
        shell = SHELL if self.allowlist is None else "none: allowlist mode"
        cwd = self.runner.cwd or os.getcwd()
        return key_context(shell, cwd, self.runner.env, self.runner.max_output_bytes)

    async def _run_job(self, job: Job, plan: Plan, client: str) -> bytes:
        """Run a job's command (and store its result when it may be); its result's JSON.

        A cacheable run first takes the store's lock for its key, so an identical
        request on another instance sharing the store runs once; if that one
        stored the result meanwhile, it is this job's answer.
        """
        assert job.control is not None
        try:
            if not job.cacheable:
                result, body, facts = await self._execute(plan, client, job.control)
                job.finish(body, result, facts=facts)
                return body
            lease = self.config.queue_timeout + plan.timeout
            superseded = await self.cache.peek(plan.key) if plan.refresh else None
            async with self.cache.exclusive(plan.key, lease, superseded, job.hold) as elsewhere:
                if elsewhere is not None:
                    job.finish(elsewhere, None, elsewhere=True, facts=await _facts_of(elsewhere))
                    return elsewhere
                epoch = await self.cache.epoch()
                result, body, facts = await self._execute(plan, client, job.control)
                if plan.keeps(result) and not await self._inputs_changed(plan):
                    await self.cache.put(
                        plan.key,
                        body,
                        plan.ttl,
                        epoch,
                        plan.command,
                        result.return_code,
                        plan.scope,
                    )
                job.finish(body, result, facts=facts)
                return body
        except RuncacheError as error:  # refused before it ran: every slot stayed busy
            job.fail(error.message)
            raise
        finally:
            job.control.close()

    async def _execute(
        self, plan: Plan, client: str, control: RunControl
    ) -> tuple[RunResult, bytes, OutputFacts]:
        loop = asyncio.get_running_loop()
        async with self.slots.hold():
            with self.metrics.running():
                result, body, facts = await loop.run_in_executor(
                    self._run_threads, self._run_and_encode, plan, control
                )
        self.telemetry.record_run(result)
        self.metrics.ran(result)
        log.info(
            "%s ran %r: exit %d in %.3fs%s",
            client,
            loggable(plan.argv[-1] if plan.argv[:2] == list(SHELL) else shlex.join(plan.argv)),
            result.return_code,
            result.execution_time,
            " (cancelled)" if result.cancelled else " (timed out)" if result.timed_out else "",
            extra={
                "client": client,
                "command": loggable(plan.command),
                "return_code": result.return_code,
                "execution_time": round(result.execution_time, 6),
            },
        )
        return result, body, facts

    def _run_and_encode(
        self, plan: Plan, control: RunControl
    ) -> tuple[RunResult, bytes, OutputFacts]:
        """In a run thread: the command, then its result encoded (a large output takes a
        while), and what a job listing shows of it, worked out here once."""
        result = self.runner.run(plan.argv, plan.timeout, control, plan.context)
        control.sealed = True  # encoding empties its buffers: pages come from the result now
        body = encode_result(result, plan.key, self.runner.max_output_bytes, plan.inputs)
        return result, body, output_facts(body)

    @staticmethod
    def _refresh(request: wire.RunRequest) -> bool:
        if request.refresh and not request.use_cache:
            raise BadRequest(
                "refresh stores the new result and use_cache false stores nothing: send one of them"
            )
        return request.refresh

    @staticmethod
    def _bounded(value: float | None, name: str, default: float, limit: float) -> float:
        if value is None:
            return default
        if value > limit:
            raise BadRequest(f"{name} must be at most {limit:g} seconds")
        return value

    # -- the cache and the service's state -------------------------------------

    async def clear(self) -> wire.Cleared:
        """Empty the cache and reset its statistics in one step."""
        self.metrics.store_seen(await self.cache.clear(), cleared=True)
        log.info("🧹 Cache cleared")
        return wire.Cleared()

    async def cache_stats(self) -> wire.CacheStats:
        """The statistics of ``GET /api/cache/stats``, or the last known while the store is down."""
        try:
            self._last_stats = await self.cache.stats()
        except StoreError as error:
            return stats_answer(self._last_stats, error.message)
        self.metrics.store_seen(self._last_stats)
        return stats_answer(self._last_stats)

    async def health(self) -> wire.Health:
        """The object of ``GET /health``: cheap enough to poll every second."""
        stats = await self.cache_stats()
        reason = self.cache.degraded_reason
        return wire.Health(
            status="degraded" if reason else "healthy",
            version=__version__,
            store=self.cache.store.description,
            cache_stats=stats,
            telemetry=self.telemetry.snapshot(),
            uptime=round(self.telemetry.uptime, 3),
            running_commands=self.runner.running,
            slots=wire.SlotUse(
                size=self.slots.size, in_use=self.slots.held, queued=self.slots.waiting
            ),
            reason=f"cache store failed: {reason}" if reason else msgspec.UNSET,
            job_retention=self.config.job_retention,
        )


def stats_answer(
    stats: CacheStats, store_error: str | msgspec.UnsetType = msgspec.UNSET
) -> wire.CacheStats:
    """A store's snapshot as the API answers it; ``hit_rate`` is the contract's string."""
    return wire.CacheStats(
        hits=stats.hits,
        misses=stats.misses,
        evictions=stats.evictions,
        expirations=stats.expirations,
        coalesced=stats.coalesced,
        stale_hits=stats.stale_hits,
        size=stats.size,
        max_size=stats.max_size,
        bytes=stats.bytes,
        max_bytes=stats.max_bytes,
        hit_rate=f"{stats.hit_ratio * 100:.1f}%",
        hit_ratio=round(stats.hit_ratio, 6),
        store_error=store_error,
    )


#: A result larger than this has its job's facts worked out in a thread, not on the loop.
_FACTS_IN_THREAD_BYTES = 256 * 1024


async def _facts_of(body: bytes) -> OutputFacts:
    """What a job listing shows of ``body``, worked out in a thread when it is large."""
    if len(body) > _FACTS_IN_THREAD_BYTES:
        return await asyncio.to_thread(output_facts, body)
    return output_facts(body)


@contextlib.contextmanager
def _named_by_flag(field: str) -> Iterator[None]:
    """A ConfigError raised while opening what setting ``field`` names, led by its flag.

    The store, the allowlist and the audit log are checked as they are opened, after
    :meth:`Config.load` (which names the settings it refuses); their errors name the
    setting the way every other setting error does: ``--store: ...``.
    """
    try:
        yield
    except ConfigError as error:
        flag = next(setting.flag for setting in settings() if setting.name == field)
        raise ConfigError(f"{flag}: {error}") from None


#: Seconds a 503 for a pool asks the client to wait.
_POOL_RETRY_SECONDS = 5


def _as_run_request(request: wire.RunRequest) -> wire.RunRequest:
    """The run's fields of a request (a command route's body has ``background`` too)."""
    if type(request) is wire.RunRequest:
        return request
    fields = {name: getattr(request, name) for name in wire.RunRequest.__struct_fields__}
    return wire.RunRequest(**fields)


def _command_env(config: Config) -> dict[str, str]:
    """The environment commands run with: runcache's own, or only the variables allowed;
    never runcache's settings nor a variable holding a token (:mod:`runcache.run.run_as`)."""
    if not config.env_names:
        return without_own(os.environ, config.secrets)
    return without_own(
        {name: os.environ[name] for name in config.env_names if name in os.environ}, config.secrets
    )
