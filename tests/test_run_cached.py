"""``runcache run``'s light hit path (:mod:`runcache.client.cached`, issue 20's benchmark goal).

Real processes on a real SQLite file under their own ``XDG_CACHE_HOME``. The light
path runs as ``python -X importtime -m runcache``, so one process shows both what it
answered and what it imported: a hit answered without click is the light path's.
The full path's answer to the same hit comes from ``runcache.cli.main`` itself.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

#: ``runcache ARGS`` through the full CLI, never the light path: what it answered before.
FULL = [sys.executable, "-c", "import sys; from runcache.cli import main; main()"]

#: ``runcache ARGS`` as the console script starts it (the light path first), importing
#: with ``-X importtime`` so its stderr also says what was imported.
LIGHT = [sys.executable, "-X", "importtime", "-m", "runcache"]

#: What the light path must not import: the CLI, the engine, the stores, the servers.
HEAVY = ("click", "runcache.cli", "runcache.engine.engine", "runcache.stores", "starlette", "mcp")


def _environment(home: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNCACHE_")}
    environment["XDG_CACHE_HOME"] = str(home)
    return environment


def _run(argv: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv, capture_output=True, env=_environment(home), cwd=cwd, timeout=60, check=False
    )


def _light(
    home: Path, cwd: Path, *args: str
) -> tuple[subprocess.CompletedProcess[bytes], set[str]]:
    """``runcache ARGS`` started as the console script starts it: the answer (its stderr
    without the import lines) and the modules it imported."""
    done = _run([*LIGHT, *args], home, cwd)
    kept, modules = [], set()
    for line in done.stderr.splitlines(keepends=True):
        if line.startswith(b"import time:"):
            modules.add(line.split(b"|")[-1].strip().decode())
        else:
            kept.append(line)
    done.stderr = b"".join(kept)
    return done, modules


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def _stats(home: Path, cwd: Path) -> dict[str, object]:
    found = orjson.loads(_run([*FULL, "stats", "--json"], home, cwd).stdout)
    assert isinstance(found, dict)
    return found


@pytest.mark.parametrize(
    ("options", "script"),
    [
        ([], "printf 'a\\377b\\n\\r'; printf 'e\\376rr\\000' >&2"),  # not UTF-8, NUL, CR
        ([], "head -c 3000000 /dev/zero | tr '\\0' x; seq 1 20000 >&2"),  # large
        (["--cache-exit-codes", "0,3"], "echo out; echo err >&2; exit 3"),
        (["--cache-exit-codes=3"], "echo only-three; exit 3"),
    ],
    ids=["not-utf8", "large", "exit-3", "exit-3-equals"],
)
def test_the_light_path_answers_byte_for_byte_as_the_full_path(
    tmp_path: Path, options: list[str], script: str
) -> None:
    runs = tmp_path / "runs"
    command = f"echo ran >> {runs}; {script}"
    args = ["run", *options, "sh", "-c", command]
    first = _run([*FULL, *args], tmp_path, tmp_path)  # a miss: the command runs
    full = _run([*FULL, *args], tmp_path, tmp_path)
    light, modules = _light(tmp_path, tmp_path, *args)
    assert _heavy(modules) == [], "the hit did not take the light path"
    assert (light.stdout, light.stderr, light.returncode) == (
        full.stdout,
        full.stderr,
        full.returncode,
    )
    assert (full.stdout, full.stderr, full.returncode) == (
        first.stdout,
        first.stderr,
        first.returncode,
    )
    assert runs.read_text() == "ran\n"  # both answers from the cache


def test_a_light_hit_is_counted_as_the_full_path_counts_one(tmp_path: Path) -> None:
    args = ["run", "echo", "counted"]
    _run([*FULL, *args], tmp_path, tmp_path)
    before = _stats(tmp_path, tmp_path)
    _run([*FULL, *args], tmp_path, tmp_path)
    after_full = _stats(tmp_path, tmp_path)
    _, modules = _light(tmp_path, tmp_path, *args)
    assert _heavy(modules) == []
    after_light = _stats(tmp_path, tmp_path)
    for name in ("hits", "misses", "size"):
        step = int(after_full[name]) - int(before[name])  # type: ignore[call-overload]
        assert int(after_light[name]) - int(after_full[name]) == step, name  # type: ignore[call-overload]
    assert int(after_light["hits"]) == int(before["hits"]) + 2  # type: ignore[call-overload]


def test_a_cached_run_imports_neither_the_cli_nor_the_engine(tmp_path: Path) -> None:
    """A guard against an import creeping back onto the hit path (not a timing test)."""
    _run([*FULL, "run", "true"], tmp_path, tmp_path)
    done, modules = _light(tmp_path, tmp_path, "run", "true")
    assert done.returncode == 0
    assert "runcache.client.cached" in modules
    assert _heavy(modules) == []
    assert not {"msgspec", "orjson"} & modules


def _expire_all(home: Path) -> None:
    with sqlite3.connect(home / "runcache" / "cache.db") as db:
        db.execute("UPDATE entries SET expires_at = 1")


@pytest.mark.parametrize(
    ("options", "prepare"),
    [
        ([], _expire_all),  # expired (kept for stale readers): the full path runs it
        ([], lambda home: shutil.rmtree(home / "runcache")),  # no store at all
        (["--refresh"], lambda home: None),
        (["--ttl", "5m"], lambda home: None),  # an option the light path leaves alone
    ],
    ids=["expired", "no-store", "refresh", "other-option"],
)
def test_what_the_light_path_cannot_answer_runs_as_before(
    tmp_path: Path, options: list[str], prepare: object
) -> None:
    runs = tmp_path / "runs"
    args = ["sh", "-c", f"echo ran >> {runs}; echo out"]
    assert _run([*FULL, "run", *args], tmp_path, tmp_path).returncode == 0
    assert callable(prepare)
    prepare(tmp_path)
    done, modules = _light(tmp_path, tmp_path, "run", *options, *args)
    assert (done.stdout, done.returncode) == (b"out\n", 0)
    assert "click" in modules  # the full path answered
    expected = 1 if options == ["--ttl", "5m"] else 2  # a hit on the full path runs nothing
    assert runs.read_text() == "ran\n" * expected


def test_a_changed_input_runs_again(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("one\n")
    args = ["run", "--input", "notes.txt", "cat", "notes.txt"]
    assert _run([*FULL, *args], tmp_path, tmp_path).stdout == b"one\n"
    (tmp_path / "notes.txt").write_text("two, longer\n")
    done, modules = _light(tmp_path, tmp_path, *args)
    assert done.stdout == b"two, longer\n"
    assert "click" in modules


def test_a_different_directory_or_variable_is_another_key(tmp_path: Path) -> None:
    """The light path keys on what the engine keys on: the directory and PATH, HOME..."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = ["run", "sh", "-c", "pwd"]
    _run([*FULL, *args], tmp_path, tmp_path / "a")
    done, modules = _light(tmp_path, tmp_path / "b", *args)
    assert done.stdout == f"{tmp_path / 'b'}\n".encode()
    assert "click" in modules  # a miss: no hit from a's entry
    again, modules = _light(tmp_path, tmp_path / "a", *args)
    assert again.stdout == f"{tmp_path / 'a'}\n".encode()
    assert _heavy(modules) == []


