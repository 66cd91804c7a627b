"""MCP's Streamable HTTP transport at ``/mcp``, loaded on its first request.

The MCP SDK takes most of a second to import, longer than the rest of the
server together. A server that no agent reaches over MCP should not pay for it
at every start (nor each of ``--workers N``), so the endpoint imports the SDK,
builds the tools over the server's engine and starts the SDK's session manager
when the first ``/mcp`` request comes, off the event loop; requests for the
HTTP API are answered meanwhile.

A ``GET /mcp`` is a stream the client keeps open, so it holds one of the
server's event stream places (:mod:`runcache.streams`) while it lasts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from runcache.service import Engine
from runcache.streams import StreamSlots


class McpEndpoint:
    """The ASGI app at ``/mcp``: the SDK's transport over ``engine``, built on first use.

    :meth:`serving` must wrap the time the app serves (the app's lifespan): the
    session manager runs in its task group and stops with it.
    """

    def __init__(self, engine: Engine, streams: StreamSlots) -> None:
        self.engine = engine
        self.streams = streams
        self._transport: ASGIApp | None = None
        self._loading = anyio.Lock()
        self._tasks: anyio.abc.TaskGroup | None = None

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            try:
                yield
            finally:
                self._tasks = None
                tasks.cancel_scope.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = self._transport or await self._load()
        if scope["method"] != "GET":
            await transport(scope, receive, send)
            return
        with self.streams.hold():
            await transport(scope, receive, send)

    async def _load(self) -> ASGIApp:
        async with self._loading:
            if self._transport is None:
                if self._tasks is None:
                    raise RuntimeError("the /mcp endpoint serves only inside the app's lifespan")
                transport, sessions = await anyio.to_thread.run_sync(self._build)
                await self._tasks.start(self._run_sessions, sessions)
                self._transport = transport
        return self._transport

    def _build(self) -> tuple[ASGIApp, Any]:
        from runcache.mcp import streamable_http
        from runcache.mcp_backends import EngineBackend

        config = self.engine.config
        return streamable_http(EngineBackend(self.engine), several_workers=config.workers > 1)

    @staticmethod
    async def _run_sessions(sessions: Any,
                            task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
                            ) -> None:
        async with sessions.run():
            task_status.started()
            await anyio.sleep_forever()
