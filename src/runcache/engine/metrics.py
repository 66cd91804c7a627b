"""Prometheus metrics: counts that never go down, whatever a clear resets.

The engine calls a :class:`Metrics` as things happen (a hit, a miss, a run and
its outcome, a store call that failed); ``GET /metrics`` renders it in the
Prometheus text format. It knows nothing of HTTP: the route and the middleware
that times requests are in :mod:`runcache.web.routes.metrics`.

Three kinds of figure, by where they come from:

- **Counted here, per process**: hits, misses, coalesced and stale answers,
  commands by outcome, store errors, and the two histograms. A process counts
  what it did itself, so processes and servers add up, and a clear touches none.
- **Derived from the store** (evictions, expirations): they happen inside the
  store, which counts them since its last clear, across every process that
  shares it. :class:`StoreCounts` turns those resettable counts into totals
  that only rise, by adding each increase it sees and, at a clear, what the
  clear reset. Every process of a server shares one ledger (a file in the
  multiprocess directory), so workers reading one shared store do not add its
  figures twice; servers with their own ledgers that share one store each
  report the store's whole figure.
- **Read at scrape time**: the store's entries and bytes, and with a redis:// store
  each worker pool's live workers, queued and running commands (``{pool}``): Redis
  holds them for every server, so any server's scrape shows the same figures. A
  pool read that fails leaves the pool series out of that scrape; the rest answers.

**Several processes** (``--workers N``): the supervising process makes a
private directory and names it in ``PROMETHEUS_MULTIPROC_DIR`` before it forks
(:func:`multiprocess_directory`); each worker's metrics live in mmapped files
there (prometheus_client's multiprocess mode), and a scrape of any worker sums
them all. Counters of a worker that died stay in the sum (counters never go
down); its running commands leave it (``livesum``, :func:`worker_ended`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import platform
import shutil
import tempfile
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.utils import floatToGoString

from runcache import __version__
from runcache.run.runner import RunResult
from runcache.stores.base import CacheStats
from runcache.wire import PoolCounts

#: The variable prometheus_client's multiprocess mode reads its directory from.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Set (to anything but empty) only by benchmarks/http_hits.py, to measure what the
#: counting costs a hit: the server then counts nothing and /metrics shows nothing.
BENCHMARK_OFF_ENV = "RUNCACHE_BENCHMARK_NO_METRICS"

#: What ``GET /metrics`` answers: the text format every Prometheus reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: The ``outcome`` label of ``runcache_commands_total``.
OUTCOMES = ("success", "failure", "timeout", "cancelled")

#: The ``route`` label of a request that matched no route: one value for every
#: unknown path, since a label per raw path would grow without bound.
OTHER_ROUTE = "other"

#: Command durations: from a quick ``echo`` to the longest timeout allowed.
COMMAND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)

#: Request durations: a hit takes well under a millisecond, a run as long as it runs.
REQUEST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)

#: How long streams stay open: a follow of a quick run to a watch of an hour's.
STREAM_BUCKETS = (0.1, 1, 10, 60, 300, 900, 3600, 14400)

#: A request's labels: its route template, method and status code.
RequestLabels = tuple[str, str, str]

#: The file in the multiprocess directory that holds the shared store ledger (not
#: ``*.db``, which the multiprocess collector reads as metrics).
_LEDGER_FILE = "store_counts.json"

#: The store counts derived into counters, as named in :class:`CacheStats`.
_STORE_FIELDS = ("evictions", "expirations")


class Metrics:
    """The metrics of one server process (and, with ``multiprocess_dir``, of its siblings).

    Every method the engine calls on a request's path is one or two increments
    of a prometheus_client value: well under a microsecond in one process, a few
    in multiprocess mode, where each writes to an mmapped file.
    """

    #: Whether anything is counted (and requests are worth timing).
    enabled = True

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        # A ``*_created`` series beside each counter says only when this process
        # started (multiprocess mode has none): the text format is clearer without.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self._registry = CollectorRegistry(auto_describe=False)
        if multiprocess_dir is not None:
            # prometheus_client picks its value class from the environment when it is
            # first imported, which in a server is before the supervisor made the
            # directory, and finds the directory in the environment whenever it opens
            # a file; this process is a worker of its own, so both are set here.
            os.environ[MULTIPROC_ENV] = multiprocess_dir
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
            MultiProcessCollector(self._registry, multiprocess_dir)  # type: ignore[no-untyped-call]
        own = None if multiprocess_dir is not None else self._registry
        self._hits = Counter(
            "runcache_cache_hits",
            "Lookups answered from the cache (stale answers included).",
            registry=own,
        )
        self._misses = Counter(
            "runcache_cache_misses",
            "Lookups the cache could not answer, so the command ran (or joined a run).",
            registry=own,
        )
        self._coalesced = Counter(
            "runcache_cache_coalesced",
            "Requests answered by an identical request's run.",
            registry=own,
        )
        self._stale_hits = Counter(
            "runcache_cache_stale_hits",
            "Hits answered with an expired result while it was refreshed.",
            registry=own,
        )
        commands = Counter(
            "runcache_commands", "Commands run, by outcome.", ["outcome"], registry=own
        )
        self._outcomes = {outcome: commands.labels(outcome) for outcome in OUTCOMES}
        self._store_errors = Counter(
            "runcache_store_errors",
            "Calls to the store that failed (the request went on without it).",
            registry=own,
        )
        self._durations = Histogram(
            "runcache_command_duration_seconds",
            "How long commands ran.",
            buckets=COMMAND_BUCKETS,
            registry=own,
        )
        self._requests: RouteDurations | _SharedRouteDurations
        if multiprocess_dir is None:
            self._requests = RouteDurations()
            self._registry.register(self._requests)
        else:
            self._requests = _SharedRouteDurations()
        self._streams = Histogram(
            "runcache_http_stream_duration_seconds",
            "How long answers streamed as events "
            "(SSE, MCP over HTTP) stayed open, by route template.",
            ["route"],
            buckets=STREAM_BUCKETS,
            registry=own,
        )
        build = Gauge(
            "runcache_build_info",
            "runcache's version and Python's (always 1).",
            ["version", "python"],
            registry=own,
            multiprocess_mode="max",
        )
        build.labels(__version__, platform.python_version()).set(1)
        # The process's memory, CPU and descriptors, and Python's version and collections:
        # what the answering process reads of itself (with --workers, the worker scraped).
        ProcessCollector(registry=self._registry)
        PlatformCollector(registry=self._registry)
        GCCollector(registry=self._registry)
        self._running = Gauge(
            "runcache_running_commands",
            "Commands running now.",
            registry=own,
            multiprocess_mode="livesum",
        )
        ledger = None if multiprocess_dir is None else os.path.join(multiprocess_dir, _LEDGER_FILE)
        self.store_counts = StoreCounts(ledger)
        self._figures = _ScrapeFigures(self.store_counts)
        self._registry.register(self._figures)

    @classmethod
    def for_server(cls, workers: int) -> Metrics:
        """The metrics of a server process: shared with its siblings when there are
        several and the supervisor made their directory; none at all for a benchmark
        measuring what they cost."""
        if os.environ.get(BENCHMARK_OFF_ENV):
            return NoMetrics()
        directory = os.environ.get(MULTIPROC_ENV) if workers > 1 else None
        return cls(directory or None)

    # -- what the engine calls ---------------------------------------------------

    def hit(self) -> None:
        self._hits.inc()

    def miss(self) -> None:
        self._misses.inc()

    def coalesced(self) -> None:
        self._coalesced.inc()

    def stale_hit(self) -> None:
        """An answer from an expired entry (counted as a hit by :meth:`hit` too)."""
        self._stale_hits.inc()

    def store_error(self) -> None:
        self._store_errors.inc()

    def running(self) -> AbstractContextManager[object]:
        """Counts a command as running while the block runs."""
        return self._running.track_inprogress()

    def ran(self, result: RunResult) -> None:
        """A command ended: its outcome and how long it ran."""
        self._outcomes[outcome_of(result)].inc()
        self._durations.observe(result.execution_time)

    def store_seen(self, stats: CacheStats, cleared: bool = False) -> None:
        """The store's counts as just read (or, with ``cleared``, as a clear reset them)."""
        self.store_counts.observe(stats, cleared)

    def request(self, labels: RequestLabels, seconds: float) -> None:
        """An HTTP request took ``seconds``: its route (a template or :data:`OTHER_ROUTE`),
        method and status code."""
        self._requests.observe(labels, seconds)

    def stream(self, route: str, seconds: float) -> None:
        """An answer streamed as events (SSE, MCP over HTTP) was open ``seconds``: kept apart
        from request latency, which a stream open for minutes would swamp."""
        self._streams.labels(route).observe(seconds)

    # -- the scrape ------------------------------------------------------------

    def exposition(self, entries: int, size: int, pools: Sequence[PoolCounts] = ()) -> bytes:
        """The text ``GET /metrics`` answers, with the store's entries and bytes and the
        worker pools' counts as read now."""
        self._figures.entries, self._figures.bytes, self._figures.pools = entries, size, pools
        return generate_latest(self._registry)


