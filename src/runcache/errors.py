"""The errors runcache reports, each carrying its HTTP status and headers.

Each error knows the status it maps to and the headers that go with it
(``Retry-After`` on a 503, ``WWW-Authenticate`` on a 401, ``Allow`` on a 405),
as Starlette's ``HTTPException`` carries ``headers``: the API turns any of them
into the one JSON error shape, and the CLI into one line and an exit code,
without asking which class it holds.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec


class RuncacheError(Exception):
    """Base of every error runcache reports to a client."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> Mapping[str, str]:
        """Headers the error's HTTP answer carries besides its JSON body."""
        return {}

    def answer(self) -> msgspec.Struct | None:
        """The answer's body when it is not the one error shape ``{"error": message}``;
        only the routes kept from the reference API answer otherwise."""
        return None


class BadRequest(RuncacheError):
    """The request is malformed or asks for something out of bounds."""

    status = 400


class Unauthorized(RuncacheError):
    """No credentials were sent."""

    status = 401

    @property
    def headers(self) -> Mapping[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="runcache"'}


class Forbidden(RuncacheError):
    """Credentials were sent but do not grant this operation."""

    status = 403


class NotFound(RuncacheError):
    """No endpoint at the path asked for."""

    status = 404


class Gone(RuncacheError):
    """What was asked for existed but is no longer kept (a finished job's output, say)."""

    status = 410


class MethodNotAllowed(RuncacheError):
    """The path exists but does not take this method; ``allowed`` lists those it takes."""

    status = 405

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed

    @property
    def headers(self) -> Mapping[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class TooLarge(RuncacheError):
    """The request body is larger than the server accepts."""

    status = 413

    @property
    def headers(self) -> Mapping[str, str]:
        # The rest of the body is never read: the connection cannot carry
        # another request, so it is closed rather than drained.
        return {"Connection": "close"}


class Busy(RuncacheError):
    """Every execution slot stayed taken for longer than a request may wait."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> Mapping[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ConfigError(RuncacheError):
    """A setting has a value runcache cannot start with."""

    status = 500


class StoreError(RuncacheError):
    """The cache store failed; the caller carries on without the cache."""

    status = 503


class ServerUnreachable(RuncacheError):
    """No runcache server answered at the URL a client tried."""

    status = 503


class ServerError(RuncacheError):
    """A server answered a client with an error; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(RuncacheError):
    """The client went away before its answer (its connection closed): nobody reads
    this error, which ends the request and is audited as the client's leaving."""

    status = 499


class Conflict(RuncacheError):
    """The request cannot be carried out in the state its target is in now
    (pausing a job that has ended, resuming one that is not paused)."""

    status = 409
