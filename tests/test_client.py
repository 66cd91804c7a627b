"""The client: one suite over a real server (HTTP) and an engine in this process."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from runcache import errors
from runcache.client import connect, sse
from runcache.client.base import CLEARED, BaseClient
from runcache.client.follow import STREAMS
from runcache.client.http import Client, ServerError, ServerUnreachable, normalize_url
from runcache.client.local import LocalClient
from runcache.config import Config
from runcache.engine.engine import Engine
from runcache.errors import BadRequest, ConfigError, Conflict, Forbidden, NotFound, Unauthorized
from runcache.wire import Cleared, CommandResult, RunRequest, to_builtins

from conftest import LiveServer, free_port, until

TOKEN = "t" * 24
ADMIN_TOKEN = "a" * 24


@pytest.fixture(params=["http", "local"])
def backend(request: pytest.FixtureRequest) -> Iterator[BaseClient]:
    """Each test runs against a real server and against an in-process engine."""
    if request.param == "http":
        server: LiveServer = request.getfixturevalue("live_server")
        with Client(server.url) as client:
            yield client
    else:
        with LocalClient(Engine.from_config(Config.load(environ={}))) as local:
            yield local


def test_second_run_is_cached_and_use_cache_false_runs_again(
    backend: BaseClient,
) -> None:
    first = backend.execute("cat /proc/sys/kernel/random/uuid")
    second = backend.execute("cat /proc/sys/kernel/random/uuid")
    fresh = backend.execute(RunRequest("cat /proc/sys/kernel/random/uuid", use_cache=False))
    assert (first.cached, second.cached, fresh.cached) == (False, True, False)
    assert second.stdout == first.stdout != fresh.stdout
    assert backend.cache_stats().hits == 1


def test_result_has_the_contract_fields(backend: BaseClient) -> None:
    result = backend.execute(RunRequest("echo out; echo err >&2; exit 3", timeout=10))
    assert isinstance(result, CommandResult)
    assert (result.stdout, result.stderr, result.return_code) == ("out\n", "err\n", 3)
    assert result.success is False and result.timed_out is False
    assert isinstance(result.execution_time, float) and result.timestamp


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: b.execute("   "), "Command parameter is required"),
        (
            lambda b: b.execute(RunRequest("true", timeout=0)),
            "timeout must be greater than 0 seconds",
        ),
        (
            lambda b: b.execute(RunRequest("true", timeout=10**9)),
            "timeout must be at most 3600 seconds",
        ),
        (lambda b: b.execute(RunRequest("true", ttl=-1)), "ttl must be greater than 0 seconds"),
    ],
)
def test_bad_requests_fail_with_the_api_message_either_way(
    backend: BaseClient, call: Callable[[Any], object], message: str
) -> None:
    with pytest.raises(BadRequest) as raised:
        call(backend)
    assert raised.value.message == message
    assert backend.cache_stats().misses == 0


def test_clear_empties_and_answers_as_the_contract_says(backend: BaseClient) -> None:
    backend.execute("echo x")
    answer = backend.clear()
    assert isinstance(answer, Cleared) and answer == CLEARED
    assert to_builtins(answer) == {"success": True, "message": "Cache cleared"}
    stats = backend.cache_stats()
    assert (stats.size, stats.hits, stats.misses, stats.hit_rate) == (0, 0, 0, "0.0%")


def test_health_and_telemetry(backend: BaseClient) -> None:
    backend.execute("true")
    health = backend.health()
    assert health.status == "healthy" and health.cache_stats.size == 1
    assert backend.telemetry().commands_executed == 1


def test_the_client_errors_live_with_the_others_and_are_still_importable_from_the_client() -> None:
    assert ServerUnreachable is errors.ServerUnreachable
    assert ServerError is errors.ServerError
    assert issubclass(ServerUnreachable, errors.RuncacheError)
    assert issubclass(ServerError, errors.RuncacheError)


def test_a_server_that_is_down_is_named_in_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url) as client, pytest.raises(ServerUnreachable) as raised:
        client.cache_stats()
    assert raised.value.message == f"cannot reach a runcache server at {url}: Connection refused"


def test_something_else_on_the_port_is_not_taken_for_runcache(live_server: LiveServer) -> None:
    with Client(live_server.url + "/nowhere") as client, pytest.raises(NotFound) as raised:
        client.cache_stats()
    assert raised.value.status == 404
    assert raised.value.message.startswith("no endpoint at /nowhere/api/cache/stats")


def test_tokens_are_sent_and_clear_uses_the_admin_token(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(env={"RUNCACHE_TOKEN": TOKEN, "RUNCACHE_ADMIN_TOKEN": ADMIN_TOKEN})
    with Client(server.url) as anonymous, pytest.raises(Unauthorized):
        anonymous.execute("true")
    with Client(server.url, token=TOKEN) as user:
        assert user.execute("echo hi").stdout == "hi\n"
        with pytest.raises(Forbidden) as refused:
            user.clear()
        assert refused.value.message == "this operation needs the admin token"
    with Client(server.url, token=TOKEN, admin_token=ADMIN_TOKEN) as admin:
        assert admin.execute("echo hi").cached is True
        assert admin.clear() == CLEARED


def test_close_cuts_a_request_still_waiting(live_server: LiveServer) -> None:
    client = Client(live_server.url)
    errors: list[Exception] = []

    def wait_for_sleep() -> None:
        try:
            client.execute(RunRequest("sleep 30", timeout=60))
        except ServerUnreachable as error:
            errors.append(error)

    waiter = threading.Thread(target=wait_for_sleep)
    waiter.start()
    with Client(live_server.url) as probe:
        until(lambda: probe.health().running_commands > 0)
    client.close()
    waiter.join(20)
    assert not waiter.is_alive() and len(errors) == 1


def test_closing_a_local_client_kills_its_running_command() -> None:
    local = LocalClient(Engine.from_config(Config.load(environ={})))
    results: list[CommandResult] = []
    waiter = threading.Thread(target=lambda: results.append(local.execute("sleep 30")))
    waiter.start()
    until(lambda: local.engine.runner.running > 0)
    local.close()
    waiter.join(20)
    assert results[0].return_code == -9 and results[0].success is False


def test_connect_picks_http_with_a_url_and_the_engine_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RUNCACHE_STORE", raising=False)
    with connect("127.0.0.1:9") as remote, connect(None) as local:
        assert isinstance(remote, Client) and remote.url == "http://127.0.0.1:9"
        assert isinstance(local, LocalClient)


@pytest.mark.parametrize(
    ("given", "base"),
    [
        ("127.0.0.1:8888", "http://127.0.0.1:8888"),
        ("http://127.0.0.1:8888/", "http://127.0.0.1:8888"),
        ("https://runcache.example/base/", "https://runcache.example/base"),
    ],
)
def test_normalize_url(given: str, base: str) -> None:
    assert normalize_url(given) == base


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ConfigError, match="server URL must look like http://host:port"):
        Client("ftp://127.0.0.1:21")


# -- jobs: start, follow by events, page, steer ------------------------------------------


def test_a_background_run_is_followed_by_its_events_and_read_byte_for_byte(
    backend: BaseClient, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    job = backend.start(
        RunRequest(
            f"printf 'a\\r\\n'; echo err >&2; while [ ! -e {gate} ]; do sleep 0.02; done; echo b",
            use_cache=False,
        )
    )
    assert job.status == "running" and job.pid is not None
    events = backend.events(job.job_id)
    before = [next(events), next(events)]  # both streams, while the command waits
    assert sorted(event.kind for event in before) == ["stderr", "stdout"]
    gate.touch()
    after = list(events)
    assert [event.kind for event in after][-1] == "result"
    result = msgspec.json.decode(after[-1].data, type=CommandResult)
    assert (result.stdout, result.stderr, result.return_code) == ("a\r\nb\n", "err\n", 0)
    printed = [event for event in before + after if event.kind == "stdout"]
    # Events are text in lines (SSE has no carriage return); the pages keep every byte.
    assert "".join(event.data for event in printed).replace("\r\n", "\n") == "a\nb\n"
    assert [event.id for event in before + after if event.kind in STREAMS][-1] == "5:4"
    page = backend.output(job.job_id, "stdout")
    assert (page.data, page.next_offset, page.total_bytes, page.eof) == ("a\r\nb\n", 5, 5, True)
    assert backend.job(job.job_id).status == "completed"
    resumed = list(backend.events(job.job_id, last_event_id="5:0"))
    assert [(event.kind, event.data) for event in resumed][0] == ("stderr", "err\n")
    assert [event.kind for event in resumed] == ["stderr", "result"]


def test_an_unknown_job_is_not_found_either_way(backend: BaseClient) -> None:
    with pytest.raises(NotFound, match="no job 'nope'"):
        backend.job("nope")
    with pytest.raises(NotFound, match="no job 'nope'"):
        next(backend.events("nope"))


def test_leaving_the_only_hold_on_a_run_cancels_it(backend: BaseClient) -> None:
    job = backend.start(RunRequest("sleep 30", use_cache=False))
    assert backend.leave(job.job_id).status == "cancelled"
    result = backend.job(job.job_id).result
    assert isinstance(result, CommandResult) and result.cancelled is True


def test_close_cuts_an_event_stream_still_open(live_server: LiveServer) -> None:
    client = Client(live_server.url)
    job = client.start(RunRequest("echo started; sleep 30", use_cache=False))
    seen: list[sse.Event] = []
    failures: list[ServerUnreachable] = []

    def follow() -> None:
        try:
            seen.extend(client.events(job.job_id))
        except ServerUnreachable as error:
            failures.append(error)

    follower = threading.Thread(target=follow)
    follower.start()
    until(lambda: seen)  # the stream is open: its first event came
    client.close()
    follower.join(20)
    assert not follower.is_alive()
    assert [error.message for error in failures] == [f"the client of {client.url} is closed"]
    with Client(live_server.url) as other:
        assert other.cancel(job.job_id).status == "cancelled"


def test_jobs_are_listed_paused_resumed_and_cancelled(live_server: LiveServer) -> None:
    with Client(live_server.url) as client:
        job = client.start(RunRequest("sleep 30", use_cache=False))
        assert [found.job_id for found in client.jobs().jobs] == [job.job_id]
        assert client.pause(job.job_id).status == "paused"
        with pytest.raises(Conflict, match="cannot be paused: it is paused"):
            client.pause(job.job_id)
        assert client.resume(job.job_id).status == "running"
        assert client.cancel(job.job_id).status == "cancelled"
        with pytest.raises(Conflict) as refused:
            client.cancel(job.job_id)
        assert refused.value.status == 409


def test_the_process_routes_over_a_run(live_server: LiveServer) -> None:
    with Client(live_server.url) as client:
        job = client.start(RunRequest("sleep 30", use_cache=False))
        assert job.pid is not None
        listed = client.processes()
        assert list(listed.active_processes) == [str(job.pid)]
        assert client.process_status(job.pid).process.status == "running"
        assert client.pause_process(job.pid).success is True
        assert client.process_status(job.pid).process.status == "paused"
        assert client.resume_process(job.pid).success is True
        assert [entry.pid for entry in client.dashboard().processes] == [job.pid]
        assert client.terminate_process(job.pid).success is True
        assert client.job(job.job_id).status == "cancelled"
        with pytest.raises(NotFound) as missing:
            client.pause_process(job.pid)
        assert missing.value.message == f"Failed to pause process {job.pid} or process not found"
