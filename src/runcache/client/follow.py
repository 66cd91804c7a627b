"""Following a job from the command line: its output as the command prints it, byte for byte.

``runcache run`` and ``runcache jobs logs --follow`` copy a job's stdout and
stderr to their own as the command prints them. The bytes come from the job's
``/output`` pages, not from its events: events carry text split into lines (a
carriage return reads as a line end there, so a progress bar would scroll), while
pages are the captured bytes, so what the terminal gets is exactly what the
command wrote. The events are only the wake-up: each says the job printed more
(or ended), and the follower then reads pages up to where they stop. So output
appears as soon as it is printed, and a command that is quiet for an hour costs
one open connection, where polling would cost a request every few tenths of a
second for the hour. The price is that output crosses the wire twice (once as
event text, once as page bytes), with a page request for each event.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import closing
from typing import BinaryIO, Protocol

from runcache import wire
from runcache.client import sse
from runcache.errors import ServerError

#: The streams a job has, in the order a follower reads them.
STREAMS = ("stdout", "stderr")


class JobSource(Protocol):
    """What following a job needs: a server's client, or an engine in this process."""

    def output(
        self, job_id: str, stream: str = "stdout", offset: int = 0, limit: int | None = None
    ) -> wire.JobOutput: ...

    def events(self, job_id: str, last_event_id: str | None = None) -> sse.EventStream: ...


def copy_output(
    source: JobSource, job_id: str, sinks: Mapping[str, BinaryIO], until_end: bool = True
) -> None:
    """Write each stream of the job named in ``sinks`` to its sink, exactly as printed.

    With ``until_end`` this returns once the job has ended and every byte is
    written; without, once what the job has printed so far is written.
    """
    offsets = {name: 0 for name in STREAMS}
    complete = [_copy(source, job_id, name, sink, offsets) for name, sink in sinks.items()]
    if all(complete) or not until_end:
        return
    for name in STREAMS:  # events of a stream not followed start where it is now
        if name not in sinks:
            offsets[name] = source.output(job_id, name, 0, limit=1).total_bytes
    resume_at = f"{offsets['stdout']}:{offsets['stderr']}"
    with closing(source.events(job_id, resume_at)) as events:
        for event in events:
            if event.kind not in STREAMS:
                break  # the result (or why it never ran): every page is final now
            if event.kind in sinks:  # that stream grew: read it up to where it stops
                _copy(source, job_id, event.kind, sinks[event.kind], offsets)
    for name, sink in sinks.items():
        if not _copy(source, job_id, name, sink, offsets):
            raise ServerError(
                f"job {job_id} has ended, yet its {name} pages stop at byte "
                f"{offsets[name]} short of their end",
                502,
            )


def _copy(
    source: JobSource, job_id: str, stream: str, sink: BinaryIO, offsets: dict[str, int]
) -> bool:
    """Copy what ``stream`` holds past its offset; whether that is all it will ever hold."""
    while True:
        page = source.output(job_id, stream, offsets[stream])
        data = page.data.encode()
        if len(data) != page.next_offset - page.offset:
            # A live page with bytes that are not UTF-8 (each read as U+FFFD, whose UTF-8
            # is longer): its offsets count the raw bytes, the final pages' count the stored
            # text. Print what comes before the first such byte (the same in both) and hold
            # the rest for the final pages, so nothing is printed twice.
            valid = page.data.split("\ufffd", 1)[0].encode()
            if valid:
                sink.write(valid)
                sink.flush()
            offsets[stream] = page.offset + len(valid)
            return False
        if data:
            sink.write(data)
            sink.flush()
        offsets[stream] = page.next_offset
        if page.eof or not data or page.next_offset >= page.total_bytes:
            return page.eof
