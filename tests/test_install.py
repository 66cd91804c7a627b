"""The install stays what was tested: the README's commands, CI's, and the lock agree.

A fresh install once failed the suite because every dependency was open-ended
and a new release changed its wording. The lock pins what the suite passed
with; these tests fail when the lock misses a dependency that ``pyproject.toml``
names, when a pin falls outside the range ``pyproject.toml`` allows, when the
environment running the tests was not installed from the lock, or when CI no
longer runs the README's test command.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _pins(lock: str) -> dict[str, str]:
    """The ``name==version`` lines of a lock file, by canonical name."""
    text = (ROOT / "requirements" / lock).read_text()
    found = re.findall(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)", text, flags=re.MULTILINE)
    return {canonicalize_name(name): version for name, version in found}


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