class NoMetrics(Metrics):
    """Metrics that count nothing: what a hit costs without them, for benchmarks only."""

    enabled = False

    def __init__(self) -> None:
        self.multiprocess_dir = None
        self.store_counts = StoreCounts(None)

    def hit(self) -> None:
        pass

    def miss(self) -> None:
        pass

    def coalesced(self) -> None:
        pass

    def stale_hit(self) -> None:
        pass

    def store_error(self) -> None:
        pass

    def running(self) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def ran(self, result: RunResult) -> None:
        pass

    def store_seen(self, stats: CacheStats, cleared: bool = False) -> None:
        pass

    def request(self, labels: RequestLabels, seconds: float) -> None:
        pass

    def stream(self, route: str, seconds: float) -> None:
        pass

    def exposition(self, entries: int, size: int, pools: Sequence[PoolCounts] = ()) -> bytes:
        return b""


def outcome_of(result: RunResult) -> str:
    """A run's ``outcome`` label: cancelled, timeout, success or failure (any other end)."""
    if result.cancelled:
        return "cancelled"
    if result.timed_out:
        return "timeout"
    return "success" if result.success else "failure"


class StoreCounts:
    """Totals that only rise, made from counts a store resets at each clear.

    Each :meth:`observe` adds how far each count rose since the last one; a count
    lower than last seen was cleared meanwhile (by another process or server),
    so all of it is new. A clear made here reports the counts it reset, so none
    of their rise is lost. With ``path`` the ledger is a file shared by the
    processes of one server, each read and write made under an exclusive
    ``flock``: only at a scrape, a statistics read or a clear, never on a hit.
    """

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._state: dict[str, dict[str, int]] = _empty_ledger()

    def observe(self, stats: CacheStats, cleared: bool = False) -> None:
        with self._ledger() as state:
            for name in _STORE_FIELDS:
                now, seen = getattr(stats, name), state["seen"][name]
                state["total"][name] += now - seen if now >= seen else now
                state["seen"][name] = 0 if cleared else now

    def totals(self) -> dict[str, int]:
        with self._ledger() as state:
            return dict(state["total"])

    @contextlib.contextmanager
    def _ledger(self) -> Iterator[dict[str, dict[str, int]]]:
        with self._lock:
            if self._path is None:
                yield self._state
                return
            with open(self._path, "a+", encoding="utf-8") as file:
                fcntl.flock(file, fcntl.LOCK_EX)
                file.seek(0)
                text = file.read()
                state = json.loads(text) if text else _empty_ledger()
                before = json.dumps(state)
                yield state
                if json.dumps(state) != before:
                    file.seek(0)
                    file.truncate()
                    file.write(json.dumps(state))
                    file.flush()


