"""The cache entries API on real servers: list, read, page, delete and invalidate.

Each store runs the same requests (memory, a SQLite file, the session's real
redis-server under a namespace of the test's own), and the Redis store is also
driven past its batch size with a server answering other requests meanwhile.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from runcache.stores import open_store
from runcache.stores import redis as redis_store
from runcache.stores.redis import RedisStore

from conftest import LiveServer, RedisServer

StartServer = Callable[..., LiveServer]

TOKEN, ADMIN = "u" * 32, "a" * 32
USER_AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'entries.db'}"
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    return f"{redis_server.url}?namespace=test-{uuid.uuid4().hex}"


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as opened:
        yield opened


class Api:
    """A server's URL and a session, with the token (if any) of each kind of caller."""

    def __init__(
        self,
        server: LiveServer,
        session: requests.Session,
        user: dict[str, str] | None = None,
        admin: dict[str, str] | None = None,
    ) -> None:
        self.url = server.url
        self.session = session
        self.user = user or {}
        self.admin = admin or {}

    def call(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> requests.Response:
        headers = self.admin if admin else self.user
        return self.session.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def ok(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        response = self.call(method, path, admin, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def run(self, command: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.ok("POST", "/api/command", json={"command": command})
        return answer

    def commands(self, query: str = "") -> list[str]:
        listed = self.ok("GET", "/api/cache/entries" + query)
        return [entry["command"] for entry in listed["entries"]]


def test_entries_are_listed_newest_first_by_prefix_and_paged_without_counting(
    live_server_factory: StartServer, store_url: str, session: requests.Session
) -> None:
    api = Api(live_server_factory("--store", store_url), session)
    keys = {
        command: api.run(command)["cache_key"]
        for command in ("echo a 1", "echo b", "echo a 2", "echo a 3", "true")
    }
    api.run("echo b")  # a hit: "echo b" has served one
    before = api.ok("GET", "/api/cache/stats")
    listed = api.ok("GET", "/api/cache/entries")
    assert [entry["command"] for entry in listed["entries"]] == [
        "true",
        "echo a 3",
        "echo a 2",
        "echo b",
        "echo a 1",
    ]
    assert listed["next_offset"] is None
    entry = next(entry for entry in listed["entries"] if entry["command"] == "echo b")
    assert entry["cache_key"] == keys["echo b"]
    assert (entry["hits"], entry["return_code"]) == (1, 0)
    assert entry["bytes"] > len("b\n") and entry["expires_at"] - entry["created_at"] == (
        pytest.approx(3600, abs=0.01)
    )
    assert api.commands("?prefix=echo%20a") == ["echo a 3", "echo a 2", "echo a 1"]
    first = api.ok("GET", "/api/cache/entries?prefix=echo%20a&limit=2")
    assert [entry["command"] for entry in first["entries"]] == ["echo a 3", "echo a 2"]
    assert first["next_offset"] == 2
    second = api.ok("GET", "/api/cache/entries?prefix=echo%20a&limit=2&offset=2")
    assert [entry["command"] for entry in second["entries"]] == ["echo a 1"]
    assert second["next_offset"] is None
    assert api.commands("?prefix=nothing") == []
    for query in ("?limit=0", "?limit=1001", "?offset=-1", "?limit=x", "?offset=%C2%B2"):
        refused = api.call("GET", "/api/cache/entries" + query)
        assert refused.status_code == 400 and "whole number" in refused.json()["error"]
    key = keys["echo a 2"]
    assert api.ok("GET", f"/api/cache/entries/{key}")["hits"] == 0
    api.ok("GET", f"/api/cache/entries/{key}/output")
    after = api.ok("GET", "/api/cache/stats")
    assert {name: after[name] for name in ("hits", "misses", "expirations", "size")} == {
        name: before[name] for name in ("hits", "misses", "expirations", "size")
    }


def test_an_entry_is_read_and_its_output_paged_without_splitting_a_character(
    live_server_factory: StartServer, store_url: str, session: requests.Session
) -> None:
    api = Api(live_server_factory("--store", store_url), session)
    command = "printf 'h\\303\\251llo \\342\\202\\254 w\\360\\237\\231\\202rld'; echo oops >&2"
    result = api.run(command)
    expected = "héllo € w🙂rld"
    assert result["stdout"] == expected
    key = result["cache_key"]
    detail = api.ok("GET", f"/api/cache/entries/{key}")
    assert (detail["command"], detail["cache_key"]) == (command, key)
    assert detail["result"]["stdout"] == expected and detail["result"]["stderr"] == "oops\n"
    assert detail["result"]["cache_key"] == key and "cached" not in detail["result"]
    pieces, offset = [], 0
    while True:
        page = api.ok("GET", f"/api/cache/entries/{key}/output?offset={offset}&limit=3")
        assert page["offset"] == offset and page["total_bytes"] == len(expected.encode())
        assert page["eof"] or page["next_offset"] > offset, page  # else this loop never ends
        pieces.append(page["data"])
        offset = page["next_offset"]
        if page["eof"]:
            break
    assert "".join(pieces) == expected
    assert len(pieces) > 4
    inside = api.ok("GET", f"/api/cache/entries/{key}/output?offset=2&limit=100")
    assert inside["data"] == expected[2:] and inside["offset"] == 3  # past the é it fell in
    errors = api.ok("GET", f"/api/cache/entries/{key}/output?stream=stderr")
    assert (errors["data"], errors["eof"]) == ("oops\n", True)
    assert api.call("GET", f"/api/cache/entries/{key}/output?stream=both").status_code == 400
    stats = api.ok("GET", "/api/cache/stats")
    assert (stats["hits"], stats["misses"]) == (0, 1)
    for path in (
        f"/api/cache/entries/{'0' * 64}",
        f"/api/cache/entries/{'0' * 64}/output",
        "/api/cache/entries/not-a-key",
    ):
        missing = api.call("GET", path)
        assert missing.status_code == 404 and "no cache entry" in missing.json()["error"]


def test_deleting_needs_the_admin_token_and_a_deleted_entry_is_gone(
    live_server_factory: StartServer, store_url: str, session: requests.Session
) -> None:
    server = live_server_factory(
        "--store", store_url, env={"RUNCACHE_TOKEN": TOKEN, "RUNCACHE_ADMIN_TOKEN": ADMIN}
    )
    api = Api(server, session, USER_AUTH, ADMIN_AUTH)
    key = api.run("echo delete me")["cache_key"]
    kept = api.run("echo keep me")["cache_key"]
    path = f"/api/cache/entries/{key}"
    refused = api.call("DELETE", path)
    assert refused.status_code == 403 and "admin token" in refused.json()["error"]
    assert session.delete(server.url + path, timeout=10).status_code == 401
    assert api.ok("GET", path)["cache_key"] == key  # the plain token still reads
    assert api.ok("DELETE", path, admin=True) == {"success": True, "deleted": 1}
    again = api.call("DELETE", path, admin=True)
    assert again.status_code == 404 and key in again.json()["error"]
    assert api.call("GET", path).status_code == 404
    assert api.commands() == ["echo keep me"]
    assert api.ok("GET", f"/api/cache/entries/{kept}")["command"] == "echo keep me"
    assert api.run("echo delete me")["cached"] is False
    stats = api.ok("GET", "/api/cache/stats")
    assert (stats["size"], stats["evictions"], stats["expirations"]) == (2, 0, 0)
    server.logged(lambda line: f"deleted cache entry {key}" in line)


def test_invalidate_by_prefix_or_glob_needs_the_admin_token_and_one_of_them(
    live_server_factory: StartServer, store_url: str, session: requests.Session
) -> None:
    server = live_server_factory(
        "--store", store_url, env={"RUNCACHE_TOKEN": TOKEN, "RUNCACHE_ADMIN_TOKEN": ADMIN}
    )
    api = Api(server, session, USER_AUTH, ADMIN_AUTH)
    for command in (
        "echo nmap 1",
        "echo nmap 2",
        "echo git x status",
        "echo git status",
        "echo other",
    ):
        api.run(command)
    by_prefix = {"prefix": "echo nmap "}
    refused = api.call("POST", "/api/cache/invalidate", json=by_prefix)
    assert refused.status_code == 403
    assert api.ok("POST", "/api/cache/invalidate", admin=True, json=by_prefix) == {
        "success": True,
        "deleted": 2,
    }
    assert api.ok(
        "POST", "/api/cache/invalidate", admin=True, json={"glob": "echo git * status"}
    ) == {"success": True, "deleted": 1}
    assert api.ok("POST", "/api/cache/invalidate", admin=True, json=by_prefix)["deleted"] == 0
    assert api.commands() == ["echo other", "echo git status"]
    assert api.ok("GET", "/api/cache/stats")["size"] == 2
    bad: list[tuple[Any, str]] = [
        ({}, INVALIDATE_ONE),
        ({"prefix": "a", "glob": "b"}, INVALIDATE_ONE),
        ({"scope": "a", "prefix": "a", "glob": "b"}, INVALIDATE_ONE),
        ({"prefix": ""}, "prefix must not be empty"),
        ({"glob": 5}, "glob must be a string"),
        ({"prefix": None}, "prefix must be a string"),
        ([1], "request body must be a JSON object"),
    ]
    for body, message in bad:
        answer = api.call("POST", "/api/cache/invalidate", admin=True, json=body)
        assert (answer.status_code, answer.json()) == (400, {"error": message}), body
    for raw in (b"", b"{nope"):
        answer = api.call("POST", "/api/cache/invalidate", admin=True, data=raw)
        assert answer.status_code == 400 and "JSON" in answer.json()["error"]
    assert api.ok("GET", "/api/cache/stats")["size"] == 2
    assert any(
        "invalidated 2 cache entries by prefix 'echo nmap '" in line for line in server.output
    )


INVALIDATE_ONE = 'give one of "prefix" and "glob", a "scope", or a scope and one of them'


def test_scopes_keep_their_own_entries_listed_and_invalidated_as_one(
    live_server_factory: StartServer, store_url: str, session: requests.Session
) -> None:
    server = live_server_factory("--store", store_url)
    api = Api(server, session)

    def run(command: str, scope: str | None = None) -> dict[str, Any]:
        body = {"command": command} if scope is None else {"command": command, "scope": scope}
        answer: dict[str, Any] = api.ok("POST", "/api/command", json=body)
        return answer

    plain, team_a, team_b = run("date +%N"), run("date +%N", "team-a"), run("date +%N", "team-b")
    assert not any(answer["cached"] for answer in (plain, team_a, team_b))
    assert len({answer["stdout"] for answer in (plain, team_a, team_b)}) == 3
    assert len({answer["cache_key"] for answer in (plain, team_a, team_b)}) == 3
    again = run("date +%N", "team-a")
    assert again["cached"] is True and again["stdout"] == team_a["stdout"]
    run("echo other", "team-a")
    listed = api.ok("GET", "/api/cache/entries?scope=team-a")["entries"]
    assert [(entry["command"], entry["scope"]) for entry in listed] == [
        ("echo other", "team-a"),
        ("date +%N", "team-a"),
    ]
    everything = api.ok("GET", "/api/cache/entries")["entries"]
    assert sorted((entry["scope"] or "") for entry in everything) == [
        "",
        "team-a",
        "team-a",
        "team-b",
    ]
    detail = api.ok("GET", f"/api/cache/entries/{team_b['cache_key']}")
    assert detail["scope"] == "team-b"
    by_both = {"scope": "team-a", "prefix": "echo o"}
    assert api.ok("POST", "/api/cache/invalidate", json=by_both)["deleted"] == 1
    assert api.ok("POST", "/api/cache/invalidate", json={"scope": "team-a"})["deleted"] == 1
    assert api.ok("GET", "/api/cache/entries?scope=team-a")["entries"] == []
    assert run("date +%N")["cached"] is True and run("date +%N", "team-b")["cached"] is True
    assert run("date +%N", "team-a")["cached"] is False
    server.logged(lambda line: "invalidated 1 cache entries by scope 'team-a'" in line)
    for bad in ("", "team a", "-lead", "x" * 65, "a/b"):
        answer = api.call("POST", "/api/command", json={"command": "true", "scope": bad})
        assert answer.status_code == 400 and answer.json()["error"].startswith("scope must be")
        listing = api.call("GET", "/api/cache/entries", params={"scope": bad})
        assert listing.status_code == 400 and listing.json()["error"].startswith("scope must be")
        invalid = api.call("POST", "/api/cache/invalidate", json={"scope": bad})
        assert invalid.status_code == 400 and invalid.json()["error"].startswith("scope must be")
    typo = api.call("POST", "/api/command", json={"command": "true", "scop": "a"})
    assert typo.json() == {"error": "unknown field 'scop'; did you mean 'scope'?"}


def test_without_tokens_the_deletions_are_open_as_the_clear_is(
    live_server_factory: StartServer, session: requests.Session
) -> None:
    api = Api(live_server_factory(), session)
    key = api.run("echo open")["cache_key"]
    assert api.ok("DELETE", f"/api/cache/entries/{key}")["deleted"] == 1
    assert api.call("POST", f"/api/cache/entries/{key}").headers["Allow"] == (
        "GET, HEAD, DELETE, OPTIONS"
    )


# -- Redis past its batch size: many steps, each short --------------------------------


def _fill(store: RedisStore, count: int, command: Callable[[int], str]) -> None:
    """``count`` entries put straight into the store (their value is a stored result)."""
    epoch = store.epoch()
    for index in range(count):
        key = f"{index:064x}"
        value = (
            b'{"return_code":0,"success":true,"timed_out":false,"partial_results":false,'
            b'"stdout_truncated":false,"stderr_truncated":false,"execution_time":0.0,'
            b'"timestamp":"2026-01-01T00:00:00+00:00","cache_key":"'
            + key.encode()
            + b'","stdout":"x","stderr":""}'
        )
        assert store.put(key, value, 3600, epoch, command=command(index))


def _while_answering(work: Callable[[], Any], probe: Callable[[], None]) -> Any:
    """``work()`` in a thread, while this one keeps calling ``probe``, which checks
    an answer of the server to something else; how many times depends on the
    machine, so only the answers are checked."""
    done: list[Any] = []
    worker = threading.Thread(target=lambda: done.append(work()))
    worker.start()
    deadline = time.monotonic() + 60
    while worker.is_alive():
        assert time.monotonic() < deadline, "the work never finished"
        probe()
    worker.join()
    return done[0]


def test_redis_invalidates_and_clears_ten_thousand_entries_in_batches(
    live_server_factory: StartServer, redis_server: RedisServer, session: requests.Session
) -> None:
    namespace = f"test-{uuid.uuid4().hex}"
    url = f"{redis_server.url}?namespace={namespace}"
    count = 12_000
    assert count > 20 * redis_store.BATCH
    store = open_store(url, 50_000, 1 << 30)
    assert isinstance(store, RedisStore)
    try:
        _fill(store, count, lambda index: f"{'nmap' if index % 3 else 'dig'} host-{index}")
        api = Api(live_server_factory("--store", url, "--max-entries", "50000"), session)
        api.run("echo still here")
        assert api.ok("GET", "/api/cache/stats")["size"] == count + 1
        nmaps = sum(1 for index in range(count) if index % 3)

        def run_and_read() -> None:
            assert api.ok("GET", "/livez") == {"status": "ok"}
            assert api.run("echo still here")["stdout"] == "still here\n"

        answer = _while_answering(
            lambda: api.ok("POST", "/api/cache/invalidate", json={"prefix": "nmap "}), run_and_read
        )
        assert answer == {"success": True, "deleted": nmaps}
        assert api.ok("GET", "/api/cache/stats")["size"] == count - nmaps + 1
        assert api.commands("?prefix=nmap") == []
        assert len(api.ok("GET", "/api/cache/entries?prefix=dig&limit=1000")["entries"]) == 1000

        def read() -> None:  # nothing that would store an entry after the clear
            assert api.ok("GET", "/livez") == {"status": "ok"}
            assert isinstance(api.ok("GET", "/api/cache/entries?limit=1")["entries"], list)

        cleared = _while_answering(lambda: api.ok("POST", "/api/cache/clear"), read)
        assert cleared == {"success": True, "message": "Cache cleared"}
        stats = api.ok("GET", "/api/cache/stats")
        assert (stats["size"], stats["bytes"], stats["hits"]) == (0, 0, 0)
        keys = set(store.client.scan_iter(match=f"runcache:{{{namespace}}}:*", count=1000))
        # The job board shares the namespace (stores/redis_board.py); a clear is the cache's.
        board = re.compile(
            rb"^runcache:\{[^}]+\}:(jobs|running|leases|job:|out:|instance:|control:)"
        )
        assert {key for key in keys if not board.match(key)} == {store.counts_key.encode()}
    finally:
        store.close()


# -- a glob is bounded -----------------------------------------------------------------


def test_an_over_long_glob_is_refused_and_removes_nothing(
    live_server_factory: StartServer, store_url: str, session: requests.Session
) -> None:
    api = Api(live_server_factory("--store", store_url), session)
    for index in range(3):
        api.run(f": {index} glob bound")
    too_long = api.call("POST", "/api/cache/invalidate", json={"glob": "*" * 1025})
    assert (too_long.status_code, too_long.json()) == (
        400,
        {"error": "glob must be at most 1024 characters"},
    )
    assert api.ok("GET", "/api/cache/stats")["size"] == 3  # removed nothing
    allowed = api.ok("POST", "/api/cache/invalidate", json={"glob": "*" * 1024})
    assert allowed == {"success": True, "deleted": 3}
