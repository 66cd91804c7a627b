"""Toy servers for the benchmarks to compare with: a bare hit route, and a fixed answer.

Run:  python3 benchmarks/_toy_routes.py flask|starlette|raw

The two routes, ``POST /api/command``, decode the JSON body, look its command
up in a dict and return the JSON bytes stored there (the answer runcache gives for a
cached ``echo runcache-benchmark``), or a 404 for any other command.

- ``flask``: Flask on werkzeug's threaded server (``app.run(threaded=True)``),
  the stack of the API runcache stands in for; ``benchmarks/http_hits.py``
  compares runcache's hits with it.
- ``starlette``: the same route on Starlette and uvicorn (httptools, uvloop),
  what an ASGI stack can do with no work at all; ``benchmarks/harness_check.py``
  uses it to check that the load generator is not what it measures.
- ``raw``: no framework, no route: an asyncio protocol on uvloop that writes
  the same answer to every request; ``harness_check.py`` uses it to find how
  fast the load generator itself can go.

It listens on a free loopback port and prints ``listening on
http://127.0.0.1:PORT`` as its first line, then serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from typing import cast

COMMAND = "echo runcache-benchmark"

#: runcache's answer to a cached ``echo runcache-benchmark``, byte for byte but the times.
ANSWER = json.dumps(
    {
        "return_code": 0,
        "success": True,
        "timed_out": False,
        "partial_results": False,
        "stdout_truncated": False,
        "stderr_truncated": False,
        "execution_time": 0.00183,
        "timestamp": "2026-11-28T12:39:39.756116+00:00",
        "cache_key": "cf71151c6acaa7e87a591f7e46a0339f3a6d46bb53a488912c5b882696de22af",
        "stdout": "runcache-benchmark\n",
        "stderr": "",
        "cached": True,
        "coalesced": False,
    },
    separators=(",", ":"),
).encode()

RESULTS = {COMMAND: ANSWER}
NOT_FOUND = b'{"error":"not cached"}'


def serve_flask() -> None:
    from flask import Flask, Response, request
    from werkzeug.serving import make_server

    app = Flask(__name__)
    # No line per request: runcache's access log is off too.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    @app.post("/api/command")
    def command() -> Response:
        payload = json.loads(request.get_data())
        found = RESULTS.get(payload.get("command"))
        if found is None:
            return Response(NOT_FOUND, status=404, mimetype="application/json")
        return Response(found, mimetype="application/json")

    # threaded=True is what app.run(threaded=True) passes; it also turns on
    # HTTP/1.1 keep-alive in werkzeug's request handler.
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


def serve_starlette() -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def command(request: Request) -> Response:
        payload = json.loads(await request.body())
        found = RESULTS.get(payload.get("command"))
        if found is None:
            return Response(NOT_FOUND, status_code=404, media_type="application/json")
        return Response(found, media_type="application/json")

    app = Starlette(routes=[Route("/api/command", command, methods=["POST"])])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        server_header=False,
        date_header=False,
    )
    uvicorn.Server(config).run(sockets=[listener])


class _FixedAnswer(asyncio.Protocol):
    """Answers every request with ``ANSWER``, reading no more of it than its length."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = bytearray()
        self.answer = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(ANSWER)
        ) + ANSWER

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            length = 0 if at < 0 else int(head[at + 17 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            self.transport.write(self.answer)


def serve_raw() -> None:
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_FixedAnswer, "127.0.0.1", 0)
        print(f"listening on http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    uvloop.run(main())


SERVERS = {"flask": serve_flask, "starlette": serve_starlette, "raw": serve_raw}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SERVERS:
        raise SystemExit("usage: python3 benchmarks/_toy_routes.py flask|starlette|raw")
    SERVERS[sys.argv[1]]()
