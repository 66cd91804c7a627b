"""Server-Sent Events as a client reads them: lines in, events out.

``GET /api/jobs/{id}/events`` speaks the format of the HTML standard's
``text/event-stream``; :func:`parse` turns its lines back into events, so the
HTTP client and anything else reading such a stream share one parser. Only what
the format defines is read: ``event``, ``data`` (several lines joined by a line
feed), ``id``; comments and ``retry`` are skipped, and a blank line ends an event.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator

import msgspec

__all__ = ["Event", "EventStream", "parse"]


class Event(msgspec.Struct, frozen=True):
    """One event: its ``kind`` (``message`` when the stream names none), its text,
    and the id it carried, if any."""

    kind: str
    data: str
    id: str | None = None


#: Events as a reader takes them; closing it hangs up.
EventStream = Generator[Event, None, None]


def parse(lines: Iterable[bytes]) -> Iterator[Event]:
    """The events of a stream given line by line (each with or without its line end).

    An event still open when the lines run out is dropped, as the standard says:
    a stream cut mid-event never yields half of one. Each event carries the id
    given with it (runcache's give their own), not the last one seen before.
    """
    kind = ""
    data: list[str] = []
    event_id: str | None = None
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:  # the standard dispatches only an event that had data
                yield Event(kind or "message", "\n".join(data), event_id)
            kind, data, event_id = "", [], None
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
