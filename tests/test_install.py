"""The install stays what was tested: the README's commands, CI's, and the lock agree.

A fresh install once failed the suite because every dependency was open-ended
and a new release changed its wording. The lock pins what the suite passed
with; these tests fail when the lock misses a dependency that ``pyproject.toml``
names, when a pin falls outside the range ``pyproject.toml`` allows, when the
environment running the tests was not installed from the lock, or when CI no
longer runs the README's test command, when a locked package needs one the lock
misses on a Python the README names (Debian 12's python3 is 3.11.2, Ubuntu
24.04's 3.12.3), or when ``runcache serve`` needs a package the serve lock lacks.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import httpx
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _pins(lock: str) -> dict[str, str]:
    """The ``name==version`` lines of a lock file, by canonical name."""
    text = (ROOT / "requirements" / lock).read_text()
    found = re.findall(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)", text, flags=re.MULTILINE)
    return {canonicalize_name(name): version for name, version in found}


#: The Pythons the README's commands run on: Debian 12's, this suite's, Ubuntu 24.04's.
PYTHONS = ("3.11.2", f"{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}", "3.12.3")


def _requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = [Requirement(line) for line in project["dependencies"]]
    for extra in extras:
        named += [Requirement(line) for line in project["optional-dependencies"][extra]]
    return [
        requirement
        for requirement in named
        if requirement.marker is None or requirement.marker.evaluate()
    ]


def test_every_dependency_is_locked_within_its_range() -> None:
    for lock, extras in (("serve.txt", ()), ("test.txt", ("test", "redis"))):
        pins = _pins(lock)
        for requirement in _requirements(*extras):
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{requirement.name} is not pinned in requirements/{lock}"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"requirements/{lock} pins {name}=={pins[name]}, outside {requirement}"
            )


def test_every_dependency_has_an_upper_bound() -> None:
    for requirement in _requirements("test", "redis", "bench"):
        if requirement.name.startswith("types-"):
            continue  # stubs follow the package they describe, release by release
        assert any(spec.operator == "<" for spec in requirement.specifier), (
            f"{requirement} admits the next major release untested"
        )


def test_the_tests_run_on_the_locked_versions() -> None:
    """The environment running this suite was installed from the test lock."""
    for name, version in _pins("test.txt").items():
        assert metadata.version(name) == version, f"{name} is not the locked {version}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```sh\n{ci}\n```" in readme
    # The documentation site shows the same two commands, word for word.
    started = (ROOT / "docs" / "getting-started.md").read_text()
    assert f"```sh\n{ci}\n```" in started
    assert "-r requirements/test.txt" in ci and "--require-hashes" in ci
    serve = next(line for line in readme.splitlines() if line.endswith("runcache serve"))
    assert "-r requirements/serve.txt" in serve and "--require-hashes" in serve
    assert f"```sh\n{serve}\n```" in started
    # Two environments: the tests' editable install never replaces the server's copy.
    assert " .venv-test " in ci and ".venv-test" not in serve


def test_every_locked_package_finds_what_it_needs_in_its_lock_on_every_python() -> None:
    """pip's --require-hashes refuses a dependency the lock lacks, so a package needing one
    only on another Python (redis-py: async-timeout before 3.11.3) breaks the install;
    and a pin that needs a newer Python than one the README names cannot install there."""
    test_pins = _pins("test.txt")
    for lock in ("serve.txt", "test.txt"):
        pins = _pins(lock)
        for name, version in pins.items():
            assert test_pins.get(name) == version, f"{lock} and test.txt disagree on {name}"
            for python in PYTHONS:
                environment = {
                    "python_full_version": python,
                    "python_version": python.rsplit(".", 1)[0],
                    "extra": "",
                }
                for line in metadata.requires(name) or []:
                    needed = Requirement(line)
                    if needed.marker is None or needed.marker.evaluate(environment):
                        assert canonicalize_name(needed.name) in pins, (
                            f"on Python {python}, {name} needs {line!r}: not in {lock}"
                        )
                # A pin whose release needs a newer Python has no file pip may install
                # there (pymdown-extensions 13 needs 3.11.5: Debian 12's is 3.11.2).
                supported = SpecifierSet(metadata.metadata(name)["Requires-Python"] or "")
                assert supported.contains(python, prereleases=True), (
                    f"{lock} pins {name}=={version}, which needs Python {supported}: "
                    f"not {python} (compile the lock on Debian 12's python3)"
                )


#: Blocks, before runcache is imported, every module only the test lock installs.
_ONLY_THE_SERVE_LOCK = """
import sys
for name in sys.argv.pop(1).split(","):
    sys.modules[name] = None  # import name: ModuleNotFoundError
arguments = sys.argv[1:]
if arguments[:2] == ["-m", "runcache"]:  # as start_server appends it
    arguments = arguments[2:]
sys.argv = ["runcache", *arguments]
from runcache.__main__ import main
main()
"""


def _modules_the_serve_lock_lacks() -> list[str]:
    """The top-level modules whose every distribution is in the test lock only."""
    served = set(_pins("serve.txt"))
    tested = set(_pins("test.txt"))
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if {canonicalize_name(d) for d in dists} <= tested - served
    )


def test_the_server_needs_only_the_serve_lock(tmp_path: Path) -> None:
    """The README's first command installs requirements/serve.txt (no redis, no test
    tools) and serves: once, a module-level redis import broke exactly that."""
    from conftest import start_server

    blocked = _modules_the_serve_lock_lacks()
    assert "redis" in blocked and "pytest" in blocked
    code = ["-c", _ONLY_THE_SERVE_LOCK, ",".join(blocked)]
    for store in ("memory://", f"sqlite:///{tmp_path / 'cache.db'}"):
        server = start_server("--store", store, python=[sys.executable, *code])
        try:
            for _ in range(2):
                answer = httpx.post(f"{server.url}/api/command", json={"command": "echo served"})
                assert answer.status_code == 200, answer.text
            assert answer.json()["cached"] is True
            assert httpx.get(f"{server.url}/").status_code == 200
            assert httpx.get(f"{server.url}/metrics").status_code == 200
            mcp = httpx.post(
                f"{server.url}/mcp",
                json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                headers={"Accept": "application/json, text/event-stream"},
            )
            assert mcp.status_code < 500, mcp.text
        finally:
            server.stop()
        server.assert_quiet_log()
    done = subprocess.run(
        [sys.executable, *code, "run", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
