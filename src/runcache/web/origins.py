"""The browser guard: no page of another origin may use the server, on any route.

A browser runs whatever script a page it opens carries, and that script can send
requests to ``http://127.0.0.1:8888``: a ``fetch`` with ``mode: "no-cors"`` and a
``text/plain`` body, or an auto-submitted ``<form enctype="text/plain">``, needs no
CORS preflight, and runcache reads any body as JSON, so without this guard the page
of any site the user opens could run commands, clear the cache or cancel jobs on a
server without a token (its answers it cannot read, but the harm is done). DNS
rebinding goes further: a name the attacker controls, re-pointed at 127.0.0.1, makes
the server the page's own origin, answers readable.

So every HTTP request (``/api/*``, ``/mcp``, ``/metrics``, ``/``, ``/health``, the
event streams: all of them, whatever ``--host`` and whether tokens are set or not)
passes three checks on the headers browsers send and cannot be made to forge:

1. ``Host`` must name this server: ``127.0.0.1``, ``localhost``, ``[::1]``, the
   ``--host`` it listens on, the address the connection arrived at, or a name of
   ``--allowed-hosts`` (a reverse proxy's, say). A rebinding page's requests carry
   the attacker's name, and fail here. The port is not compared (a name of
   ``--allowed-hosts`` given with a port is): a page's Host always carries the port
   its browser connected to, so only the name tells a foreign page from ours, and a
   forwarded port (``ssh -L 9000:127.0.0.1:8888``, a container's published port)
   keeps working.
2. ``Origin``, when sent, must be this server's own (its host and port equal to the
   ``Host`` header: the dashboard's requests) or one of ``--allowed-origins`` (a
   separate web UI, a proxy that rewrites ``Host``). Browsers send it with every
   POST and every cross-origin ``fetch``; ``null`` (a sandboxed frame, a ``data:``
   page) is never ours.
3. ``Sec-Fetch-Site``, when sent, must not be ``cross-site`` nor ``same-site`` (a
   page on another port of the same machine is ``same-site``): that catches the
   requests that carry no ``Origin``, such as a cross-site ``<img>`` or ``<script>``
   GET. ``same-origin`` and ``none`` (an address typed into the browser) pass. One
   request of another site passes, unless an operator-named origin sent it: a
   top-level navigation to the dashboard page ``/`` (a link followed): the page is
   static, holds no data, may not be framed, and the linking page cannot read it;
   what the page then asks of the API is ``same-origin``.

curl, scripts, the reference's clients and MCP clients send no ``Origin`` and no
``Sec-Fetch-*``, so they pass as before. A refusal is a 403 ``{"error": "..."}``
naming the header and the setting that would admit it, logged once as a WARNING
(with the header's text quoted, as the token gate quotes paths); nothing behind the
guard sees the request, so it changes nothing.

Why not also refuse bodies that are not ``Content-Type: application/json``? It
would stop the simple requests above too, but ``curl -d`` sends
``application/x-www-form-urlencoded``, and scripts written for this API (and the
reference's) send JSON under whatever type their tool picks: refusing them would
break working clients to stop what the headers above already stop.

Plain ASGI in front of the routes, like :class:`~runcache.web.auth.TokenGate`: no
routing and no request object, so checking costs a few header lookups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from runcache.errors import Forbidden
from runcache.web.responses import error_answer

log = logging.getLogger(__name__)

#: Names every server answers to, whatever it listens on.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")

#: ``Sec-Fetch-Site`` values that say a page of another origin sent the request.
_FOREIGN_SITES = (b"cross-site", b"same-site")

#: Methods of a navigation that only shows a page.
_SAFE = ("GET", "HEAD")


class OriginGuard:
    """Refuses requests with a foreign ``Host``, a foreign ``Origin`` or a foreign
    ``Sec-Fetch-Site`` (see the module's docstring for the rules and why).

    ``host`` is the address the server listens on; ``allowed_hosts`` are further
    names (``name`` admits any port, ``name:port`` only that one) and
    ``allowed_origins`` further origins (``https://ui.example``), as written in
    ``--allowed-hosts`` and ``--allowed-origins``.
    """

    def __init__(
        self, app: ASGIApp, host: str, allowed_hosts: Iterable[str], allowed_origins: Iterable[str]
    ) -> None:
        self.app = app
        names = {*LOOPBACK_NAMES, _bare(host)}
        exact: set[str] = set()
        for entry in allowed_hosts:
            name, port = _split_host(entry.lower())
            if port:
                exact.add(f"{name}:{port}")
            else:
                names.add(name)
        self._names = frozenset(name.lower() for name in names)
        self._exact = frozenset(exact)
        self._origins = frozenset(origin.lower().rstrip("/") for origin in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_answer(Forbidden(refusal))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> str | None:
        """Why the request is refused, or None to let it in."""
        headers = _headers(scope)
        host = headers.get(b"host")
        if host is not None and not self._admits_host(host.decode("latin-1"), scope):
            _refuse(scope, f"Host {host.decode('latin-1')!r} is not one of its names")
            return (
                f"request refused: Host {host.decode('latin-1')} is not a name of this "
                "server (--allowed-hosts)"
            )
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1")
            if text.lower().rstrip("/") in self._origins:
                return None  # named by the operator: admitted from another site too
            if not _same_origin(text, host):
                _refuse(scope, f"Origin {text!r} is not its own")
                return (
                    f"cross-origin request refused: Origin {text} is not allowed "
                    "(--allowed-origins)"
                )
        site = headers.get(b"sec-fetch-site")
        if site in _FOREIGN_SITES and not _opens_dashboard(scope, headers):
            _refuse(scope, f"Sec-Fetch-Site {site.decode('latin-1')!r}")
            return (
                f"cross-site request refused: a page of another site sent it "
                f"(Sec-Fetch-Site: {site.decode('latin-1')}); admit the page's origin "
                "with --allowed-origins"
            )
        return None

    def _admits_host(self, host: str, scope: Scope) -> bool:
        name, port = _split_host(host.lower())
        if name in self._names or f"{name}:{port}" in self._exact:
            return True
        server = scope.get("server")  # the address the connection arrived at
        return server is not None and name == _bare(str(server[0])).lower()


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The first value of each header the guard reads."""
    wanted = (b"host", b"origin", b"sec-fetch-site", b"sec-fetch-mode", b"sec-fetch-dest")
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in wanted and name not in found:
            found[name] = value
    return found


def _split_host(host: str) -> tuple[str, str]:
    """A Host header's name (an IPv6 literal without its brackets) and port ('' if none)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    name, _, port = host.partition(":") if host.count(":") == 1 else (host, "", "")
    return name, port


def _bare(address: str) -> str:
    return address[1:-1] if address.startswith("[") and address.endswith("]") else address


def _same_origin(origin: str, host: bytes | None) -> bool:
    """Whether ``origin`` is the server's own: the host and port it names are those of
    the Host header. The scheme is not compared: no other server can answer on the
    same host and port, and a TLS proxy that keeps Host then needs no setting."""
    scheme, separator, authority = origin.partition("://")
    return (
        host is not None
        and bool(separator)
        and scheme.lower() in ("http", "https")
        and authority.lower() == host.decode("latin-1").lower()
    )


def _opens_dashboard(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    """A top-level navigation to the dashboard page (a link followed from another site)."""
    return (
        scope["path"] == "/"
        and scope["method"] in _SAFE
        and headers.get(b"sec-fetch-mode") == b"navigate"
        and headers.get(b"sec-fetch-dest") == b"document"
    )


def _refuse(scope: Scope, reason: str) -> None:
    """Log a refusal once. What the requester sent is quoted: a newline or an escape
    sequence in it cannot forge a line or repaint a terminal."""
    client = scope.get("client")
    log.warning(
        "%s refused %s %r: a browser page of another origin (%s)",
        client[0] if client else "-",
        scope["method"],
        scope["path"],
        reason,
    )
