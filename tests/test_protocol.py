"""runcache's HTTP protocol (``web/protocol.py``) against the uvicorn it subclasses.

The deadlines themselves are tested on live servers (tests/test_server_limits.py,
tests/test_streams.py); these tests say when uvicorn has moved past the releases
the subclass was checked against, before a changed internal breaks it quietly.
"""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from runcache.web.protocol import CHECKED_UVICORN, GuardedHttpProtocol

#: What to do when uvicorn is outside the checked releases.
RECHECK = (
    "re-check runcache/web/protocol.py against this uvicorn: that HttpToolsProtocol still "
    "has the methods GuardedHttpProtocol overrides, with the same signatures, called as the "
    "subclass expects (data_received feeding the parser, on_headers_complete once the head "
    "is in, pause_writing/resume_writing, send_400_response), and whether uvicorn now has "
    "public settings for header and body deadlines and a header size bound with httptools "
    "(then use them and drop the subclass); run tests/test_server_limits.py and "
    "tests/test_streams.py; then widen CHECKED_UVICORN and pyproject.toml's uvicorn bound"
)


def test_the_installed_uvicorn_is_one_the_protocol_was_checked_against() -> None:
    installed = Version(version("uvicorn"))
    first, last = map(Version, CHECKED_UVICORN)
    assert first <= installed <= last, (
        f"uvicorn {installed} is outside the releases {first} to {last} that "
        f"GuardedHttpProtocol was checked against: {RECHECK}"
    )


def test_pyproject_bounds_uvicorn_to_the_checked_releases() -> None:
    """A fresh install cannot pick a uvicorn past the last checked release."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (uvicorn,) = (
        Requirement(line)
        for line in pyproject["project"]["dependencies"]
        if Requirement(line).name == "uvicorn"
    )
    first, last = map(Version, CHECKED_UVICORN)
    allowed = [Version(f"0.{minor}.0") for minor in range(20, 80)]
    admitted = [release for release in allowed if uvicorn.specifier.contains(release)]
    assert admitted, uvicorn
    assert admitted[0] >= Version(f"{first.major}.{first.minor}.0"), uvicorn
    assert admitted[-1] <= last, f"pyproject admits uvicorn {admitted[-1]}: {uvicorn}"


def test_every_method_overridden_is_one_uvicorn_has_with_the_same_signature() -> None:
    overridden = [
        name
        for name, member in vars(GuardedHttpProtocol).items()
        if callable(member) and not name.startswith("_") and name != "configured"
    ]
    assert "data_received" in overridden and "on_headers_complete" in overridden
    for name in overridden:
        theirs = getattr(HttpToolsProtocol, name, None)
        assert theirs is not None, f"uvicorn's HttpToolsProtocol has no {name}: {RECHECK}"
        ours = inspect.signature(getattr(GuardedHttpProtocol, name))
        assert list(ours.parameters) == list(inspect.signature(theirs).parameters), (
            f"HttpToolsProtocol.{name} takes other arguments now: {RECHECK}"
        )
