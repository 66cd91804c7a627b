"""Answers that stay true (issue 20): the exit codes that are answers and the inputs in
the key, on every store (real files, a real git repository).

Each test runs an engine of its own over the memory store, a SQLite file and a real
redis-server, with real commands.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runcache.config import Config
from runcache.engine.callers import Caller
from runcache.engine.engine import Engine, Outcome
from runcache.errors import BadRequest, Forbidden
from runcache.wire import RunRequest

from conftest import RedisServer

CALLER = Caller("test")


@pytest.fixture(params=["memory", "sqlite", "redis"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine over each store (a namespace of its own on the shared redis-server)."""
    if request.param == "memory":
        store = "memory://"
    elif request.param == "sqlite":
        store = f"sqlite:///{tmp_path / 'cache.db'}"
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        store = f"{redis.url}?namespace=answers-{uuid.uuid4().hex}"
    built = Engine.from_config(Config.load({"store": store}, environ={}))
    yield built
    built.close()


def _run(engine: Engine, request: RunRequest) -> Outcome:
    async def once() -> Outcome:
        try:
            return await engine.run(request, CALLER)
        finally:
            await engine.aclose()

    return asyncio.run(once())


def test_an_exit_code_named_an_answer_is_cached_and_others_are_not(
    engine: Engine, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    grep = f"echo run >> {runs}; grep -q needle /dev/null"  # finds nothing: exit 1
    named = RunRequest(grep, cache_exit_codes=[0, 1])
    first, second = _run(engine, named), _run(engine, named)
    assert first.result().return_code == second.result().return_code == 1
    assert (first.cached, second.cached) == (False, True)
    assert runs.read_text() == "run\n"

    # Without the code named, exit 1 is no answer: not stored, and not answered from
    # the entry the other request stored (a key of its own).
    plain = RunRequest(grep)
    assert [_run(engine, plain).cached for _ in range(2)] == [False, False]
    assert runs.read_text() == "run\n" * 3


def test_a_timed_out_run_is_never_cached_whatever_codes_are_named(engine: Engine) -> None:
    request = RunRequest("sleep 5", timeout=0.2, cache_exit_codes=list(range(256)))
    first, second = _run(engine, request), _run(engine, request)
    assert first.result().timed_out and second.result().timed_out
    assert (first.cached, second.cached) == (False, False)


def _key(outcome: Outcome) -> str:
    return outcome.result().cache_key


def test_inputs_join_the_key_and_a_changed_file_is_a_new_answer(
    engine: Engine, tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    notes, module = tmp_path / "notes.txt", tmp_path / "src" / "a.py"
    notes.write_text("one\n")
    module.write_text("x = 1\n")
    request = RunRequest(
        "cat notes.txt src/*.py", cwd=str(tmp_path), inputs=["notes.txt", "src/**/*.py"]
    )
    first, hit = _run(engine, request), _run(engine, request)
    assert first.result().stdout == "one\nx = 1\n" and hit.cached
    assert first.result().inputs == ["notes.txt", "src/**/*.py"]

    notes.write_text("two\n")  # same size: the mtime and then the digest tell
    changed = _run(engine, request)
    assert not changed.cached and changed.result().stdout == "two\nx = 1\n"
    assert _key(changed) != _key(first)

    (tmp_path / "src" / "b.py").write_text("y = 2\n")  # a new file the glob matches
    added = _run(engine, request)
    assert not added.cached and added.result().stdout.endswith("y = 2\n")

    # Touched but unchanged content: read again, same digest, same key: a hit.
    os.utime(notes, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert _run(engine, request).cached


def test_a_result_whose_inputs_changed_while_it_ran_is_not_stored(
    engine: Engine, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.write_text("before\n")
    request = RunRequest(
        "cat data; echo after > data", cwd=str(tmp_path), inputs=["data"], use_cache=True
    )
    first = _run(engine, request)
    assert first.result().stdout == "before\n"
    data.write_text("before\n")  # the content the key was made from, but a new stat
    again = _run(engine, request)
    assert not again.cached  # the first run changed its input: nothing was stored


def test_git_input_keys_on_head_status_and_diff(engine: Engine, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.invalid")
    git("config", "user.name", "t")
    (repo / "a.txt").write_text("a\n")
    (repo / ".gitignore").write_text("ignored/\n")
    git("add", ".")
    git("commit", "-qm", "one")
    request = RunRequest("echo listed", cwd=str(repo), inputs=["git:"])
    keys = [_key(_run(engine, request))]
    assert _run(engine, request).cached  # nothing changed

    (repo / "ignored").mkdir()
    (repo / "ignored" / "x").write_text("x\n")
    assert _run(engine, request).cached  # an ignored file is not an input

    (repo / "a.txt").write_text("changed\n")  # a diff
    keys.append(_key(_run(engine, request)))
    (repo / "new.txt").write_text("new\n")  # an untracked file
    keys.append(_key(_run(engine, request)))
    (repo / "new.txt").write_text("newer\n")  # its content
    keys.append(_key(_run(engine, request)))
    git("add", ".")
    git("commit", "-qm", "two")  # HEAD moves
    keys.append(_key(_run(engine, request)))
    assert len(set(keys)) == 5


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["../outside"], "may not leave the run's directory"),
        (["/etc/passwd"], "outside the run's directory"),
        (["link/*"], "leads outside the run's directory"),
        (["many/*"], "more than 3 files (--max-input-files)"),
        (["git:"], "is not in a git repository"),
    ],
)
def test_inputs_that_leave_the_directory_or_pass_a_bound_are_refused(
    tmp_path: Path, inputs: list[str], message: str
) -> None:
    work = tmp_path / "work"
    (work / "many").mkdir(parents=True)
    for number in range(4):
        (work / "many" / str(number)).write_text("x")
    (work / "link").symlink_to("/etc")
    built = Engine.from_config(Config.load({"max_input_files": 3}, environ={}))
    try:
        with pytest.raises(BadRequest) as refused:
            _run(built, RunRequest("true", cwd=str(work), inputs=inputs))
        assert message in refused.value.message
    finally:
        built.close()


def test_only_files_whose_stat_changed_are_read_within_the_byte_bound(tmp_path: Path) -> None:
    """Two files of 1,000 bytes under a bound of 1,500 read per request: the second
    request reads only the file it has not seen (the first is known by its stat)."""
    (tmp_path / "a").write_bytes(b"a" * 1000)
    (tmp_path / "b").write_bytes(b"b" * 1000)
    (tmp_path / "big").write_bytes(b"x" * 2000)
    built = Engine.from_config(Config.load({"max_input_bytes": 1500}, environ={}))
    try:
        assert _run(built, RunRequest("true", cwd=str(tmp_path), inputs=["a"])).result().success
        both = _run(built, RunRequest("true", cwd=str(tmp_path), inputs=["a", "b"]))
        assert both.result().success
        with pytest.raises(BadRequest) as refused:
            _run(built, RunRequest("true", cwd=str(tmp_path), inputs=["big"]))
        assert "more than 1500 bytes read (--max-input-bytes)" in refused.value.message
    finally:
        built.close()


def test_pass_env_reaches_the_command_and_leaves_the_key_alone(
    engine: Engine, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = f'echo run >> {runs}; echo "token=$SCAN_TOKEN"'
    plain = _run(engine, RunRequest(command))
    assert plain.result().stdout == "token=\n"
    engine.cache.store.clear()  # the next run must be a run, to see the variable
    first = _run(engine, RunRequest(command, pass_env={"SCAN_TOKEN": "s3cret"}))
    assert first.result().stdout == "token=s3cret\n" and not first.cached
    other = _run(engine, RunRequest(command, pass_env={"SCAN_TOKEN": "another"}))
    assert other.cached and _key(other) == _key(first) == _key(plain)
    assert runs.read_text() == "run\n" * 2


def test_pass_env_follows_the_env_rules_and_is_never_logged(tmp_path: Path) -> None:
    built = Engine.from_config(
        Config.load({"env_allow": "PATH,SCAN_TOKEN", "audit_log": str(tmp_path / "a")}, environ={})
    )
    try:
        with pytest.raises(Forbidden) as refused:
            _run(built, RunRequest("true", pass_env={"OTHER": "x"}))
        assert "pass_env may set only the variables --env-allow names" in refused.value.message
        with pytest.raises(Forbidden):
            _run(built, RunRequest("true", pass_env={"RUNCACHE_TOKEN": "x"}))
        _run(built, RunRequest("true", pass_env={"SCAN_TOKEN": "s3cret-value"}))
    finally:
        built.close()
    assert "s3cret-value" not in (tmp_path / "a").read_text()


def test_a_scope_is_a_cache_of_its_own_and_no_scope_keeps_the_old_key(
    engine: Engine, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    command = f"echo run >> {runs}; wc -l < {runs}"
    plain = _run(engine, RunRequest(command))
    team_a = _run(engine, RunRequest(command, scope="team-a"))
    team_b = _run(engine, RunRequest(command, scope="team-b"))
    assert [outcome.cached for outcome in (plain, team_a, team_b)] == [False, False, False]
    assert len({_key(plain), _key(team_a), _key(team_b)}) == 3
    assert _key(plain) == engine.cache_key(command)  # the key made before scopes
    again = _run(engine, RunRequest(command, scope="team-a"))
    assert again.cached and again.result().stdout == "2\n" == team_a.result().stdout
    stored = {info.key: info.scope for info in engine.cache.store.entries("", 0, 10)}
    assert stored == {_key(plain): "", _key(team_a): "team-a", _key(team_b): "team-b"}
    assert runs.read_text() == "run\n" * 3


POLICY = """
[[rule]]
program = "sh"
cache_exit_codes = [0, 1]
ttl = 600

[[rule]]
match = "echo never*"
cache = false

[[rule]]
match = "cat *"
inputs = ["data"]

[[rule]]
program = "date"
scope = "clock"
"""


def test_the_first_matching_rule_sets_what_the_request_leaves_out(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    (tmp_path / "data").write_text("one\n")
    built = Engine.from_config(Config.load({"policy": str(policy)}, environ={}))
    try:
        exit_one = RunRequest("sh -c 'exit 1'")
        assert [_run(built, exit_one).cached for _ in range(2)] == [False, True]
        # A request's own value wins over the rule's.
        own = RunRequest("sh -c 'exit 1; true'", cache_exit_codes=[0])
        assert [_run(built, own).cached for _ in range(2)] == [False, False]
        never = RunRequest("echo never cached")
        assert [_run(built, never).cached for _ in range(2)] == [False, False]
        with pytest.raises(BadRequest):
            _run(built, RunRequest("echo never again", refresh=True))
        read = RunRequest("cat data", cwd=str(tmp_path))
        assert _run(built, read).result().inputs == ["data"]
        assert _run(built, read).cached
        (tmp_path / "data").write_text("two\n")
        assert _run(built, read).result().stdout == "two\n"  # the rule's inputs keyed it
        ruled = _run(built, RunRequest("date +%N"))
        own_scope = _run(built, RunRequest("date +%N", scope="mine"))
        assert _key(ruled) == built.cache_key("date +%N", scope="clock") != _key(own_scope)
        assert built.cache.store.entries("date", 0, 10, scope="clock")[0].key == _key(ruled)
        answer = built.policy.answer()
        assert answer.source == str(policy) and [r.program for r in answer.rules] == [
            "sh",
            None,
            None,
            "date",
        ]
        assert answer.rules[-1].scope == "clock"
    finally:
        built.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nprogram = "curl"\ncahce = false\n', "rule 1 (program 'curl'): unknown field "),
        ('[[rule]]\nprogram = "git"\n[[rule]]\nmatch = "x"\nttl = -1\n', "rule 2 (match 'x'): ttl"),
        ("[[rule]]\nttl = 5\n", 'rule 1: give exactly one of "match" and "program"'),
        ("[[rule]\n", "is not TOML"),
        ("[other]\nx = 1\n", "holds only [[rule]] tables"),
    ],
)
def test_a_bad_policy_is_refused_at_start_with_one_line_naming_the_rule(
    tmp_path: Path, text: str, message: str
) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "runcache", "serve", "--port", "0", "--policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
