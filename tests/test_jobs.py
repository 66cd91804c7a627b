"""Jobs and their registry: ids, statuses, retention and the bound on finished jobs."""

from __future__ import annotations

import re

import pytest

from runcache.engine.jobs import MAX_FINISHED, Job, Jobs
from runcache.errors import NotFound
from runcache.run.runner import RunControl, RunResult

from conftest import FakeClock


def _result(return_code: int = 0, timed_out: bool = False, cancelled: bool = False) -> RunResult:
    return RunResult(
        bytearray(),
        bytearray(),
        return_code,
        timed_out,
        False,
        False,
        0.1,
        "2026-01-01T00:00:00+00:00",
        cancelled,
    )


def _ended(jobs: Jobs, command: str = "true") -> Job:
    # No RunControl: each holds a pipe, and a thousand would use up descriptors.
    job = jobs.new(command, "k" * 64, None, True, False)
    job.finish(b"{}", _result())
    jobs.ended(job)
    return job


def test_ids_are_url_safe_unguessable_and_never_look_like_an_option(fake_clock: FakeClock) -> None:
    jobs = Jobs(60, clock=fake_clock)
    ids = {jobs.new("true", "k", None, False, False).job_id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{20,}", job_id) for job_id in ids)
    # A leading "-" made `runcache jobs logs ID` print its usage instead (seen in CI).
    assert not any(job_id.startswith("-") for job_id in ids)


@pytest.mark.parametrize(
    ("result", "status"),
    [
        (_result(0), "completed"),
        (_result(1), "failed"),
        (_result(-9, timed_out=True), "timed_out"),
        (_result(-9, cancelled=True), "cancelled"),
    ],
)
def test_status_follows_the_result(fake_clock: FakeClock, result: RunResult, status: str) -> None:
    job = Jobs(60, clock=fake_clock).new("x", "k", RunControl(10), False, False)
    assert job.status == "running" and not job.ended
    job.finish(b"{}", result)
    assert job.status == status and job.ended


def test_a_job_that_never_ran_failed_and_a_cached_one_completed(fake_clock: FakeClock) -> None:
    jobs = Jobs(60, clock=fake_clock)
    refused = jobs.new("x", "k", RunControl(10), False, False)
    refused.fail("every slot stayed busy")
    assert refused.status == "failed" and refused.error == "every slot stayed busy"
    hit = jobs.new("x", "k", None, True, True)
    hit.finish(b"{}", None)
    assert hit.status == "completed" and hit.pid is None


def test_runtime_stops_at_the_end(fake_clock: FakeClock) -> None:
    job = Jobs(60, clock=fake_clock).new("x", "k", RunControl(10), False, False)
    fake_clock.tick(2.5)
    assert job.runtime == 2.5
    job.finish(b"{}", _result())
    fake_clock.tick(10)
    assert job.runtime == 2.5


def test_finished_jobs_are_kept_for_the_retention(fake_clock: FakeClock) -> None:
    jobs = Jobs(60, clock=fake_clock)
    old = _ended(jobs)
    running = jobs.new("sleep", "r" * 64, RunControl(10), True, False)
    fake_clock.tick(59)
    assert jobs.get(old.job_id) is old
    fake_clock.tick(2)
    assert [job.job_id for job in jobs.listing()] == [running.job_id]  # running ones stay
    with pytest.raises(NotFound, match=f"no job '{old.job_id}' on this server"):
        jobs.get(old.job_id)


def test_at_most_max_finished_are_kept_oldest_dropped_first(fake_clock: FakeClock) -> None:
    jobs = Jobs(3600, clock=fake_clock)
    first = [_ended(jobs) for _ in range(3)]
    rest = [_ended(jobs) for _ in range(MAX_FINISHED)]
    listed = jobs.listing()
    assert len(listed) == MAX_FINISHED
    assert listed[0] is rest[-1] and listed[-1] is rest[0]  # newest first
    for job in first:
        with pytest.raises(NotFound):
            jobs.get(job.job_id)


def test_a_running_cacheable_job_is_found_by_its_key_until_it_ends(
    fake_clock: FakeClock,
) -> None:
    jobs = Jobs(60, clock=fake_clock)
    job = jobs.new("x", "key", RunControl(10), True, False)
    assert jobs.running_for("key") is job and jobs.running() == [job]
    uncached = jobs.new("x", "other", RunControl(10), False, False)
    assert jobs.running_for("other") is None and uncached in jobs.running()
    job.finish(b"{}", _result())
    jobs.ended(job)
    assert jobs.running_for("key") is None and jobs.running() == [uncached]