def test_a_reader_that_leaves_early_ends_it_as_the_full_path_does(tmp_path: Path) -> None:
    """``runcache run ... | head``: the output is more than a pipe holds, the reader goes
    after a few bytes; exit 1 and nothing on stderr, as click ends the full path (a
    partial write taken for a whole one once ended it 0, the output cut short)."""
    args = ["run", "seq", "1", "400000"]  # 2.6 MB
    _run([*FULL, *args], tmp_path, tmp_path)
    codes = []
    for way in (FULL, LIGHT):
        with subprocess.Popen(
            [*way, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_environment(tmp_path),
            cwd=tmp_path,
        ) as process:
            assert process.stdout is not None and process.stderr is not None
            assert process.stdout.read(10) == b"1\n2\n3\n4\n5\n"
            process.stdout.close()
            errors = process.stderr.read()
            codes.append(process.wait(timeout=60))
        if way is LIGHT:
            assert b"click" not in errors  # answered by the light path
            assert b"Traceback" not in errors
    assert codes == [1, 1]


def test_a_setting_in_the_environment_leaves_the_answer_to_the_full_path(tmp_path: Path) -> None:
    """``RUNCACHE_MAX_OUTPUT_BYTES`` is in the key: with it set, the entry made without
    it is not this call's answer (the light path, reading no settings, would take it)."""
    runs = tmp_path / "runs"
    args = ["run", "sh", "-c", f"echo ran >> {runs}; echo out"]
    _run([*FULL, *args], tmp_path, tmp_path)
    environment = {**_environment(tmp_path), "RUNCACHE_MAX_OUTPUT_BYTES": "1000"}
    done = subprocess.run(
        [*LIGHT, *args], capture_output=True, env=environment, cwd=tmp_path, timeout=60
    )
    assert (done.stdout, done.returncode) == (b"out\n", 0)
    assert b" click" in done.stderr  # the full path answered: imported the CLI
    assert runs.read_text() == "ran\n" * 2  # another key: a miss, run again
