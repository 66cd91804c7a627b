"""The few errors runcache raises on purpose.

Each carries the HTTP status it maps to, so the API turns any of them into the
one JSON error shape, and the CLI into one line and an exit code, without a
table of special cases in either place.
"""

from __future__ import annotations


class RuncacheError(Exception):
    """Base of every error runcache reports to a client."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RuncacheError):
    """The request is malformed or asks for something out of bounds."""

    status = 400


class Unauthorized(RuncacheError):
    """No credentials were sent."""

    status = 401


class Forbidden(RuncacheError):
    """Credentials were sent but do not grant this operation."""

    status = 403


class Busy(RuncacheError):
    """Every execution slot stayed taken for longer than a request may wait."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(RuncacheError):
    """A setting has a value runcache cannot start with."""

    status = 500


class StoreError(RuncacheError):
    """The cache store failed; the caller carries on without the cache."""

    status = 503