def _empty_ledger() -> dict[str, dict[str, int]]:
    return {"seen": dict.fromkeys(_STORE_FIELDS, 0), "total": dict.fromkeys(_STORE_FIELDS, 0)}


_REQUESTS = "runcache_http_request_duration_seconds"
_REQUESTS_HELP = "How long HTTP requests took, by route template, method and status code."
_REQUEST_LABELS = ["route", "method", "code"]


class RouteDurations:
    """``runcache_http_request_duration_seconds{route}`` of a server with one process.

    Every request is timed, so this is the costliest call metrics make on a hit:
    prometheus_client's ``Histogram.observe`` takes a lock twice and walks the
    buckets (0.9 µs in process; 4 µs of a hit's server CPU over HTTP, against
    2 µs for this). Requests are timed on the event loop's thread alone (the HTTP
    middleware), and scraped there too, so plain lists need no lock: a bisect and
    two additions. A scrape reads them as prometheus_client's histogram reads its
    own (the same text). In multiprocess mode every figure must be in
    prometheus_client's mmapped files, so the Histogram is used there
    (:class:`_SharedRouteDurations`).
    """

    def __init__(self) -> None:
        self._bounds = REQUEST_BUCKETS
        self._le = [
            floatToGoString(bound)  # type: ignore[no-untyped-call]
            for bound in REQUEST_BUCKETS
        ] + ["+Inf"]
        #: By labels: the requests in each bucket (the last one ``+Inf``), then their sum.
        self._routes: dict[RequestLabels, list[float]] = {}

    def observe(self, labels: RequestLabels, seconds: float) -> None:
        figures = self._routes.get(labels)
        if figures is None:
            figures = self._routes[labels] = [0.0] * (len(self._bounds) + 2)
        figures[bisect_left(self._bounds, seconds)] += 1
        figures[-1] += seconds

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(_REQUESTS, _REQUESTS_HELP, labels=_REQUEST_LABELS)
        for labels, figures in self._routes.items():
            buckets = zip(self._le, itertools.accumulate(figures[:-1]), strict=True)
            family.add_metric(list(labels), list(buckets), sum_value=figures[-1])
        yield family


