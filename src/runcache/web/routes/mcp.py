"""MCP's Streamable HTTP transport at ``/mcp``, loaded on its first request.

The MCP SDK takes most of a second to import, longer than the rest of the
server together. A server that no agent reaches over MCP should not pay for it
at every start (nor each of ``--workers N``), so the endpoint imports the SDK,
builds the tools over the server's engine and starts the SDK's session manager
when the first ``/mcp`` request comes, off the event loop; requests for the
HTTP API are answered meanwhile.

A ``GET /mcp`` is a stream the client keeps open, so it holds one of the
server's event stream places (:mod:`runcache.web.streams`) while it lasts.

The endpoint bounds what the SDK would not: a body past ``--max-body-bytes``
answers 413 with the API's JSON error before the SDK reads it, and each client
address keeps at most ``--mcp-sessions-per-client`` sessions (opening one more
closes its oldest), so one client opening thousands cannot fill the SDK's
10,000 and lock every other client out with its 503s; an idle session closes
after ``--mcp-session-timeout``.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runcache.engine.engine import Engine
from runcache.errors import RuncacheError
from runcache.mcp.shapes import selected_tools
from runcache.web.responses import error_answer
from runcache.web.routes.commands import read_body
from runcache.web.streams import StreamSlots

_SESSION_HEADER = b"mcp-session-id"

#: Client addresses whose sessions are tracked at once; past it the longest-known one is
#: forgotten (its sessions still close when idle), so the tracking itself stays bounded.
_MAX_CLIENTS = 4096


class McpEndpoint:
    """The ASGI app at ``/mcp``: the SDK's transport over ``engine``, built on first use.

    :meth:`serving` must wrap the time the app serves (the app's lifespan): the
    session manager runs in its task group and stops with it.
    """

    def __init__(self, engine: Engine, streams: StreamSlots) -> None:
        self.engine = engine
        self.streams = streams
        #: Checked here, at start: a misspelt tool name stops the server before it serves.
        self.tools = selected_tools(engine.config.mcp_tools)
        self._transport: ASGIApp | None = None
        self._loading = anyio.Lock()
        self._tasks: anyio.abc.TaskGroup | None = None
        #: The sessions each client address opened, oldest first (some may have closed since).
        self._opened: dict[str, deque[tuple[str, Scope]]] = {}

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
        if scope["method"] == "GET":
            with self.streams.hold():
                await transport(scope, receive, send)
            return
        if scope["method"] == "POST":
            try:
                body = await read_body(Request(scope, receive), self.engine.config.max_body_bytes)
            except RuncacheError as error:
                await error_answer(error)(scope, receive, send)
                return
            receive = _replaying(body, receive)
        if scope["method"] != "POST" or _header(scope, _SESSION_HEADER) is not None:
            await transport(scope, receive, send)
            return
        opened: list[str] = []
        await transport(scope, receive, _noting_session(send, opened))
        for session_id in opened:
            await self._count_session(transport, scope, session_id)

    async def _count_session(self, transport: ASGIApp, scope: Scope, session_id: str) -> None:
        """Note a session ``scope``'s client opened; close its oldest past the bound.

        The session is closed as its client would close it, with a ``DELETE``
        carrying its id (and the credential that opened it, which the SDK checks);
        one that has closed already answers 404, which changes nothing.
        """
        client = scope["client"][0] if scope.get("client") else "-"
        sessions = self._opened.pop(client, None) or deque()
        self._opened[client] = sessions  # now the most recent client
        if len(self._opened) > _MAX_CLIENTS:
            del self._opened[next(iter(self._opened))]
        sessions.append((session_id, scope))
        while len(sessions) > self.engine.config.mcp_sessions_per_client:
            oldest, opener = sessions.popleft()
            await transport(_closing(opener, oldest), _empty_body, _ignore)

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
        from runcache.mcp.backends import EngineBackend
        from runcache.mcp.tools import streamable_http

        config = self.engine.config
        return streamable_http(
            EngineBackend(self.engine),
            stateless=config.workers > 1 or config.mcp_stateless,
            session_idle=config.mcp_session_timeout,
            body_limit=config.max_body_bytes,
            tools=self.tools,
        )

    @staticmethod
    async def _run_sessions(
        sessions: Any,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        async with sessions.run():
            task_status.started()
            await anyio.sleep_forever()


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """``receive`` for a body read already: the body once, then the connection's own
    messages (the disconnect the SDK waits on while it streams an answer)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _noting_session(send: Send, opened: list[str]) -> Send:
    """``send`` that notes the session id of an answer that opened one."""

    async def noting(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] < 400:
            found = next(
                (
                    value
                    for key, value in message.get("headers", ())
                    if key.lower() == _SESSION_HEADER
                ),
                None,
            )
            if found is not None:
                opened.append(found.decode("latin-1"))
        await send(message)

    return noting


def _closing(opener: Scope, session_id: str) -> Scope:
    """A ``DELETE`` of ``session_id`` as the request that opened it would send it."""
    kept = [
        (key, value)
        for key, value in opener["headers"]
        if key not in (_SESSION_HEADER, b"content-length", b"content-type")
    ]
    return {
        **opener,
        "method": "DELETE",
        "headers": [*kept, (_SESSION_HEADER, session_id.encode("latin-1"))],
    }


async def _empty_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _ignore(message: Message) -> None:
    """Where the answer to a session the server closes goes: nobody asked for it."""
