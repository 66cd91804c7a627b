"""Fixtures shared by every test: a fake clock, the app, real servers, and a leak check."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil
import pytest
import requests
from starlette.applications import Starlette
from starlette.testclient import TestClient

from runcache.client import sse
from runcache.config import Config
from runcache.engine.cache import Cache
from runcache.engine.engine import Engine
from runcache.run.runner import Runner
from runcache.stores import MemoryStore, Store, open_store
from runcache.stores.sqlite import SqliteStore
from runcache.web.app import create_app

#: Child processes that outlive a single test on purpose (session servers).
_LONG_LIVED: set[int] = set()
#: Long-lived processes whose descendants are theirs to end (a browser and its renderers).
_LONG_LIVED_TREES: set[int] = set()


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def config() -> Config:
    """Defaults, untouched by the environment of whoever runs the tests."""
    return Config.load(environ={})


@pytest.fixture
def engine(config: Config, fake_clock: FakeClock) -> Iterator[Engine]:
    """An engine on the default config whose cache runs on ``fake_clock``."""
    store = MemoryStore(config.max_entries, config.max_bytes, clock=fake_clock)
    built = Engine(config, Cache(store), Runner(config.max_output_bytes))
    yield built
    built.close()


@pytest.fixture
def app(engine: Engine) -> Starlette:
    return create_app(engine=engine)


@pytest.fixture
def client(app: Starlette) -> Iterator[TestClient]:
    """Starlette's test client on one event loop for the whole test (so the engine's
    futures and slots live on one loop, as in the server)."""
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def client_factory() -> Iterator[Callable[..., TestClient]]:
    """In-process clients of apps with non-default settings (``token=...``, ``allow=...``).

    Settings come from the keyword arguments over the defaults, never from the
    environment of whoever runs the tests; every client and engine made is
    closed after the test.
    """
    engines: list[Engine] = []
    clients: list[TestClient] = []

    def make(**settings: object) -> TestClient:
        built = Engine.from_config(Config.load(settings, environ={}))
        engines.append(built)
        test_client = TestClient(create_app(engine=built), raise_server_exceptions=False)
        clients.append(test_client.__enter__())
        return test_client

    yield make
    for test_client in clients:
        test_client.__exit__(None, None, None)
    for built in engines:
        built.close()


StoreFactory = Callable[..., Store]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where an SQLite store's file goes."""
    return tmp_path / "cache.db"


@pytest.fixture
def opened() -> Iterator[list[SqliteStore]]:
    """SQLite stores a test opens, closed after it."""
    stores: list[SqliteStore] = []
    yield stores
    for store in stores:
        store.close()


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
def store_factory(
    request: pytest.FixtureRequest, fake_clock: FakeClock, tmp_path: Path
) -> Iterator[StoreFactory]:
    """Make stores of one kind, all on the fake clock; each kind is one parameter.

    Every test that takes this fixture runs once per store, so a store that
    breaks the cache's rules fails the same test as the others pass. Each store
    made gets a namespace of its own, so two stores of one test are as separate
    as two memory stores, and tests never see each other's entries in Redis.
    """
    made: list[Store] = []

    def make(max_entries: int = 1000, max_bytes: int = 1 << 20, retain: float = 0.0) -> Store:
        namespace = f"test-{uuid.uuid4().hex}"
        if request.param == "memory":
            store: Store = MemoryStore(max_entries, max_bytes, clock=fake_clock, retain=retain)
        elif request.param == "sqlite":
            url = f"sqlite://{tmp_path / 'cache.db'}?namespace={namespace}"
            store = open_store(url, max_entries, max_bytes, clock=fake_clock, retain=retain)
        elif request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            url = f"{server.url}?namespace={namespace}"
            store = open_store(url, max_entries, max_bytes, clock=fake_clock, retain=retain)
        elif request.param == "redis-cluster":
            cluster: RedisCluster = request.getfixturevalue("redis_cluster")
            url = f"{cluster.url}?namespace={namespace}"
            store = open_store(url, max_entries, max_bytes, clock=fake_clock, retain=retain)
        else:
            raise AssertionError(f"unknown store kind {request.param}")
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


#: prctl(2) option: orphaned descendants are reparented to this process, not to PID 1.
PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Make the test run the subreaper of everything its tests start, so a process that
    escapes its run (a new session, a double fork) and is orphaned stays a descendant
    of the test run, where the leftover check below sees it, instead of PID 1's."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


_become_subreaper()


#: Every process the test run starts (its servers, their commands, what those start)
#: inherits this variable, with a value no other test run on the machine has. The
#: kernel keeps a process's starting environment in /proc/PID/environ wherever the
#: process is reparented, so the leftover check finds an orphan that escaped to PID 1
#: (or anywhere else) too, and never another run's or another user's processes. Not
#: named RUNCACHE_*: servers are started without the runner's RUNCACHE_ settings.
RUN_MARK = "PYTEST_RUNCACHE_RUN"
os.environ[RUN_MARK] = f"{os.getpid()}-{uuid.uuid4().hex}"
_MARK_ENTRY = f"{RUN_MARK}={os.environ[RUN_MARK]}".encode()


