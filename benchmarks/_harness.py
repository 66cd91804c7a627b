"""What the HTTP benchmarks share: server processes on free loopback ports.

The load generator and what it measures are in ``_loadgen.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

#: Seconds a server gets to start.
START_SECONDS = 60.0


_S = TypeVar("_S", bound="Service")


class Service:
    """An HTTP server process on a loopback port, stopped on exit.

    With ``port`` unset the process must print its URL (``http://127.0.0.1:PORT``)
    as the last word of its first stdout line, after ``announce``; with
    ``port`` set, it is ready once the port accepts a connection.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int | None = None,
        announce: str = "listening on ",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        try:
            self.port = self._wait_for_url(announce) if port is None else self._wait_for(port)
        except BaseException:
            self.stop()
            raise
        self.url = f"http://{self.host}:{self.port}"
        # Whatever it prints later must not fill the pipe and stall it.
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_for_url(self, announce: str) -> int:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_SECONDS)
        line = self.process.stdout.readline() if ready else ""
        if announce not in line:
            raise SystemExit(f"{self.argv[:4]} did not start: {line!r}")
        parts = urlsplit(line.split()[-1])
        if parts.hostname != self.host or parts.port is None:
            raise SystemExit(f"server is not on {self.host}: {line!r}")
        return parts.port

    def _wait_for(self, port: int) -> int:
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                socket.create_connection((self.host, port), timeout=1).close()
                return port
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{self.argv[:4]} did not start") from None
                time.sleep(0.1)

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for _ in self.process.stdout:
            pass

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(
        self, method: str, path: str, body: object = None, timeout: float = 600
    ) -> dict[str, object]:
        """One request on a connection of its own; the answer's JSON, whatever its status."""
        connection = self.connection(timeout=timeout)
        try:
            data = None if body is None else json.dumps(body)
            connection.request(
                method, path, body=data, headers={"Content-Type": "application/json"}
            )
            payload: dict[str, object] = json.loads(connection.getresponse().read())
            return payload
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Server(Service):
    """``runcache serve`` on a free loopback port."""

    def __init__(self, args: Sequence[str] = ()) -> None:
        super().__init__(
            [
                sys.executable,
                "-m",
                "runcache",
                "serve",
                "--port",
                "0",
                "--log-level",
                "WARNING",
                *args,
            ],
            announce="runcache listening on ",
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
