"""Following a job from the command line: its output as the command prints it, byte for byte.

``runcache run`` and ``runcache jobs logs --follow`` copy a job's stdout and
stderr to their own as the command prints them. They read the job's ``/output``
pages, not its Server-Sent Events: events carry text split into lines (a
carriage return reads as a line end there), while pages are the captured bytes,
so what the terminal gets is exactly what the command wrote. A follower asks
again at once while output flows and backs off to ``POLL_MAX_SECONDS`` while the
command is quiet, so a quiet minute-long build costs a few hundred tiny requests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import BinaryIO, Protocol

from runcache import wire

#: Seconds between reads of a quiet job: the first, and the most.
POLL_MIN_SECONDS = 0.01
POLL_MAX_SECONDS = 0.1


class JobSource(Protocol):
    """What following a job needs: a server's client, or an engine in this process."""

    def output(self, job_id: str, stream: str = "stdout", offset: int = 0,
               limit: int | None = None) -> wire.JobOutput: ...


def copy_output(source: JobSource, job_id: str, sinks: Mapping[str, BinaryIO],
                until_end: bool = True) -> None:
    """Write each stream of the job to its sink as it grows, exactly as printed.

    With ``until_end`` this returns once the job has ended and every byte is
    written; without, once what the job has printed so far is written.
    """
    offsets = dict.fromkeys(sinks, 0)
    finished: set[str] = set()
    pause = POLL_MIN_SECONDS
    while len(finished) < len(sinks):
        wrote = False
        for stream, sink in sinks.items():
            if stream in finished:
                continue
            page = source.output(job_id, stream, offsets[stream])
            if page.data:
                sink.write(page.data.encode())
                sink.flush()
                wrote = True
            offsets[stream] = page.next_offset
            if page.eof or (not until_end and not page.data):
                finished.add(stream)
        if wrote:
            pause = POLL_MIN_SECONDS
        elif len(finished) < len(sinks):
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX_SECONDS)
