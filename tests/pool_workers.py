"""Worker pools for the tests that need them: ``runcache worker`` processes, and a
module's deployment of one ``runcache serve`` and workers of two pools on the session's
real redis-server (``alpha``: two workers of concurrency 1; ``beta``: one).

Shared by tests/test_pools.py (what pools do) and tests/test_pool_views.py (how they
are watched); each module gets a deployment of its own, in a namespace of its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import pytest

from conftest import LiveServer, RedisServer, served, serving_several_tests, start_server

#: Short timeouts, so a dead worker's job is found within a few seconds.
TIMEOUTS = ("--claim-timeout", "3", "--instance-timeout", "3")


@dataclass
class Worker:
    """A ``runcache worker`` process and its name (what its commands see)."""

    process: subprocess.Popen[str]
    name: str
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait(5)
        if self.reader is not None:
            self.reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


def start_worker(store: str, pool: str, *args: str) -> Worker:
    """Start ``runcache worker`` in ``pool`` and wait until it is in it."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "runcache", "worker", "--pool", pool, "--store", store, *TIMEOUTS]
        + list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
    )
    assert process.stdout is not None
    lines: list[str] = []
    giving_up = threading.Timer(30, process.kill)
    giving_up.start()
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("runcache worker ") and " serving pool " in line:
                worker = Worker(process, line.split()[2], lines)
                worker.reader = threading.Thread(target=_drain, args=(worker,), daemon=True)
                worker.reader.start()
                return worker
    finally:
        giving_up.cancel()
    process.wait(10)
    process.stdout.close()
    raise AssertionError("runcache worker exited before joining its pool:\n" + "".join(lines))


def _drain(worker: Worker) -> None:
    assert worker.process.stdout is not None
    for line in worker.process.stdout:
        worker.output.append(line)


@dataclass
class Deployment:
    store: str
    server: LiveServer
    alpha: list[Worker]
    beta: Worker
    watchdogs: list[int] = field(default_factory=list)

    @property
    def everyone(self) -> list[Worker]:
        return [*self.alpha, self.beta]


@pytest.fixture(scope="module", name="deployment")
def deployment_fixture(redis_server: RedisServer) -> Iterator[Deployment]:
    """The module's deployment (a test module imports this function to use it: the
    fixture is ``deployment``)."""
    store = f"{redis_server.url}?namespace=pools-{uuid.uuid4().hex}"
    alpha = [start_worker(store, "alpha", "--concurrency", "1") for _ in range(2)]
    beta = start_worker(store, "beta")
    server = start_server("--store", store, *TIMEOUTS)
    pids = [server.process.pid, beta.process.pid, *(w.process.pid for w in alpha)]
    serving_several_tests(*pids)
    found = Deployment(store, server, alpha, beta)
    yield found
    server.stop()
    for worker in [*alpha, beta]:
        worker.stop()
    served(*pids, *found.watchdogs)


@pytest.fixture(autouse=True)
def deployment_watchdogs(request: pytest.FixtureRequest) -> Iterator[None]:
    """The module's workers and server start their run watchdog (kept, like themselves,
    for the module's tests) with their first command: exempted as they are. Nothing
    for a test without the deployment (it is not started for one)."""
    yield
    if "deployment" not in request.fixturenames:
        return
    deployment: Deployment = request.getfixturevalue("deployment")
    for pid in [deployment.server.process.pid, *(w.process.pid for w in deployment.everyone)]:
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):  # a process gone meanwhile fails its own test
            children = psutil.Process(pid).children()
        for child in children:
            # A watchdog the leftover check killed is a zombie until its runner starts
            # another: it is no one's to keep.
            with contextlib.suppress(psutil.Error):
                if "runcache.run.containment" in " ".join(child.cmdline()):
                    serving_several_tests(child.pid)
                    deployment.watchdogs.append(child.pid)