@pytest.fixture(autouse=True)
def _no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a process it started behind, wherever it was reparented.

    Two nets, each catching what the other may miss: the test run's descendants
    (the run is their subreaper, so orphans stay among them, even those started with
    a cleared environment), and every process on the machine started during the test
    that carries this run's mark (whatever adopted it).
    """
    before = set(psutil.pids())
    yield
    deadline = time.monotonic() + 5
    while True:
        left = _leftovers(before)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if left:
        described = [f"{process.pid} {' '.join(_cmdline(process))}" for process in left]
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        pytest.fail(f"{request.node.nodeid} left processes running: {described}")


def _leftovers(before: set[int]) -> list[psutil.Process]:
    """The processes this test run started and left running, but for the long-lived ones
    (and what the long-lived trees, a module's browser, have under them)."""
    own = os.getpid()
    found = {child.pid: child for child in psutil.Process().children(recursive=True)}
    for root in list(_LONG_LIVED_TREES):
        with contextlib.suppress(psutil.NoSuchProcess):
            for kept in psutil.Process(root).children(recursive=True):
                found.pop(kept.pid, None)
    for pid in set(psutil.pids()) - before - found.keys() - {own}:
        if _marked(pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                found[pid] = psutil.Process(pid)
    return [
        process
        for pid, process in sorted(found.items())
        if pid not in _LONG_LIVED and alive(process)
    ]


def serving_several_tests(*pids: int) -> None:
    """Exempt processes a fixture keeps for several tests (a module's servers) from the
    leftover check; the fixture stops them, and calls :func:`served` after."""
    _LONG_LIVED.update(pids)


def served(*pids: int) -> None:
    """The processes of :func:`serving_several_tests` stopped: checked again as any."""
    _LONG_LIVED.difference_update(pids)
    _LONG_LIVED_TREES.difference_update(pids)


def serving_several_tests_with_children(pid: int) -> None:
    """As :func:`serving_several_tests`, for a process whose children come and go while
    it serves (a browser's renderers): they are its own to end, when it ends."""
    _LONG_LIVED.add(pid)
    _LONG_LIVED_TREES.add(pid)


def _marked(pid: int) -> bool:
    """Whether the process started with this test run's mark in its environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return _MARK_ENTRY in environ.read().split(b"\0")
    except OSError:  # gone, or another user's
        return False


T = TypeVar("T")


def until(probe: Callable[[], T | None], seconds: float = 15.0, what: str = "") -> T:
    """The first true value ``probe`` gives, asked every 20 ms: a test waits on the
    condition itself, never a fixed sleep, and fails (not hangs) after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out waiting {what}".rstrip()
        time.sleep(0.02)
    return value


#: A JSON object as a test reads it: the values are whatever the answer holds.
Json = dict[str, Any]


class _JsonAnswer(Protocol):
    """An HTTP answer of any client the tests use (requests, httpx, Starlette's)."""

    def json(self) -> Any: ...


def json_object(answer: _JsonAnswer) -> Json:
    """The JSON object an answer's body holds, typed as one: ``.json()`` is ``Any``,
    and a test indexing it should not pass ``Any`` on to everything it touches."""
    body = answer.json()
    assert isinstance(body, dict), body
    return body


def alive(process: psutil.Process) -> bool:
    """Whether a process still runs (a zombie waiting to be reaped does not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_MARKS = itertools.count(1)


def marker() -> str:
    """A ``sleep`` argument no other process has: a test finds its process by it, since
    a pid printed inside a PID namespace (``$!``) is not the machine's pid."""
    return f"{300 + next(_MARKS)}.{os.getpid()}"


def held(process: psutil.Process) -> bool:
    """Whether ``process`` is stopped, or cannot go on: a shell paused between its vfork
    and the child's exec waits in the kernel (D) on a child that is itself stopped."""
    try:
        status = process.status()
    except psutil.NoSuchProcess:
        return False
    if status == psutil.STATUS_STOPPED:
        return True
    children = process.children()
    return (
        status == psutil.STATUS_DISK_SLEEP
        and bool(children)
        and all(child.status() == psutil.STATUS_STOPPED for child in children)
    )


def marked(mark: str) -> list[psutil.Process]:
    """The live processes whose command line holds ``mark``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(mark in arg for arg in process.info["cmdline"] or ()) and alive(process):
            found.append(process)
    return found


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return ["?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- a real redis-server ---------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server process on a free loopback port, which tests may stop and restart."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    #: Set, clients must send it (redis-server --requirepass).
    password: str | None = None
    #: A node of a Redis Cluster (its configuration in ``nodes-PORT.conf`` in ``directory``).
    cluster: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not installed; the README's test command installs it")
        self.process = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *(["--requirepass", self.password] if self.password else []),
                *(
                    ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf"]
                    if self.cluster
                    else []
                ),
            ],
            stdout=subprocess.DEVNULL,
        )
        _LONG_LIVED.add(self.process.pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up, maybe locked
                        return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            _LONG_LIVED.discard(self.process.pid)
            self.process = None

    def flush(self) -> None:
        import redis

        with redis.Redis(port=self.port) as connection:
            connection.flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@dataclass
class RedisCluster:
    """A Redis Cluster of three masters (no replicas), each a redis-server on a free
    loopback port, the slots spread over them by ``redis-cli --cluster create``."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        """The store URL of the cluster; it names one node, the client finds the others."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed; the README's test command installs it")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        until(self._ready, 30, "the cluster to say cluster_state:ok on every node")

    def _ready(self) -> bool:
        import redis

        for node in self.nodes:
            with redis.Redis(port=node.port) as connection:
                if connection.cluster("INFO").get("cluster_state") != "ok":
                    return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    pytest.fail("no free port with a free cluster bus port")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A real three-master Redis Cluster, for the session."""
    directory = tmp_path_factory.mktemp("redis-cluster")
    nodes = [RedisServer(_cluster_port(), directory, cluster=True) for _ in range(3)]
    cluster = RedisCluster(nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# -- a real runcache server --------------------------------------------------------


@dataclass
class LiveServer:
    """A ``runcache serve`` process, started on port 0 and found by its listening line."""

    process: subprocess.Popen[str]
    url: str
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def connections(self) -> int:
        """Established TCP connections the server process holds (accepted, not queued)."""
        held = psutil.Process(self.process.pid).net_connections(kind="tcp")
        return sum(
            1 for c in held if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port
        )

    def logged(self, wanted: Callable[[str], bool], seconds: float = 15.0) -> str:
        """The first line of the server's log that ``wanted`` accepts, waiting for it: a
        line may be written after the answer it reports, and is copied here by a thread."""
        return until(
            lambda: next((line for line in self.output if wanted(line)), None),
            seconds,
            "a log line",
        )

    def assert_quiet_log(self) -> None:
        """Clients' misbehaviour is theirs: no traceback, no 'unexpected error' in the log."""
        log = "".join(self.output)
        assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


#: Seconds a server has to print its listening line.
STARTUP_SECONDS = 30


def start_server(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: int | None = None,
    python: Sequence[str] = (),
) -> LiveServer:
    """Start ``runcache serve`` with the given flags (and ``stdin``, a file descriptor,
    when given; with ``python``, e.g. a setpriv to another user and an interpreter, instead
    of this one) and wait until it listens."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    environment.update(env or {})
    process = subprocess.Popen(
        [*(python or [sys.executable]), "-m", "runcache", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=stdin,
        text=True,
        env=environment,
    )
    assert process.stdout is not None
    lines: list[str] = []
    # A server that neither listens nor exits is killed, so the loop below ends.
    giving_up = threading.Timer(STARTUP_SECONDS, process.kill)
    giving_up.start()
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("runcache listening on "):
                server = LiveServer(process, line.split()[-1], lines)
                _drain_in_background(server)
                return server
    finally:
        giving_up.cancel()
    process.wait(10)
    process.stdout.close()
    raise AssertionError(
        f"runcache serve exited (or was killed after {STARTUP_SECONDS} s) "
        "before listening:\n" + "".join(lines)
    )


def _drain_in_background(server: LiveServer) -> None:
    # Keep reading the server's log so it never blocks on a full pipe.
    def drain() -> None:
        assert server.process.stdout is not None
        for line in server.process.stdout:
            server.output.append(line)

    server.reader = threading.Thread(target=drain, daemon=True)
    server.reader.start()


@pytest.fixture
def live_server_factory() -> Iterator[Callable[..., LiveServer]]:
    """Start real servers; every one still running is stopped after the test."""
    started: list[LiveServer] = []

    def start(
        *args: str, env: dict[str, str] | None = None, python: Sequence[str] = ()
    ) -> LiveServer:
        server = start_server(*args, env=env, python=python)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def live_server(live_server_factory: Callable[..., LiveServer]) -> LiveServer:
    server: LiveServer = live_server_factory()
    return server


def job_events(
    base_url: str,
    job_id: str,
    headers: dict[str, str] | None = None,
    on_event: Callable[[], None] | None = None,
) -> list[tuple[str, str, str]]:
    """A job's events read to their end, parsed by runcache's own SSE reader
    (:func:`runcache.client.sse.parse`): (kind, id, data) each; ``on_event`` is called
    after each."""
    found: list[tuple[str, str, str]] = []
    with requests.get(
        f"{base_url}/api/jobs/{job_id}/events", headers=headers or {}, stream=True, timeout=30
    ) as answer:
        assert answer.status_code == 200, answer.text
        for event in sse.parse(answer.iter_lines()):
            found.append((event.kind, event.id or "", event.data))
            if on_event is not None:
                on_event()
    return found


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A namespace of its own on the shared redis-server."""
    return f"{redis_server.url}?namespace=test-{uuid.uuid4().hex}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'shared.db'}"


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request: pytest.FixtureRequest) -> str:
    """A store several servers share: a SQLite file, or a namespace on Redis."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url