class _SharedRouteDurations:
    """:class:`RouteDurations` in multiprocess mode: prometheus_client's Histogram."""

    def __init__(self) -> None:
        self._histogram = Histogram(
            _REQUESTS, _REQUESTS_HELP, _REQUEST_LABELS, buckets=REQUEST_BUCKETS, registry=None
        )
        self._routes: dict[RequestLabels, Histogram] = {}

    def observe(self, labels: RequestLabels, seconds: float) -> None:
        child = self._routes.get(labels)
        if child is None:
            child = self._routes[labels] = self._histogram.labels(*labels)
        child.observe(seconds)


class _ScrapeFigures:
    """The figures made at scrape time: counters derived from the store, its size, and
    the worker pools' counts."""

    def __init__(self, store_counts: StoreCounts) -> None:
        self._store_counts = store_counts
        self.entries = 0
        self.bytes = 0
        self.pools: Sequence[PoolCounts] = ()

    def collect(self) -> Iterable[Metric]:
        totals = self._store_counts.totals()
        yield CounterMetricFamily(
            "runcache_cache_evictions",
            "Entries pushed out by the entry or byte bound.",
            value=totals["evictions"],
        )
        yield CounterMetricFamily(
            "runcache_cache_expirations",
            "Entries removed because their TTL had passed.",
            value=totals["expirations"],
        )
        yield GaugeMetricFamily(
            "runcache_cache_entries", "Entries the store holds.", value=self.entries
        )
        yield GaugeMetricFamily(
            "runcache_cache_bytes", "Bytes of results the store holds.", value=self.bytes
        )
        if self.pools:  # no pools (or none readable now): no pool series at all
            yield from _pool_gauges(self.pools)


#: The gauges of each worker pool: name, help, and the field of PoolCounts they show.
_POOL_GAUGES = (
    ("runcache_pool_workers", "Live workers of the pool (heartbeat not lapsed).", "workers"),
    ("runcache_pool_queued", "Commands queued for the pool, not yet taken.", "queued"),
    ("runcache_pool_running", "Commands the pool's workers are running.", "running"),
)


def _pool_gauges(pools: Sequence[PoolCounts]) -> Iterator[Metric]:
    """One gauge per figure, one series per pool (``{pool}``)."""
    for name, documentation, field in _POOL_GAUGES:
        family = GaugeMetricFamily(name, documentation, labels=["pool"])
        for counts in pools:
            family.add_metric([counts.pool], getattr(counts, field))
        yield family


# -- the supervisor's side of multiprocess mode -----------------------------------


@contextlib.contextmanager
def multiprocess_directory() -> Iterator[str]:
    """A fresh private directory for the workers' metrics, named in the environment
    the workers inherit, and removed (with the variable) when the server stops."""
    directory = tempfile.mkdtemp(prefix="runcache-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)


def worker_ended(pid: int, directory: str) -> None:
    """A worker is gone: its running commands no longer count (its counters still do)."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
