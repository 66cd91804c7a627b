"""The dashboard at ``GET /``: one page, shipped in the package, that reads the API.

The page holds no data of its own: its script calls the same ``/api/*`` routes
any client calls, with the token the user types in (kept in the page's memory
only), so it shows nothing a token would not. The route is open, like
``/health``. Its Content-Security-Policy allows only the page's own inline
script and style (by their hashes, computed once here) and requests to this
server: a command's text shown on the page can never run as script.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from runcache.web.operations import Answer, Operation

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@cache
def _page() -> tuple[bytes, str]:
    """The page, and the policy that lets exactly its inline script and style run."""
    html = resources.files("runcache.web").joinpath("static/dashboard.html").read_text("utf-8")
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {' '.join(hashes['script'])}",
            f"style-src {' '.join(hashes['style'])}",
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html.encode(), policy


async def dashboard(request: Request) -> Response:
    body, policy = _page()
    return Response(
        body,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


OPERATIONS = (
    Operation(
        method="GET",
        path="/",
        endpoint=dashboard,
        operation_id="dashboard",
        summary="The dashboard: one HTML page that reads this API with the token "
        "typed into it; open without a token, as it holds no data.",
        ok=Answer("The page.", media="text/html"),
        open=True,
    ),
)
